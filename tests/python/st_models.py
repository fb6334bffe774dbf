"""Tiny randomly initialised sentence-transformers models for parity tests:
one encoder per architecture, one module stack per case, saved by the
installed sentence-transformers (the 6.x format) and rewritten into the
older format (pooling_mode_* flags, the Transformer in 0_Transformer with
sentence_bert_config.json, Dense weights as pytorch_model.bin) that older
releases wrote and hubs still hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import tiny_models as tm

ARCHS = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "t5", "umt5", "modernbert")
STACKS = ("cls-normalize", "mean-dense-normalize", "weightedmean", "lasttoken", "prompts",
          "prompts-excluded", "max-meansqrt")
MAX_SEQ_LENGTH = 48  # below every tiny position table: texts past it are truncated
# Encoders with no packed family, served padded by their own forward: the
# transformers model class and its config's sizes beside the shared ones.
# ConvBERT, MobileBERT and FNet let padding into real tokens (each padded
# batch then runs one length at a time); DeBERTa-v2 has relative attention
# and no token types, Longformer a local window, RoFormer rotary positions.
PADDED = {
    "albert": ("AlbertModel", dict(embedding_size=16)),
    "electra": ("ElectraModel", dict(embedding_size=16)),
    "deberta-v2": ("DebertaV2Model", dict(relative_attention=True, pos_att_type=["p2c", "c2p"],
                                          max_relative_positions=-1, position_biased_input=False,
                                          position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True,
                                          type_vocab_size=0)),
    "squeezebert": ("SqueezeBertModel", dict(embedding_size=32)),
    "convbert": ("ConvBertModel", dict(embedding_size=32, head_ratio=2, conv_kernel_size=9)),
    "mobilebert": ("MobileBertModel", dict(embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
                                           num_feedforward_networks=2, intermediate_size=32)),
    "roformer": ("RoFormerModel", dict(embedding_size=32, rotary_value=False)),
    "longformer": ("LongformerModel", dict(attention_window=[4, 4])),
    "fnet": ("FNetModel", dict(use_tpu_fourier_optimizations=False)),
    "rembert": ("RemBertModel", dict(input_embedding_size=16, output_embedding_size=24)),
}


def config(arch: str):
    """A tiny config of `arch` on the MiniLM WordPiece vocabulary (pad id 0)."""
    from transformers import AutoConfig

    if arch in tm.ARCHS:
        return tm.config(arch)
    vocab = tm.tokenizer().vocab_size
    if arch in PADDED:
        sizes = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=130, pad_token_id=0)
        if arch == "fnet":  # no attention heads
            del sizes["num_attention_heads"]
        return AutoConfig.for_model(arch, **{**sizes, **PADDED[arch][1]})
    if arch == "xlm-roberta":
        return AutoConfig.for_model("xlm-roberta", vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, max_position_embeddings=130,
                                    pad_token_id=0)
    if arch == "mpnet":
        # MPNet's positions, like RoBERTa's, start after padding_idx.
        return AutoConfig.for_model("mpnet", vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, max_position_embeddings=130,
                                    relative_attention_num_buckets=32, pad_token_id=0)
    if arch in ("t5", "umt5"):  # UMT5: a relative bias in every layer, T5 in the first only
        return AutoConfig.for_model(arch, vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                    num_heads=4, relative_attention_num_buckets=32,
                                    relative_attention_max_distance=64, pad_token_id=0, decoder_start_token_id=0,
                                    feed_forward_proj="gated-gelu")
    if arch == "modernbert":
        # Layers 0 and 3 global, 1 and 2 local with a window shorter than the longest texts.
        return AutoConfig.for_model("modernbert", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=4, num_attention_heads=4, global_attn_every_n_layers=3,
                                    local_attention=16, max_position_embeddings=128, pad_token_id=0,
                                    cls_token_id=101, sep_token_id=102, bos_token_id=101, eos_token_id=102,
                                    global_rope_theta=160000.0, local_rope_theta=10000.0)
    if arch == "funnel":  # pools the sequence in blocks, padding included: not in ARCHS
        return AutoConfig.for_model("funnel", vocab_size=vocab, block_sizes=[1, 1], block_repeats=[1, 1],
                                    n_head=4, d_head=8, d_model=32, d_inner=64, num_decoder_layers=1,
                                    max_position_embeddings=128, pad_token_id=0)
    if arch in ("xlm", "flaubert"):  # token types go through the word embeddings: not in ARCHS
        return AutoConfig.for_model(arch, vocab_size=vocab, emb_dim=32, n_layers=2, n_heads=4, pad_index=0,
                                    max_position_embeddings=130, n_langs=1, use_lang_emb=False)
    raise ValueError(arch)


def encoder(arch: str, seed: int = 0):
    from transformers import AutoModel, FunnelModel, T5EncoderModel, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = config(arch)
    # (AutoModel.from_config fails on a Funnel config: it names no architectures.)
    from transformers import FlaubertModel, XLMModel

    encoders = {"t5": T5EncoderModel, "umt5": UMT5EncoderModel, "funnel": FunnelModel, "xlm": XLMModel,
                "flaubert": FlaubertModel}
    if arch in PADDED:
        import transformers

        encoders[arch] = getattr(transformers, PADDED[arch][0])
    m = encoders[arch](cfg) if arch in encoders else AutoModel.from_config(cfg)
    # Random init leaves some parameters (layer norms) at exactly 1 / 0: perturb
    # everything so no term of the computation can be skipped unnoticed.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def save_encoder(arch: str, folder: Path) -> Path:
    encoder(arch).save_pretrained(folder)
    tm.tokenizer().save_pretrained(folder)
    return folder


def save(arch: str, stack: str, folder: Path) -> Path:
    """A sentence-transformers folder of `arch` with module stack `stack`,
    saved by the installed sentence-transformers."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer

    hf = save_encoder(arch, folder.parent / f"{folder.name}-hf")
    t = Transformer(str(hf), max_seq_length=MAX_SEQ_LENGTH)
    cfg = t.auto_model.config
    dim = cfg.dim if arch == "distilbert" else cfg.emb_dim if arch in ("xlm", "flaubert") else cfg.hidden_size
    prompts: dict = {}
    default = None
    torch.manual_seed(1)
    if stack == "cls-normalize":
        modules = [t, Pooling(dim, pooling_mode="cls"), Normalize()]
    elif stack == "mean-dense-normalize":
        modules = [t, Pooling(dim, pooling_mode="mean"), Dense(dim, 24), Normalize()]
    elif stack == "weightedmean":
        modules = [t, Pooling(dim, pooling_mode="weightedmean")]
    elif stack == "lasttoken":
        modules = [t, Pooling(dim, pooling_mode="lasttoken"), Normalize()]
    elif stack == "max-meansqrt":
        modules = [t, Pooling(dim, pooling_mode=("max", "mean_sqrt_len_tokens")),
                   Dense(2 * dim, 16, activation_function=torch.nn.GELU())]
    elif stack in ("prompts", "prompts-excluded"):
        modules = [t, Pooling(dim, pooling_mode="mean", include_prompt=stack == "prompts"), Normalize()]
        prompts = {"query": "query: ", "passage": "passage: ", "document": ""}
        default = "query"
    else:
        raise ValueError(stack)
    st = SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name=default, device="cpu")
    st.save(str(folder))
    shutil.rmtree(hf)
    return folder


