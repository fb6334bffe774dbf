"""What an Engine changes outside itself: a few process-wide settings and,
only when asked, a model object the caller passed in. Each effect is checked,
reported in `Engine.stats()["process"]`, and possible to turn off.

- torch's intra-op thread count (`torch.set_num_threads`), on the CPU: one
  thread per core the process may use, since the worker is the only heavy
  compute (on a GPU it is left alone unless torch_threads is given).
  torch's own default counts the machine's cores, not the process's CPU
  affinity. `Engine(torch_threads=0)` leaves it alone.
- glibc's malloc thresholds (`mallopt`), CPU only: each layer allocates and
  frees activations of tens of MB, which glibc serves with mmap and returns
  to the kernel on free, so the next batch page-faults them back in. Raising
  the mmap and trim thresholds keeps that memory in the heap; the cost is that
  the process keeps its peak heap. `Engine(tune_malloc=False)` opts out.
  Measured in benchmarks/README.md ("Process-wide settings").
- SDPA's backend switches, CUDA only: while a batch runs, cuDNN attention is
  off (it plans anew for every new shape, and serving batches change shape
  all the time; benchmarks/README.md, "GPU"). torch's switches are
  process-wide, so another thread's attention running at the same moment
  runs without cuDNN too. `Engine(cudnn_attention=True)` leaves them alone.
- oneDNN, CPU only: torch calls it for some float32 products and for bf16/fp16
  ones, and it caches a primitive (compiled kernels, reordered weights) per
  shape without bound, so RSS grows with every new batch size (about 300 MiB
  over 240 batch sizes for MiniLM in fp32, 870 MiB in bf16). A float32
  engine's batches run with torch's oneDNN switch off (MKL's GEMMs and
  torch's own kernels instead: as fast or faster there, and no cache), unless
  an engine in the process computes in bf16/fp16 on the CPU: those need
  oneDNN, and the switch is process-wide, so it is then left on. bf16/fp16
  batches are rounded up to a few token counts instead (shapes.py), unless
  every product over their tokens runs through gemm.py's pieces of fixed
  sizes (bfloat16's default where oneDNN runs it: onednn_buckets).
  `Engine(tune_onednn=False)` leaves the switch alone and pads nothing.
- The garbage collector's long-lived objects (`gc.freeze`): once built, the
  engine collects and then freezes what the process holds (torch's,
  transformers' and the model's Python objects: 421k with MiniLM loaded), so
  the collector's full passes skip them. A full pass over them took 311 ms on
  the 2-core AMD EPYC with the GIL held, stalling every thread: the worker,
  every caller, the server's event loop (one in every three requests of
  2,048 inputs stalled it 355-526 ms; at most 19-63 ms with the objects
  frozen: benchmarks/README.md, "Event-loop stalls").
  Frozen objects are never collected, so cycles among them stay until
  `gc.unfreeze()`; the caller's own objects alive then are frozen too.
  `Engine(freeze_gc=False)` leaves the collector alone.
- A model object the caller passed in is never changed behind their back:
  when serving needs it on another device or dtype, or in eval mode, the
  engine works on a copy. `Engine(copy_model=False)` changes it in place
  instead (no second copy in memory), and stats() says so. A shared model
  keeps its parameters as they were: the packed runners make Q, K and V
  views of one fused tensor only on a model the engine owns
  (runners.FusedQKV, own_weights). A shared model switched back to
  training mode fails its batches until eval() (Engine._compute), and a
  forward replaced by a closure over the caller's modules is refused
  where the engine copies the model (refuse_forwards_bound_to).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import gc
import os
import sys
import threading
import types
import warnings
from typing import Any, Callable

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Larger than any activation of a batch of a few thousand tokens of a
# base-size model. glibc refuses values it finds too large (mallopt returns
# 0), which keep_freed_memory checks.
MALLOC_THRESHOLD_BYTES = 1 << 30


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_torch_threads(requested: Any) -> None:
    if requested is not None and (not isinstance(requested, int) or isinstance(requested, bool) or requested < 0):
        raise ValueError(f"torch_threads must be None, 0 (leave torch's setting) or a positive int, got {requested!r}")


def set_torch_threads(requested: int | None) -> dict[str, Any]:
    """Set torch's intra-op threads: `requested`, or one per usable core when
    None; 0 leaves torch's setting alone. Reports what was there before and
    what torch now uses (read back, not assumed)."""
    check_torch_threads(requested)
    before = torch.get_num_threads()
    if requested == 0:
        return {"changed": False, "before": before, "now": before}
    n = usable_cores() if requested is None else requested
    torch.set_num_threads(n)
    now = torch.get_num_threads()
    if now != n:
        # stacklevel: the Engine(...) call (here, Engine.__init__, its refusal wrapper)
        warnings.warn(f"fastserve: asked torch for {n} threads, it uses {now}", RuntimeWarning, stacklevel=4)
    return {"changed": now != before, "before": before, "now": now}


def _mallopt() -> Callable[[int, int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        fn = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
    return fn


def freeze_gc() -> dict[str, Any]:
    """gc.collect(), then gc.freeze(): the objects alive now leave the
    collector's passes (module docstring). Its count is what stats() reports."""
    gc.collect()
    gc.freeze()
    return {"frozen": True, "objects": gc.get_freeze_count()}


