"""What a sentence-transformers model is, read from its files: the module
stack in modules.json (Transformer, Pooling, Dense, Normalize, Dropout), each
module's config, and config_sentence_transformers.json (prompts, default
prompt, similarity function, truncate_dim). Local folders and hub ids are
read alike: a hub id's files come from huggingface_hub's cache
(`hf_hub_download`, which honours HF_HOME and HF_HUB_OFFLINE), as
sentence-transformers reads them.

A stack the engine cannot reproduce exactly is refused here, at
construction, with UnsupportedModelError naming the module; a model without
modules.json is a plain transformers encoder (spec.sentence_transformers is
False) and the engine's own defaults apply."""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ModelLoadError, UnsupportedModelError

# Every pooling mode sentence-transformers has, in the order its Pooling
# module concatenates them (sentence_transformers Pooling.forward).
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# The pre-6.0 Pooling config: one boolean flag per mode.
_LEGACY_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# sentence-transformers' names for a Transformer module's config file, newest first.
_TRANSFORMER_CONFIGS = (
    "sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
    "sentence_camembert_config.json", "sentence_albert_config.json", "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)
_EMBEDDING = "sentence_embedding"
# The prompts sentence-transformers 6 gives every SentenceTransformer
# (SentenceTransformer._default_prompts, their None filled with ""), under
# the saved ones: prompt_name="query" (encode_query) and "document" work on
# any embedding model, as no prompt where the model saved none.
DEFAULT_PROMPTS = {"query": "", "document": ""}


@dataclass
class DenseLayer:
    """One Dense module: activation(x @ weight.T + bias) (+ x, or its
    projection, with use_residual)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: torch.nn.Module
    residual: torch.Tensor | None = None  # projection when in != out
    use_residual: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(torch.nn.functional.linear(x, self.weight, self.bias))
        if self.use_residual:
            out = out + (x if self.residual is None else torch.nn.functional.linear(x, self.residual))
        return out

    def to(self, device: torch.device) -> "DenseLayer":
        move = lambda t: None if t is None else t.to(device=device, dtype=torch.float32)  # noqa: E731
        return DenseLayer(move(self.weight), move(self.bias), self.activation.to(device), move(self.residual),
                          self.use_residual)


@dataclass(frozen=True)
class Truncate:
    """config_sentence_transformers.json's truncate_dim: every embedding cut
    to its first `dim` values after the whole module stack, as
    SentenceTransformer.encode cuts them (util.truncate_embeddings), not
    normalised again."""

    dim: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : self.dim].contiguous()

    def width(self, width: int) -> int:
        return min(width, self.dim)


@dataclass
class ModelSpec:
    """A model as sentence-transformers would run it."""

    source: str
    # Where transformers loads the encoder and tokenizer from, and the
    # subfolder inside it (the Transformer module's path: "" or, in folders
    # saved before sentence-transformers 2.x, "0_Transformer").
    where: str | None = None
    subfolder: str = ""
    sentence_transformers: bool = False
    # The length sentence-transformers' encode truncates to where the
    # Transformer's config sets one, with its precedence: processing_kwargs'
    # text max_length, else the tokenizer kwargs' model_max_length, else
    # max_seq_length (Transformer.__init__ applies it only where the kwargs
    # set no model_max_length). None: the tokenizer's own limit and the
    # position table decide (models.model_max_length).
    max_seq_length: int | None = None
    do_lower_case: bool = False
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    # The Transformer config's (deprecated) tokenizer_name_or_path: the
    # tokenizer loaded from there instead of `where`.
    tokenizer_path: str | None = None
    pooling: tuple[str, ...] | None = None
    include_prompt: bool = True
    # After pooling, in order: DenseLayer objects and the string "normalize";
    # last, a Truncate where the config sets truncate_dim.
    post: list[Any] = field(default_factory=list)
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str | None = None
    truncate_dim: int | None = None

    @property
    def normalize(self) -> bool | None:
        """Whether the stack ends in unit-length vectors (None: not a sentence-transformers model)."""
        if not self.sentence_transformers:
            return None
        return bool(self.post) and self.post[-1] == "normalize"

    @property
    def dense(self) -> list[DenseLayer]:
        return [m for m in self.post if isinstance(m, DenseLayer)]


# How long the hub's endpoint may take to accept a connection before it is
# taken as unreachable, and how long that answer is kept.
HUB_PROBE_S = 3.0
_HUB_ANSWER_S = 60.0
_hub_answers: dict[tuple[str, int], tuple[float, bool]] = {}
_hub_lock = threading.Lock()


def hub_offline() -> bool:
    """Whether a hub id's files are to be read from the cache alone: with
    HF_HUB_OFFLINE, or where the hub's endpoint takes no connection within
    HUB_PROBE_S. Each lookup of an unreachable hub is otherwise retried with
    back-off (huggingface_hub's), about 15 s each, and loading a model makes
    several: a name that is neither a folder nor cached took 70-85 s to be
    refused. Behind a proxy (HTTPS_PROXY, ALL_PROXY) the hub is taken as
    reachable: only the proxy knows."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    if not url.hostname:
        return False
    key = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    with _hub_lock:
        now = time.monotonic()
        seen = _hub_answers.get(key)
        if seen is not None and now - seen[0] < _HUB_ANSWER_S:
            return not seen[1]
        try:
            socket.create_connection(key, timeout=HUB_PROBE_S).close()
            reachable = True
        except OSError:
            reachable = False
        _hub_answers[key] = (now, reachable)
        return not reachable


class _Files:
    """A model's files, from a local folder or a hub id's cache (the cache
    alone where the hub is unreachable: hub_offline)."""

    def __init__(self, model: str) -> None:
        p = Path(model).expanduser()
        self.local = p.resolve() if p.is_dir() else None
        self.repo = None if self.local is not None else model
        self.offline = self.repo is not None and hub_offline()

    def find(self, *parts: str) -> Path | None:
        rel = "/".join(x.strip("/") for x in parts if x and x.strip("/"))
        if self.local is not None:
            f = self.local / rel
            return f if f.is_file() else None
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(self.repo, rel, local_files_only=self.offline))
        except Exception:  # missing from the repo or the cache, or not a valid repo id: no such file
            return None

    def json(self, *parts: str, kind: type = dict) -> Any:
        """The file's JSON, a `kind` (an object; modules.json: a list), or None where there is no file."""
        f = self.find(*parts)
        if f is None:
            return None
        try:
            value = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{f}: not readable JSON: {e}") from e
        if not isinstance(value, kind):
            raise ModelLoadError(f"{f}: not a JSON {'list' if kind is list else 'object'}")
        return value


def _kind(entry: dict) -> str:
    """A modules.json type's class name (the module path moved across
    versions). A class from outside sentence-transformers is the folder's own
    code, which SentenceTransformer runs only with trust_remote_code=True:
    refused, whatever it is called."""
    kind = str(entry.get("type", ""))
    if not kind.startswith("sentence_transformers."):
        raise UnsupportedModelError(kind or "?", "a module class from the model's own code, not from "
                                                 "sentence-transformers (custom code is not run)")
    return kind.rsplit(".", 1)[-1]


def _typed(read: Callable[[str | os.PathLike], ModelSpec]) -> Callable[[str | os.PathLike], ModelSpec]:
    """read(model), any error it meets in the files (a value of the wrong
    JSON type, weights that are not weights: a git-lfs pointer) raised as
    ModelLoadError naming the model."""
    @functools.wraps(read)
    def typed(model: str | os.PathLike) -> ModelSpec:
        try:
            return read(model)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{os.fspath(model)}: its sentence-transformers files could not be read: {e!r}") \
                from e
    return typed


@_typed
def load_spec(model: str | os.PathLike) -> ModelSpec:
    """The spec of a local folder or hub id (a plain spec where there is no modules.json)."""
    files = _Files(os.fspath(model))
    spec = ModelSpec(source=os.fspath(model), where=str(files.local) if files.local else os.fspath(model),
                     prompts=dict(DEFAULT_PROMPTS))
    modules = files.json("modules.json", kind=list)
    if modules is None:
        return spec
    if not modules or not all(isinstance(m, dict) for m in modules):
        raise ModelLoadError(f"{spec.source}: modules.json is not a list of modules")
    spec.sentence_transformers = True
    # In the list's order, as sentence-transformers runs them (it never reads "idx").
    first, rest = modules[0], modules[1:]
    if _kind(first) != "Transformer":
        raise UnsupportedModelError(_kind(first) or "?", "the first module must be a Transformer")
    _read_transformer(files, first, spec)
    _read_config(files, spec)
    pooled = False
    for m in rest:
        kind, path = _kind(m), m.get("path", "")
        cfg = files.json(path, "config.json")
        if cfg is None and kind in ("Pooling", "Dense"):  # sentence-transformers cannot build them either
            raise ModelLoadError(f"{spec.source}: {'/'.join(filter(None, (path, 'config.json')))} is missing: "
                                 f"the {kind} module's configuration")
        cfg = cfg or {}
        if kind == "Pooling" and not pooled:
            _read_pooling(cfg, spec)
            pooled = True
        elif kind == "Dense" and pooled:
            spec.post.append(_read_dense(files, path, cfg))
        elif kind == "Normalize" and pooled:
            _check_names(kind, cfg)
            spec.post.append("normalize")
        elif kind == "Dropout" and pooled:
            # On the pooled embedding, and encode runs in eval mode: nothing
            # to do (it was refused as an unknown module). Before Pooling
            # sentence-transformers itself fails (no sentence embedding yet).
            _check_names(kind, cfg)
        elif kind == "Normalize":
            # Unit-length token embeddings, then pooled: not what the stack after Pooling does.
            raise UnsupportedModelError(kind, "Normalize before Pooling is not supported")
        else:
            why = "a second Pooling" if kind == "Pooling" else (
                "a Dense before Pooling" if kind == "Dense" else "this module is not supported")
            raise UnsupportedModelError(kind or str(m.get("type")), why)
    if not pooled:
        raise UnsupportedModelError("Pooling", "the model has no Pooling module (token embeddings are not served)")
    if spec.truncate_dim is not None:
        spec.post.append(Truncate(spec.truncate_dim))  # after the whole stack, as encode cuts
    return spec


def _check_names(kind: str, cfg: dict) -> None:
    for key in ("module_input_name", "module_output_name"):
        if cfg.get(key, _EMBEDDING) != _EMBEDDING:
            raise UnsupportedModelError(kind, f"{key}={cfg[key]!r} (only {_EMBEDDING!r} is supported)")


def _read_transformer(files: _Files, entry: dict, spec: ModelSpec) -> None:
    path = str(entry.get("path", "") or "").strip("/")
    spec.subfolder = path
    cfg: dict = {}
    for name in _TRANSFORMER_CONFIGS:
        found = files.json(path, name)
        if found is not None:
            cfg = found
            break
    task = cfg.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise UnsupportedModelError("Transformer", f"transformer_task={task!r} (only 'feature-extraction')")
    for modality, how in (cfg.get("modality_config") or {}).items():
        if modality != "text" or (how or {}).get("method_output_name", "last_hidden_state") != "last_hidden_state":
            raise UnsupportedModelError("Transformer", f"modality_config {modality!r}: {how!r} (text only, "
                                                       "last_hidden_state)")
    if cfg.get("module_output_name", "token_embeddings") != "token_embeddings":
        raise UnsupportedModelError("Transformer", f"module_output_name={cfg['module_output_name']!r}")
    for key in ("query_length", "document_length", "query_expansion"):
        # encode_query / encode_document apply them (task="query" or
        # "document"), which the engine has no notion of: refused rather than
        # ignored (embed(prompt_name="query") had 0.89 cosine to encode_query
        # with query_length 6).
        if cfg.get(key) is not None:
            raise UnsupportedModelError("Transformer", f"{key}={cfg[key]!r} (per-task lengths and query expansion, "
                                                       "which encode_query / encode_document apply, are not "
                                                       "supported)")
    msl = cfg.get("max_seq_length")
    try:
        spec.max_seq_length = int(msl) if msl else None
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{spec.source}: {'/'.join(filter(None, (path, name)))}: max_seq_length {msl!r} "
                             "is not an integer") from e
    spec.do_lower_case = bool(cfg.get("do_lower_case", False))
    spec.tokenizer_path = cfg.get("tokenizer_name_or_path") or None
    tok = dict(cfg.get("processor_kwargs") or cfg.get("tokenizer_args") or {})
    tok.pop("trust_remote_code", None)  # sentence-transformers never lets a config set it
    spec.tokenizer_kwargs = tok
    if "model_max_length" in tok:
        # Transformer.__init__ sets max_seq_length as the tokenizer's
        # model_max_length only where its kwargs set none: theirs wins.
        tml = tok["model_max_length"]
        if isinstance(tml, bool) or not isinstance(tml, int) or tml < 1:
            raise ModelLoadError(f"{spec.source}: {'/'.join(filter(None, (path, name)))}: the tokenizer kwargs' "
                                 f"model_max_length {tml!r} is not a positive integer")
        spec.max_seq_length = tml
    # The tokenizer call's own max_length: it wins over both.
    _read_processing(cfg.get("processing_kwargs") or {}, spec)
    for key in ("model_kwargs", "model_args", "config_kwargs", "config_args"):
        extra = {k: v for k, v in (cfg.get(key) or {}).items() if k != "trust_remote_code"}
        if extra:
            raise UnsupportedModelError("Transformer", f"{key}={extra!r} in its config is not supported")