_OLD_TYPES = {"Transformer": "sentence_transformers.models.Transformer",
              "Pooling": "sentence_transformers.models.Pooling",
              "Dense": "sentence_transformers.models.Dense",
              "Normalize": "sentence_transformers.models.Normalize"}


def to_legacy(folder: Path, out: Path) -> Path:
    """The same model in the format sentence-transformers 2.x wrote (the
    Transformer module in 0_Transformer, as the oldest releases kept it)."""
    out.mkdir(parents=True)
    modules = json.loads((folder / "modules.json").read_text())
    legacy = []
    for m in modules:
        kind = m["type"].rsplit(".", 1)[-1]
        src = folder / m["path"] if m["path"] else folder
        if kind == "Transformer":
            dst = out / "0_Transformer"
            dst.mkdir()
            for f in folder.iterdir():
                if f.is_file() and f.name not in ("modules.json", "config_sentence_transformers.json", "README.md"):
                    shutil.copy(f, dst / f.name)
            tok_max = json.loads((folder / "tokenizer_config.json").read_text()).get("model_max_length")
            (dst / "sentence_bert_config.json").write_text(json.dumps(
                {"max_seq_length": tok_max, "do_lower_case": False}))
            path = "0_Transformer"
        else:
            path = m["path"]
            dst = out / path
            dst.mkdir()
            cfg = json.loads((src / "config.json").read_text())
            if kind == "Pooling":
                modes = cfg.pop("pooling_mode")
                modes = (modes,) if isinstance(modes, str) else tuple(modes)
                dim = cfg.pop("embedding_dimension")
                cfg = {"word_embedding_dimension": dim,
                       **{flag: mode in modes for flag, mode in (
                           ("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                           ("pooling_mode_max_tokens", "max"),
                           ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
                           ("pooling_mode_weightedmean_tokens", "weightedmean"),
                           ("pooling_mode_lasttoken", "lasttoken"))},
                       "include_prompt": cfg.get("include_prompt", True)}
            elif kind == "Dense":
                from safetensors.torch import load_file

                cfg = {k: cfg[k] for k in ("in_features", "out_features", "bias", "activation_function")}
                torch.save(load_file(str(src / "model.safetensors")), dst / "pytorch_model.bin")
            elif kind == "Normalize":
                cfg = None
            if cfg is not None:
                (dst / "config.json").write_text(json.dumps(cfg))
        legacy.append({"idx": m["idx"], "name": m["name"], "path": path, "type": _OLD_TYPES[kind]})
    (out / "modules.json").write_text(json.dumps(legacy))
    st_cfg = json.loads((folder / "config_sentence_transformers.json").read_text())
    st_cfg["__version__"] = {"sentence_transformers": "2.2.2"}
    (out / "config_sentence_transformers.json").write_text(json.dumps(st_cfg))
    return out


def hub_cache(folder: Path, home: Path, repo: str) -> Path:
    """`folder` as huggingface_hub's cache under HF_HOME=`home` holds the
    hub id `repo` (snapshots/<commit>, refs/main)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = home / "hub" / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    return home