def keep_freed_memory() -> dict[str, Any]:
    """Raise glibc's mmap and trim thresholds to MALLOC_THRESHOLD_BYTES, so
    freed activations stay in the heap for the next batch. mallopt returns 0
    when glibc refuses a value: that is reported and warned about, never
    assumed to have worked. Where there is no glibc mallopt, nothing changes."""
    mallopt = _mallopt()
    if mallopt is None:
        return {"tuned": False, "reason": "no glibc mallopt in this process"}
    accepted = {
        "mmap_threshold": bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_THRESHOLD_BYTES)),
        "trim_threshold": bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_THRESHOLD_BYTES)),
    }
    refused = [k for k, ok in accepted.items() if not ok]
    if refused:
        warnings.warn(
            f"fastserve: glibc refused mallopt for {', '.join(refused)} = {MALLOC_THRESHOLD_BYTES} bytes; "
            "freed activations may be returned to the kernel after each batch",
            RuntimeWarning,
            stacklevel=4,  # the Engine(...) call (here, Engine.__init__, its refusal wrapper)
        )
    return {"tuned": not refused, "threshold_bytes": MALLOC_THRESHOLD_BYTES, "accepted": accepted}


def sdpa_backends_for(device: torch.device, cudnn_attention: bool) -> tuple[Callable[[], Any], bool]:
    """The context a batch runs in and whether it switches SDPA's backends:
    on CUDA without cudnn_attention, flash, memory-efficient and math only."""
    if device.type != "cuda" or cudnn_attention:
        return contextlib.nullcontext, False
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return functools.partial(sdpa_kernel, backends), True


_onednn_lock = threading.Lock()
_onednn_back = threading.Condition(_onednn_lock)  # notified when the last float32 batch restores the switch
_onednn_users = 0  # live engines that compute in bf16/fp16 on the CPU: they need oneDNN
_onednn_off = 0  # float32 batches running with the switch off
_onednn_saved = True
_onednn_here = threading.local()  # .off: float32 batches this thread runs with the switch off
_onednn_forks = 0  # forks this process came through: a batch begun before one is not counted after it


def _onednn_after_fork_in_child() -> None:
    """A forked child runs none of its parent's batches or engines (they
    refuse work there, and their close() does nothing): it starts with the
    switch as the parent had it before its float32 batches, no registered
    users, and a lock no parent thread can be holding."""
    global _onednn_lock, _onednn_back, _onednn_users, _onednn_off, _onednn_here, _onednn_forks
    if _onednn_off:
        torch._C._set_mkldnn_enabled(_onednn_saved)
    _onednn_lock = threading.Lock()
    _onednn_back = threading.Condition(_onednn_lock)
    _onednn_users = _onednn_off = 0
    _onednn_here = threading.local()
    _onednn_forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_onednn_after_fork_in_child)


def onednn_buckets(device: torch.device, compute: torch.dtype, tune: bool, pieces: bool = False) -> bool:
    """Whether onednn_for turns oneDNN on for the engine with its packed
    batches rounded up to token buckets (shapes.py): CPU bfloat16/float16,
    unless `pieces`: every product over a batch's tokens runs through
    gemm.py's oneDNN pieces (the fused layers' products through "onednn",
    and no head over every token: Engine.__init__), which bound oneDNN's
    shape cache themselves (a bfloat16 MiniLM over 300 batches of random
    sizes: +12-18 MiB without buckets, +111-115 MiB through torch.mm with
    them, +755-804 MiB without; benchmarks/README.md, "bfloat16 products through
    oneDNN")."""
    return device.type == "cpu" and bool(tune) and compute != torch.float32 and not pieces