def _read_processing(kwargs: dict, spec: ModelSpec) -> None:
    """sentence-transformers 6's processing_kwargs, merged into every call of
    the tokenizer: the text's max_length is served (as max_seq_length); any
    other setting is refused rather than ignored."""
    if not isinstance(kwargs, dict) or not all(isinstance(v, dict) for v in kwargs.values()):
        raise ModelLoadError(f"{spec.source}: processing_kwargs must map modalities to settings, got {kwargs!r}")
    text = dict(kwargs.get("text") or {})
    length = text.pop("max_length", None)
    if text.get("truncation", True) in (True, "longest_first"):
        text.pop("truncation", None)
    if text.get("padding", True) in (True, "longest"):
        text.pop("padding", None)
    other = {k: v for k, v in {**kwargs, "text": text}.items() if v and k not in ("audio", "image", "video")}
    if other:
        raise UnsupportedModelError("Transformer", f"processing_kwargs {other!r} (only the text's max_length "
                                                   "is supported)")
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ModelLoadError(f"{spec.source}: processing_kwargs text max_length {length!r} is not a positive "
                                 "integer")
        spec.max_seq_length = length


def _read_config(files: _Files, spec: ModelSpec) -> None:
    cfg = st_config(files)
    kind = cfg.get("model_type", "SentenceTransformer")
    if kind != "SentenceTransformer":
        raise UnsupportedModelError(kind, "not a SentenceTransformer (dense embedding) model")
    _read_prompts(cfg, spec, DEFAULT_PROMPTS)
    spec.similarity_fn_name = cfg.get("similarity_fn_name") or None
    # sentence-transformers 6 saves it (SentenceTransformer._get_model_config)
    # and encode cuts every embedding to it.
    dim = cfg.get("truncate_dim")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise ModelLoadError(f"{spec.source}: config_sentence_transformers.json: truncate_dim {dim!r} is not a "
                             "positive integer")
    spec.truncate_dim = dim


