"""Numeric precision of an Engine: the weights' dtype, whether the model runs
under autocast, and the CPU features that decide whether bfloat16 is fast.

    dtype="auto"      float32 on the CPU (exact parity with sentence-transformers),
                      bfloat16 or float16 on a GPU
    dtype="float32" | "float16" | "bfloat16"   weights and activations in that dtype
    dtype="autocast"  float32 weights, matrix products in bfloat16 under
                      torch.autocast (float16 on a GPU without bfloat16):
                      closer to float32 than bfloat16 weights, nearly as fast

Pooling, normalisation and classification scores are computed in float32
whatever the dtype (runners.py, kernels.segment_pool).

bfloat16 is fast on a CPU with AVX512-BF16 or AMX (oneDNN runs the GEMMs in
hardware); elsewhere torch emulates it through float32 conversions, slower
than float32 itself. A bfloat16 or autocast request on such a CPU runs and
warns once, with the factor measured in benchmarks/README.md ("CPU dtypes");
so does float16 on a CPU without AVX512-FP16 or AMX-FP16.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

DTYPES = ("auto", "float32", "float16", "bfloat16", "autocast")

# CPU flags (as /proc/cpuinfo names them) that stats() reports.
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16",
                  "amx_int8")

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) under which it uses
# no bfloat16 instructions even when the CPU has them.
_ISA_WITHOUT_BF16 = ("sse41", "avx", "avx2", "avx2_vnni", "avx512_core", "avx512_core_vnni")
_ISA_WITHOUT_FP16 = _ISA_WITHOUT_BF16 + ("avx2_vnni_2", "avx512_core_bf16")

# bfloat16 / float32 time per batch on a CPU without native bfloat16
# (benchmarks/README.md, "CPU dtypes"): 4.9-6.9x on an AVX2 AMD EPYC (no
# AVX-512), 9.2x on an AMX Xeon with oneDNN and ATen capped to AVX2.
EMULATED_BF16_SLOWDOWN = "about 5-9x"
# float16 / float32 on a CPU without AVX512-FP16 or AMX-FP16, on the AVX2
# AMD EPYC: 5.7x and 6.1x (cpu_dtype.py's emulated run, 128 texts), 4.0x and
# 6.3x (200 texts) (benchmarks/README.md, "CPU dtypes").
EMULATED_FP16_SLOWDOWN = "about 4-6x"


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[frozenset[str] | None, str | None]:
    """The CPU's feature flags and vendor (GenuineIntel, AuthenticAMD, ...)
    from /proc/cpuinfo, None where there is none."""
    flags: frozenset[str] | None = None
    vendor: str | None = None
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                key = key.strip()
                if sep and key == "vendor_id" and vendor is None:
                    vendor = value.strip()
                elif sep and key == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return flags, vendor


def _cpuinfo_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, None where there is none."""
    return _cpuinfo()[0]


def cpu_features() -> dict[str, Any]:
    """What this CPU offers for serving, detected at run time: torch's ATen
    capability (the SIMD level its own kernels dispatch to), the relevant
    /proc/cpuinfo flags (None where unreadable), any oneDNN ISA cap in the
    environment, and native_bf16: True when the CPU has AVX512-BF16 or AMX-BF16
    and oneDNN is not capped below them, False when it lacks them, None when
    the flags cannot be read; kernel_isa: the widest path of fastserve's own
    CPU layer kernels here (kernels.cpu_isa); vendor: /proc/cpuinfo's vendor_id
    (None where unreadable)."""
    from fastserve import kernels

    flags = _cpuinfo_flags()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or None
    native: bool | None = None
    native_fp16: bool | None = None
    if flags is not None:
        native = bool({"avx512_bf16", "amx_bf16"} & flags) and (cap or "").lower() not in _ISA_WITHOUT_BF16
        native_fp16 = bool({"avx512_fp16", "amx_fp16"} & flags) and (cap or "").lower() not in _ISA_WITHOUT_FP16
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "flags": None if flags is None else [f for f in REPORTED_FLAGS if f in flags],
        "onednn_max_isa": cap,
        "native_bf16": native,
        "native_fp16": native_fp16,
        # AMX in use: the CPU has it and oneDNN is not capped below it (caps
        # that allow it name it: AVX512_CORE_AMX, AVX10_1_512_AMX_FP16, ...).
        "amx": None if flags is None else ("amx_bf16" in flags and (cap is None or cap.lower() in ("all", "default")
                                                                    or "amx" in cap.lower())),
        "kernel_isa": kernels.cpu_isa(),
        "vendor": _cpuinfo()[1],
    }


@dataclass(frozen=True)
class Precision:
    """weights: the model's dtype; autocast: the dtype autocast runs matrix
    products in, None without autocast; name: what the caller asked for, resolved."""

    name: str
    weights: torch.dtype
    autocast: torch.dtype | None
    device: torch.device

    def context(self) -> Callable[[], Any]:
        """A factory of the context each batch runs in."""
        if self.autocast is None:
            return contextlib.nullcontext
        return functools.partial(torch.autocast, device_type=self.device.type, dtype=self.autocast)

    @property
    def compute(self) -> torch.dtype:
        return self.autocast or self.weights


def _half_for(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def check_dtype(dtype: Any) -> None:
    """ValueError unless dtype is one of Engine's DTYPES."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def resolve(dtype: str, device: torch.device) -> Precision:
    """The Precision for Engine(dtype=...), without side effects."""
    check_dtype(dtype)
    if dtype == "auto":
        weights = torch.float32 if device.type == "cpu" else _half_for(device)
        return Precision(str(weights).removeprefix("torch."), weights, None, device)
    if dtype == "autocast":
        return Precision("autocast", torch.float32, _half_for(device), device)
    weights = getattr(torch, dtype)
    return Precision(dtype, weights, None, device)


_HALF = {torch.bfloat16: ("bfloat16", "native_bf16", "AVX512-BF16 or AMX", EMULATED_BF16_SLOWDOWN,
                          ("avx512_bf16", "amx_bf16")),
         torch.float16: ("float16", "native_fp16", "AVX512-FP16 or AMX-FP16", EMULATED_FP16_SLOWDOWN,
                         ("avx512_fp16", "amx_fp16"))}


def emulated(p: Precision) -> bool:
    """Whether a CPU engine's products run in bfloat16 or float16 on a CPU
    without that dtype in hardware (emulated: several times float32's time)."""
    return p.device.type == "cpu" and p.compute in _HALF and cpu_features()[_HALF[p.compute][1]] is False


def warn_if_slow(p: Precision, stacklevel: int = 4) -> str | None:
    """Warn when a CPU engine computes in bfloat16 or float16 on a CPU
    without that dtype in hardware (it runs, emulated); the warning's text,
    or None."""
    if not emulated(p):
        return None
    name, _, hardware, slowdown, hardware_flags = _HALF[p.compute]
    feats = cpu_features()
    # The cap is the reason only where the CPU has the instructions (an AMX
    # cap on a CPU without them changes nothing).
    has = bool(set(hardware_flags) & set(feats["flags"] or ()))
    why = f"runs oneDNN capped at ONEDNN_MAX_CPU_ISA={feats['onednn_max_isa']}" if has else f"has no {hardware}"
    msg = (f"fastserve: dtype={p.name!r} on a CPU that {why}: {name} is emulated there and runs "
           f"{slowdown} slower than float32; use dtype='float32' (the default) on this CPU")
    warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)
    return msg