def onednn_for(device: torch.device, compute: torch.dtype, tune: bool,
               pieces: bool = False) -> tuple[Callable[[], Any], str]:
    """The context a batch runs in for oneDNN's switch, and what it does:
    "off per batch" (CPU float32), "on, token buckets" (CPU bf16/fp16: the
    engine registers as needing oneDNN; release with onednn_release), "on"
    (the same, the batches not rounded: onednn_buckets), "left alone, kept
    on" (CPU bf16/fp16 with tune=False: the engine changes nothing itself,
    but registers too, so that no float32 engine's batch turns oneDNN off
    under its products) or "left alone" (GPU, or float32 with tune=False)."""
    global _onednn_users
    if device.type != "cpu" or (compute == torch.float32 and not tune):
        return contextlib.nullcontext, "left alone"
    if compute != torch.float32:
        with _onednn_lock:
            _onednn_users += 1
            # No float32 batch turns the switch off from now on; one running
            # now has it off until it ends, and a bf16 product would then run
            # without oneDNN (other bits, and slower): wait for it to end,
            # unless it is this thread's (an engine built from a hook).
            if not getattr(_onednn_here, "off", 0):
                _onednn_back.wait_for(lambda: _onednn_off == 0)
        if not tune:
            return contextlib.nullcontext, "left alone, kept on"
        return contextlib.nullcontext, "on" if pieces else "on, token buckets"  # (onednn_buckets, here)
    return _onednn_off_context, "off per batch"


def onednn_release(what: str) -> None:
    """An engine that registered as needing oneDNN (onednn_for) is closed."""
    global _onednn_users
    if what in ("on, token buckets", "on", "left alone, kept on"):
        with _onednn_lock:
            _onednn_users -= 1


@contextlib.contextmanager
def _onednn_off_context():
    """oneDNN off while the batch runs, unless a bf16/fp16 engine needs it;
    batches of several engines may overlap: the first turns it off, the last
    restores what it was."""
    global _onednn_off, _onednn_saved
    forks = _onednn_forks
    with _onednn_lock:
        switch = _onednn_users == 0
        if switch:
            if _onednn_off == 0:
                _onednn_saved = torch._C._get_mkldnn_enabled()
                torch._C._set_mkldnn_enabled(False)
            _onednn_off += 1
            _onednn_here.off = getattr(_onednn_here, "off", 0) + 1
    try:
        yield
    finally:
        if switch and forks == _onednn_forks:  # (a child forked from inside the batch starts afresh)
            with _onednn_lock:
                _onednn_here.off -= 1
                _onednn_off -= 1
                if _onednn_off == 0:
                    torch._C._set_mkldnn_enabled(_onednn_saved)
                    _onednn_back.notify_all()


def needs_change(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    if any(m.training for m in model.modules()):
        return True
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # where "cuda" puts the inputs
    for t in (*model.parameters(), *model.buffers()):
        if t.device != device:
            return True
        if t.is_floating_point() and t.dtype != dtype:
            return True
    return False


def prepare_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, *,
                  callers: bool, copy_model: bool) -> tuple[torch.nn.Module, str]:
    """The model on `device` in `dtype` and eval mode, and what became of the
    object: "loaded" (the engine's own), "shared" (the caller's, unchanged),
    "copied" (the caller's left as it was) or "changed in place"."""
    if not callers:
        return model.to(device=device, dtype=dtype).eval(), "loaded"
    if not needs_change(model, device, dtype):
        return model, "shared"
    if copy_model:
        copied = copy.deepcopy(model)
        refuse_forwards_bound_to(model, copied)
        return copied.to(device=device, dtype=dtype).eval(), "copied"
    return model.to(device=device, dtype=dtype).eval(), "changed in place"