@_typed
def load_prompts(model: str | os.PathLike) -> ModelSpec:
    """A CrossEncoder's spec: its prompts and default prompt (its
    config_sentence_transformers.json; none without one). CrossEncoder.predict
    puts the prompt in front of each pair's first text."""
    files = _Files(os.fspath(model))
    spec = ModelSpec(source=os.fspath(model), where=str(files.local) if files.local else os.fspath(model))
    _read_prompts(st_config(files), spec)
    return spec


def st_config(model: str | os.PathLike | _Files) -> dict:
    """config_sentence_transformers.json of a local folder or a hub id (its
    cache), {} where there is none; ModelLoadError where it is not an object."""
    files = model if isinstance(model, _Files) else _Files(os.fspath(model))
    return files.json("config_sentence_transformers.json") or {}


def _read_prompts(cfg: dict, spec: ModelSpec, defaults: dict[str, str] | None = None) -> None:
    """The saved prompts over `defaults` (a SentenceTransformer's, in its
    order: the defaults' keys first), a saved null taken as "" as
    sentence-transformers 6 takes it (BaseModel._validate_prompts)."""
    prompts = cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(v is None or isinstance(v, str) for v in prompts.values()):
        raise ModelLoadError(f"{spec.source}: config_sentence_transformers.json: prompts must map names to strings")
    spec.prompts = {**(defaults or {}), **{str(k): v or "" for k, v in prompts.items()}}
    spec.default_prompt_name = cfg.get("default_prompt_name") or None
    if spec.default_prompt_name is not None and spec.default_prompt_name not in spec.prompts:
        raise ModelLoadError(f"{spec.source}: default_prompt_name {spec.default_prompt_name!r} is not one of the "
                             f"prompts {sorted(spec.prompts)}")


