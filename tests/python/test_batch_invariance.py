"""The same text gives the same embedding whatever else is in its batch
(README, "Guarantees"): alone, among short texts, among long ones, at any
place in the batch. On the CPU in float32 this is bitwise with one torch
thread in packed execution. With several threads the BLAS library may split
one matrix product's sum across threads differently for another batch shape,
and padded batches' products take the padded length's shape, so there it
holds within 1e-6 (measured: 1.3e-7 on MiniLM, benchmarks/README.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models as tm
from fastserve import Engine

PROBE = "The quick brown fox jumps over the lazy dog near the river bank."
SHORT = ["a", "b c", "hello there", "x y z", "ok", "yes", "no way", "fine"] * 3
LONG = [" ".join(tm.mixed_texts(6, seed=i)) for i in range(6)]


def companies(probe: str = PROBE):
    """(name, batch, index of the probe): the probe among short texts, among
    long ones, and among both, first, in the middle and last."""
    for name, others in (("short", SHORT), ("long", LONG), ("mixed", SHORT[:6] + LONG[:3])):
        for at in (0, len(others) // 2, len(others)):
            yield f"{name}@{at}", others[:at] + [probe] + others[at:], at


def probe_in_company(engine: Engine, probe: str = PROBE) -> dict[str, np.ndarray]:
    """The probe's embedding in each company, each batch queued while the
    worker is held so it leaves the queue together (packed: one batch)."""
    out = {"alone": engine.embed([probe])[0]}
    for name, batch, at in companies(probe):
        with tm.held(engine) as gate:
            futures = engine.submit_many(batch)
            gate.release.set()
        out[name] = futures[at].result(timeout=60)
    return out


@pytest.fixture
def one_torch_thread():
    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


def test_one_thread_fp32_the_embedding_is_bitwise_the_same_in_any_company(one_torch_thread):
    with Engine(execution="packed", policy="static", max_batch_tokens=8192, torch_threads=one_torch_thread) as e:
        got = probe_in_company(e)
    for name, v in got.items():
        np.testing.assert_array_equal(v, got["alone"], err_msg=name)


def test_one_thread_fp32_padded_the_embedding_is_the_same_within_1e_6(one_torch_thread):
    # Padded batches' products take the padded length's shape: bitwise only
    # as far as the BLAS gives those shapes the same bits (README).
    with Engine(execution="padded", policy="static", max_batch_tokens=8192, torch_threads=one_torch_thread) as e:
        for probe in (PROBE, *TINY):
            got = probe_in_company(e, probe)
            for name, v in got.items():
                assert np.abs(v - got["alone"]).max() <= 1e-6, f"{probe!r} {name}"


@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_with_every_thread_fp32_the_embedding_is_the_same_within_1e_6(execution):
    with Engine(execution=execution, policy="static", max_batch_tokens=8192) as e:
        got = probe_in_company(e)
    for name, v in got.items():
        assert np.abs(v - got["alone"]).max() <= 1e-6, name


def test_a_model_whose_tokens_see_the_padding_runs_one_length_at_a_time(one_torch_thread):
    # MobileBERT's trigram embeddings take each token's neighbours, a padding
    # token's too: padded beside longer texts, a text's embedding moved by
    # 1.7e-3 (sentence-transformers' own encode moves the same). The padded
    # runner finds it out (padding filled two ways changes the real tokens)
    # and runs each length's rows as a batch of their own: what the text
    # gives alone, bitwise. Models that mask their padding are not split.
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model("mobilebert", vocab_size=tm.tokenizer().vocab_size, hidden_size=32,
                               embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                               num_feedforward_networks=1, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModel.from_config(cfg).eval()
    with Engine(model, tm.tokenizer(), policy="static", max_batch_tokens=8192,
                torch_threads=one_torch_thread) as e:
        assert e.stats()["execution"] == "padded"
        got = probe_in_company(e)
        assert e.runner.pads_leak is True
        texts = SHORT[:5] + LONG[:2]
        together = e.embed(texts)
        apart = np.stack([e.embed([t])[0] for t in texts])
    for name, v in got.items():
        np.testing.assert_array_equal(v, got["alone"], err_msg=name)
    # every row in its place; rows of one length share a product (padded: within 1e-6)
    assert np.abs(together - apart).max() <= 1e-6
    for arch in tm.ARCHS:
        with Engine(tm.model(arch), tm.tokenizer(), execution="padded", warmup=False, replicas=1) as masked:
            with tm.held(masked) as gate:  # one padded batch: probed
                futures = masked.submit_many(["a short text", "a short text here"])
                gate.release.set()
            [f.result(timeout=60) for f in futures]
            assert masked.runner.pads_leak is False, arch


@pytest.mark.parametrize("arch", ["mpnet", "t5", "modernbert"])
def test_other_families_one_thread_are_bitwise_the_same_in_any_company(tmp_path, arch, one_torch_thread):
    import st_models as sm

    folder = sm.save_encoder(arch, tmp_path / arch)
    with Engine(str(folder), policy="static", max_batch_tokens=8192, torch_threads=one_torch_thread) as e:
        assert e.stats()["execution"] == "packed" and e.stats()["family"] == arch
        got = probe_in_company(e)
    for name, v in got.items():
        np.testing.assert_array_equal(v, got["alone"], err_msg=name)


def test_a_model_that_pools_without_its_prompt_is_bitwise_the_same_beside_prompted_texts(tmp_path, one_torch_thread):
    # Pooling(include_prompt=False): a text without a prompt pooled through
    # the kernel alone, and through torch's pooling beside a prompted one.
    import st_models as sm

    folder = sm.save("bert", "prompts-excluded", tmp_path / "excluded")
    with Engine(str(folder), policy="static", max_batch_tokens=8192, torch_threads=one_torch_thread) as e:
        alone = e.embed([PROBE], prompt="")[0]
        with tm.held(e) as gate:
            probe = e.submit_many([PROBE], prompt="")
            e.submit_many(SHORT[:3])  # the model's default prompt
            gate.release.set()
        np.testing.assert_array_equal(probe[0].result(timeout=60), alone)


# A text of a few tokens alone is a product of 1 to 3 rows, which one
# thread's torch.mm computes with other bits than the same rows in a larger
# product: packed CPU batches run at least shapes.MIN_ROWS tokens.
TINY = ["ok", ""]


@pytest.mark.parametrize("gemm", ["onednn", "mm"])
def test_one_thread_fp32_a_text_of_a_few_tokens_is_bitwise_the_same_in_any_company(gemm, one_torch_thread,
                                                                                   monkeypatch):
    from fastserve import gemm as gemm_

    if gemm == "onednn" and not gemm_.onednn_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setenv("FASTSERVE_CPU_GEMM", gemm)
    with Engine(policy="static", max_batch_tokens=8192, torch_threads=one_torch_thread) as e:
        assert e.stats()["execution"] == "packed"
        for probe in TINY:
            got = probe_in_company(e, probe)
            for name, v in got.items():
                np.testing.assert_array_equal(v, got["alone"], err_msg=f"{probe!r} {name}")


@pytest.mark.parametrize("arch", ["mpnet", "t5"])
def test_other_families_one_thread_a_text_of_a_few_tokens_is_bitwise_the_same(tmp_path, arch, one_torch_thread):
    import st_models as sm

    folder = sm.save_encoder(arch, tmp_path / arch)
    with Engine(str(folder), policy="static", max_batch_tokens=8192, torch_threads=one_torch_thread) as e:
        for probe in TINY:
            got = probe_in_company(e, probe)
            for name, v in got.items():
                np.testing.assert_array_equal(v, got["alone"], err_msg=f"{probe!r} {name}")


def test_a_product_of_a_few_rows_gets_the_bits_of_a_larger_one(one_torch_thread):
    from fastserve import gemm

    torch.set_num_threads(one_torch_thread)
    torch.manual_seed(0)
    w, x = torch.randn(1152, 384), torch.randn(64, 384)
    whole = gemm.Gemm(w, "mm")(x)
    for rows in range(1, 6):
        assert torch.equal(gemm.Gemm(w, "mm")(x[:rows]), whole[:rows]), rows