def refuse_forwards_bound_to(model: torch.nn.Module, copied: torch.nn.Module) -> None:
    """ValueError where a forward replaced on a module instance of `copied`
    (a deep copy of the caller's `model`) still reaches one of the caller's
    modules: a closure over `module.forward`, say, would call the caller's
    module (its weights, dtype, device and training mode) from the copy.
    deepcopy rebinds a bound method or a functools.partial of a module to
    the copy, so those pass; what a plain function reaches (closures,
    defaults, the globals its code names, nested functions', partials,
    containers and plain objects' attributes, a few levels deep) is looked
    into."""
    originals = {id(m) for m in model.modules()}
    for name, m in copied.named_modules():
        fn = m.__dict__.get("forward")
        if fn is not None and _reaches(fn, originals, depth=5, seen=set()):
            raise ValueError(
                f"module {name or type(m).__name__!r} has a forward replaced on the instance by a function that "
                "calls your model's modules; the engine serves a copy of this model (it needs another device, dtype "
                "or eval mode, or a pipeline places its stages), and that function would still call your modules "
                "from it. Convert the model first (model.to(device, dtype).eval()) so that the engine shares it, "
                "pass copy_model=False, or attach the change as a forward hook, which the copy carries")


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _reaches(obj: Any, targets: set[int], depth: int, seen: set[int]) -> bool:
    """Whether obj is, or reaches within `depth` steps, an object in targets (by id)."""
    if id(obj) in targets:
        return True
    if depth == 0 or id(obj) in seen or isinstance(obj, _OPAQUE):
        return False
    seen.add(id(obj))
    if isinstance(obj, types.MethodType):
        nxt: list[Any] = [obj.__self__, obj.__func__]
    elif isinstance(obj, functools.partial):
        nxt = [obj.func, *obj.args, *obj.keywords.values()]
    elif isinstance(obj, types.FunctionType):
        nxt = []
        for cell in obj.__closure__ or ():
            try:
                nxt.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        nxt += [obj.__globals__.get(n) for n in _code_names(obj.__code__)]
        nxt += list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
        nxt.append(getattr(obj, "__wrapped__", None))
    elif isinstance(obj, dict):
        nxt = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        nxt = list(obj)
    else:  # a plain object (an adapter holding the original forward, say): its attributes
        nxt = [getattr(obj, "__wrapped__", None), *getattr(obj, "__dict__", {}).values()]
    return any(_reaches(o, targets, depth - 1, seen) for o in nxt if o is not None)


# What _reaches does not look into: the model's own objects (a module or a
# tensor is a target or not by itself), modules and classes (their globals
# are reached through a function's names), and values that hold nothing.
_OPAQUE = (torch.nn.Module, torch.Tensor, types.ModuleType, type, str, bytes, bytearray, int, float, complex,
           bool)


# ------------------------------------------------------------ memory report

_PROC_STATUS = "/proc/self/status"


def parse_proc_status(text: str) -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) in bytes from the text of /proc/<pid>/status (each None
    where the line is absent or unreadable; the kernel writes them in kB)."""
    found: dict[str, int | None] = {"VmRSS": None, "VmHWM": None}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if sep and key in found:
            parts = rest.split()
            if parts and parts[0].isdigit():
                unit = parts[1].lower() if len(parts) > 1 else "kb"
                found[key] = int(parts[0]) * (1024 if unit == "kb" else 1)
    return found["VmRSS"], found["VmHWM"]


def _peak_rss_from_rusage() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and the BSDs, in bytes on macOS.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def rss_bytes() -> tuple[int | None, int | None]:
    """The process's current and peak resident memory in bytes: from
    /proc/self/status on Linux (one small read, cheap enough for every stats()
    call and scrape), else the peak from getrusage and no current value."""
    try:
        with open(_PROC_STATUS, encoding="ascii", errors="replace") as f:
            rss, peak = parse_proc_status(f.read())
    except OSError:
        rss, peak = None, None
    if peak is None:
        peak = _peak_rss_from_rusage()
    return rss, peak


def memory_report(device: torch.device) -> dict[str, int | None]:
    """stats()["memory"]: the process's RSS and peak RSS and, on a CUDA device,
    torch's allocated, reserved and peak allocated memory there (else None)."""
    rss, peak = rss_bytes()
    report: dict[str, int | None] = {"rss_bytes": rss, "peak_rss_bytes": peak, "cuda_allocated_bytes": None,
                                     "cuda_reserved_bytes": None, "cuda_peak_allocated_bytes": None}
    if device.type == "cuda" and torch.cuda.is_available():
        report["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated(device))
        report["cuda_reserved_bytes"] = int(torch.cuda.memory_reserved(device))
        report["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return report