def _read_pooling(cfg: dict, spec: ModelSpec) -> None:
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = tuple(m for flag, m in _LEGACY_FLAGS.items() if cfg.get(flag))
        mode = modes or ("mean",)  # sentence-transformers' default when no flag is set
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise UnsupportedModelError("Pooling", f"pooling mode {bad or modes!r} (supported: {', '.join(POOLING_MODES)})")
    if any(k.startswith("pooling_mode_") and k not in _LEGACY_FLAGS and v for k, v in cfg.items()):
        raise UnsupportedModelError("Pooling", f"unknown flags in {sorted(cfg)}")
    if "pooling_mode" in cfg:
        # The 6.x format keeps the modes in the given order; older flags concatenate in POOLING_MODES order.
        spec.pooling = modes
    else:
        spec.pooling = tuple(m for m in POOLING_MODES if m in modes)
    spec.include_prompt = bool(cfg.get("include_prompt", True))


def _read_dense(files: _Files, path: str, cfg: dict) -> DenseLayer:
    _check_names("Dense", cfg)
    name = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    activation = _activation(name)
    weights = _dense_weights(files, path)
    w = weights.get("linear.weight")
    if w is None or tuple(w.shape) != (cfg.get("out_features"), cfg.get("in_features")):
        raise UnsupportedModelError("Dense", f"{path}: no linear.weight of shape "
                                             f"[{cfg.get('out_features')}, {cfg.get('in_features')}]")
    bias = weights.get("linear.bias") if cfg.get("bias", True) else None
    use_residual = bool(cfg.get("use_residual", False))
    residual = weights.get("residual.weight") if use_residual else None
    if use_residual and residual is None and cfg.get("in_features") != cfg.get("out_features"):
        raise UnsupportedModelError("Dense", f"{path}: use_residual without residual.weight")
    f32 = lambda t: None if t is None else t.detach().to(torch.float32)  # noqa: E731
    return DenseLayer(f32(w), f32(bias), activation, f32(residual), use_residual)


