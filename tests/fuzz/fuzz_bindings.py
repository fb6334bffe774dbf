"""Coverage-guided fuzzing (atheris) of fastserve's native bindings with
malformed input: the scheduler's submit/cancel/next_batch/complete/close with
arrays of every dtype, shape and range, and the kernels with wrong dtypes,
negative or inconsistent lengths, huge sizes and non-contiguous memory.

A typed Python error (ValueError, TypeError, MemoryError for an output too
large to allocate, QueueFullError, EngineClosedError) is a pass; any other exception, a crash or a sanitizer
report is a finding.

    python tests/fuzz/fuzz_bindings.py -atheris_runs=20000    # short (CI)
    python tests/fuzz/fuzz_bindings.py                        # until stopped
"""

from __future__ import annotations

import sys

import atheris
import numpy as np
import torch  # not instrumented: instrumenting torch's Python takes a minute

with atheris.instrument_imports(include=["fastserve"]):
    import fastserve
    from fastserve import _core, kernels

ALLOWED = (ValueError, TypeError, MemoryError, fastserve.QueueFullError, fastserve.EngineClosedError)
INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32, np.uint64]
ARRAY_DTYPES = INT_DTYPES + [np.float32, np.float64, np.bool_, object]
TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8, torch.float64]


def token_array(fdp: atheris.FuzzedDataProvider):
    kind = fdp.ConsumeIntInRange(0, 5)
    n = fdp.ConsumeIntInRange(0, 40)
    if kind == 0:  # a plain list of arbitrary Python ints
        return [fdp.ConsumeIntInRange(-(2**70), 2**70) for _ in range(n)]
    if kind == 1:  # a list of floats or mixed values
        return [fdp.ConsumeFloat() if fdp.ConsumeBool() else fdp.ConsumeInt(4) for _ in range(n)]
    if kind == 2:  # a scalar or a nested list
        return fdp.ConsumeInt(8) if fdp.ConsumeBool() else [[fdp.ConsumeInt(2)] * n] * fdp.ConsumeIntInRange(0, 3)
    dtype = fdp.PickValueInList(ARRAY_DTYPES)
    raw = np.frombuffer(fdp.ConsumeBytes(n * 8).ljust(n * 8, b"\0"), dtype=np.uint8)
    if dtype is object:
        return np.array([int(v) << fdp.ConsumeIntInRange(0, 80) for v in raw[:n]], dtype=object)
    arr = raw.view(np.uint8).astype(dtype) if dtype in (np.float32, np.float64, np.bool_) else raw[: n * np.dtype(dtype).itemsize].view(dtype)
    if kind == 4 and arr.size >= 2:
        arr = arr[:: fdp.ConsumeIntInRange(1, 3)]  # non-contiguous view
    if kind == 5 and arr.size >= 4:
        arr = arr[: arr.size // 2 * 2].reshape(2, -1)  # wrong rank
    return arr


def fuzz_scheduler(fdp: atheris.FuzzedDataProvider) -> None:
    clock = _core.ManualClock(0.0)
    cfg = _core.SchedulerConfig(
        max_queue_requests=fdp.ConsumeIntInRange(1, 16),
        max_queue_tokens=fdp.ConsumeIntInRange(1, 400),
        max_batch_size=fdp.ConsumeIntInRange(1, 8),
        max_request_tokens=fdp.ConsumeIntInRange(1, 64),
        cost=fdp.PickValueInList(["padded", "packed"]),
    )
    ctl = _core.ControllerConfig(policy=fdp.PickValueInList(["static", "aimd", "seed", "model"]),
                                 min_tokens=1, max_tokens=fdp.ConsumeIntInRange(1, 256))
    sched = _core.Scheduler(cfg, ctl, clock)
    ids: list[int] = []
    for _ in range(fdp.ConsumeIntInRange(1, 30)):
        op = fdp.ConsumeIntInRange(0, 6)
        try:
            if op <= 2:
                timeout = fdp.PickValueInList([None, 0.0, 0.01, 1.0, -1.0, float("nan"), float("inf")])
                ids.append(sched.submit(token_array(fdp), fdp.ConsumeIntInRange(-5, 5), timeout))
            elif op == 3:
                sched.cancel(fdp.PickValueInList(ids) if ids and fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 2**64 - 1))
            elif op == 4:
                clock.advance(fdp.ConsumeFloatInRange(0.0, 2.0))
            elif op == 5:
                batch = sched.next_batch(0.0)
                if batch is not None:
                    padded, packed = batch.input_ids, batch.packed_input_ids
                    assert padded.shape == (batch.size, batch.max_seqlen)
                    assert packed.shape == (batch.total_tokens,)
                    assert int(batch.cu_seqlens[-1]) == batch.total_tokens
                    (sched.complete(batch, fdp.ConsumeFloatInRange(0.0, 1.0)) if fdp.ConsumeBool() else sched.fail(batch))
            else:
                left = sched.close()
                assert len(left) <= cfg.max_queue_requests
        except ALLOWED:
            pass
    sched.stats()
    sched.close()


def tensor(fdp: atheris.FuzzedDataProvider, dims: int, max_side: int = 9) -> torch.Tensor:
    shape = [fdp.ConsumeIntInRange(0, max_side) for _ in range(dims)]
    dtype = fdp.PickValueInList(TORCH_DTYPES)
    t = torch.zeros(shape, dtype=torch.float64).uniform_(-3, 3).to(dtype) if dtype.is_floating_point else torch.randint(-3, 12, shape).to(dtype)
    if fdp.ConsumeIntInRange(0, 4) == 0 and t.dim() >= 1 and t.shape[-1] > 1:
        t = t[..., ::2]  # non-contiguous
    return t


def fuzz_kernels(fdp: atheris.FuzzedDataProvider) -> None:
    op = fdp.ConsumeIntInRange(0, 3)
    try:
        if op == 0:
            x = tensor(fdp, fdp.ConsumeIntInRange(1, 4))
            kernels.pack(x, tensor(fdp, 1, 10), total=fdp.PickValueInList([None, -1, 0, 3, 2**62]))
        elif op == 1:
            kernels.unpack(tensor(fdp, fdp.ConsumeIntInRange(1, 3), 12), tensor(fdp, 1, 10),
                           fdp.PickValueInList([None, -1, 0, 4, 2**40]))
        elif op == 2:
            kernels.segment_pool(tensor(fdp, fdp.ConsumeIntInRange(1, 3), 12), tensor(fdp, 1, 10),
                                 mode=fdp.PickValueInList(["mean", "cls", "max", "sum"]), normalize=fdp.ConsumeBool())
        else:
            kernels.gather(tensor(fdp, fdp.ConsumeIntInRange(1, 3)), tensor(fdp, 1, 12))
    except ALLOWED:
        pass


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        fuzz_scheduler(fdp)
    else:
        fuzz_kernels(fdp)


def main() -> None:
    torch.set_num_threads(1)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
