"""Per-token peak and speed of the families' packed runners, old forward vs new."""
import sys, time, gc
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "tests" / "python"))
import numpy as np, torch
import tiny_models as tm, st_models
from fastserve import Engine, footprint, families
from fastserve.families import _rotate_half, _clamp_fp16

def mpnet_old(self, ids, pos, attend):
    emb = self.base.embeddings
    h = emb.dropout(emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(pos + self.POSITION_OFFSET)))
    T, H = h.shape
    for i, (block, qkv) in enumerate(zip(self.layers, self.qkv)):
        ctx = attend(i, qkv(h).view(T, 3, self.heads, H // self.heads))
        att = block.attention
        a = att.LayerNorm(att.dropout(att.attn.o(ctx)) + h)
        h = block.output(block.intermediate(a), a)
    return h

def t5_old(self, ids, pos, attend):
    h = self.stack.dropout(self.stack.embed_tokens(ids))
    T = h.shape[0]
    for i, (block, qkv) in enumerate(zip(self.blocks, self.qkv)):
        sa = block.layer[0]
        ctx = attend(i, qkv(sa.layer_norm(h)).view(T, 3, self.heads, self.d_kv))
        h = _clamp_fp16(h + sa.dropout(sa.SelfAttention.o(ctx)))
        h = _clamp_fp16(block.layer[-1](h))
    return self.stack.dropout(self.stack.final_layer_norm(h))

def mb_old(self, ids, pos, attend):
    h = self.base.embeddings(input_ids=ids[None])[0]
    T, H = h.shape
    hd = H // self.heads
    rope = {t: self.base.rotary_emb(h[None], pos[None], t) for t in set(self.types)}
    for i, layer in enumerate(self.layers):
        cos, sin = (x[0][:, None, :] for x in rope[self.types[i]])
        qkv = layer.attn.Wqkv(layer.attn_norm(h)).view(T, 3, self.heads, hd)
        q = qkv[:, 0] * cos + _rotate_half(qkv[:, 0]) * sin
        k = qkv[:, 1] * cos + _rotate_half(qkv[:, 1]) * sin
        ctx = attend(i, torch.stack([q, k, qkv[:, 2]], dim=1))
        h = h + layer.attn.out_drop(layer.attn.Wo(ctx))
        h = h + layer.mlp(layer.mlp_norm(h))
    return self.base.final_norm(h)

CLS = {"mpnet": families.MPNetPackedRunner, "t5": families.T5PackedRunner, "umt5": families.T5PackedRunner,
       "modernbert": families.ModernBertPackedRunner, "modernbert-wide": families.ModernBertPackedRunner}
OLD = {"mpnet": mpnet_old, "t5": t5_old, "umt5": t5_old, "modernbert": mb_old, "modernbert-wide": mb_old}
NEW = {k: c.forward for k, c in CLS.items()}

def model(arch, hidden=256, inter=1024, heads=4, layers=2):
    from transformers import AutoModel, T5EncoderModel, UMT5EncoderModel
    base = "modernbert" if arch.startswith("modernbert") else arch
    cfg = st_models.config(base)
    if base in ("t5", "umt5"):
        cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv, cfg.num_layers = hidden, inter, heads, hidden // heads, layers
    else:
        cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers = hidden, inter, heads, layers
        if base == "modernbert":
            cfg.layer_types = ["full_attention", "sliding_attention"][:layers]
            if arch == "modernbert-wide":  # ModernBERT-base's proportion: intermediate 1.5H
                cfg.intermediate_size = hidden * 3 // 2
    torch.manual_seed(0)
    enc = {"t5": T5EncoderModel, "umt5": UMT5EncoderModel}
    m = enc[base](cfg) if base in enc else AutoModel.from_config(cfg)
    return m.eval()

def capture(arch, tokens, texts):
    """An engine and a batch of `tokens` tokens (packed), as the runner gets it."""
    eng = Engine(model(arch), tm.tokenizer(), execution="packed", policy="static",
                 min_batch_tokens=tokens, max_batch_tokens=tokens, warmup=False)
    got = []
    inner = eng.runner.run
    def run(batch, *a, **k):
        got.append(batch)
        return inner(batch, *a, **k)
    eng.runner.run = run
    eng.embed(texts)
    eng.runner.run = inner
    big = max(got, key=lambda b: int(np.asarray(b.lengths).sum()))
    return eng, big

def peak(eng, batch, forward):
    cls = type(eng.runner)
    cls.forward = forward
    with torch.inference_mode():
        eng.runner.hidden(batch)  # masks cached
        gc.collect()
        _, p = footprint.measured_peak_bytes(lambda: eng.runner.hidden(batch))
    return p

def best(eng, batch, forward, n=5):
    type(eng.runner).forward = forward
    ts = []
    with torch.inference_mode():
        for _ in range(n):
            t = time.perf_counter(); eng.runner.hidden(batch); ts.append(time.perf_counter() - t)
    return min(ts)

if __name__ == "__main__":
    what = sys.argv[1]
    archs = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CLS)
    torch.set_num_threads(int(__import__('os').environ.get('THREADS', 2)))
    for arch in archs:
        if what == "mem":
            texts = tm.mixed_texts(60, seed=3)
            eng, b = capture(arch, 512, texts)
            T = int(np.asarray(b.lengths).sum())
            shape = footprint.shape_of(eng.model.config)
            per = footprint.activation_bytes_per_token(shape, torch.float32, "packed", max_length=eng.max_length)
            po, pn = peak(eng, b, OLD[arch]), peak(eng, b, NEW[arch])
            H = shape.hidden
            print(f"{arch:16s} T={T} maxlen={int(np.max(b.lengths))} H={H} F={shape.feed_forward} old {po/T:8.0f} B/tok ({po/T/4/H:.2f}H)"
                  f"  new {pn/T:8.0f} B/tok ({pn/T/4/H:.2f}H)  cut {1-pn/po:.1%}  formula {per} ({(per-24)/4/H:.2f}H) "
                  f"new/formula {pn/T/per:.3f}", flush=True)
            eng.close()
        else:
            texts = tm.mixed_texts(400, seed=7)
            eng, b = capture(arch, 2048, texts)
            T = int(np.asarray(b.lengths).sum())
            with torch.inference_mode():  # bit-identical?
                type(eng.runner).forward = OLD[arch]; x = eng.runner.hidden(b)[0].clone()
                type(eng.runner).forward = NEW[arch]; y = eng.runner.hidden(b)[0].clone()
            same = torch.equal(x, y)
            olds, news = [], []
            for r in range(int(__import__('os').environ.get('ROUNDS', 3))):
                olds.append(best(eng, b, OLD[arch])); news.append(best(eng, b, NEW[arch]))
            print(f"{arch:16s} T={T} identical={same} old best {min(olds)*1e3:.1f} ms  new best {min(news)*1e3:.1f} ms "
                  f" medians {sorted(olds)[len(olds)//2]*1e3:.1f}/{sorted(news)[len(news)//2]*1e3:.1f} rounds old {[round(t*1e3,1) for t in olds]} new {[round(t*1e3,1) for t in news]}", flush=True)
            type(eng.runner).forward = NEW[arch]
            eng.close()