def _activation(name: str) -> torch.nn.Module:
    """The activation a Dense config names, as sentence-transformers builds it:
    a torch.nn.Module class from torch, instantiated without arguments."""
    module, _, cls = str(name).rpartition(".")
    if not module.startswith("torch."):
        raise UnsupportedModelError("Dense", f"activation {name!r} (only torch.nn modules)")
    try:
        act = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise UnsupportedModelError("Dense", f"activation {name!r} not found: {e}") from e
    if not (inspect.isclass(act) and issubclass(act, torch.nn.Module)):
        raise UnsupportedModelError("Dense", f"activation {name!r} is not a torch.nn.Module class")
    return act()


def _dense_weights(files: _Files, path: str) -> dict[str, torch.Tensor]:
    """Both forms sentence-transformers writes: model.safetensors (since 3.x)
    and pytorch_model.bin."""
    f = files.find(path, "model.safetensors")
    if f is not None:
        from safetensors.torch import load_file

        return load_file(str(f))
    f = files.find(path, "pytorch_model.bin")
    if f is not None:
        return torch.load(str(f), map_location="cpu", weights_only=True)
    raise UnsupportedModelError("Dense", f"{path}: no model.safetensors or pytorch_model.bin")


def prompt_length(tokenizer: Any, prompt: str, max_length: int | None = None) -> int:
    """The prompt's tokens at the start of a prompted text, as
    sentence-transformers counts them (Transformer._get_prompt_length): the
    prompt tokenized alone with special tokens, cut at max_length as its
    preprocess cuts it (a prompt past the limit: the trailing special token
    of the cut text stays pooled), less a trailing special token."""
    cut = {"truncation": True, "max_length": max_length} if max_length else {}
    ids = tokenizer(prompt, add_special_tokens=True, **cut)["input_ids"]
    n = len(ids)
    if ids and ids[-1] in set(getattr(tokenizer, "all_special_ids", ())):
        n -= 1
    return n
