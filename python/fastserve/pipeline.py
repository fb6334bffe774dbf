"""Pipeline stages: a model's layers split over several devices, with a
batch in flight on each stage (Engine(..., parallel="pipeline")).

Stage k holds layers [k n / S, (k + 1) n / S) of the n layers, on the k-th
listed device; the embeddings, the head and anything outside the layer list
stay on the first device. The engine runs one worker per stage, each pulling
its own batches from the queue and running the whole model for it; a lock per
stage lets only one batch into a stage at a time. A batch takes stage k + 1's
lock before it lets go of stage k's (hand over hand), so batches go through
the stages in the order they entered the first one, none overtakes another,
and while batch i is in stage k, batch i + 1 can be in stage k - 1. At the
first layer of each stage the hidden states (and, for the Hugging Face
forward, every tensor a layer takes) move to that stage's device; after the
last layer they move back to the first device.

Which layers: the packed runner's own layer loop (BERT family) calls the
stage hook itself; for the padded runner (any Hugging Face encoder) the hooks
sit on the layer modules of the model's longest ModuleList. The other packed
families run their layers inside one forward with no hook, so they are
refused here (execution="padded" runs them in a pipeline)."""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable, Optional, Sequence

import torch

from .errors import StageError
from .runners import FusedQKV, PackedRunner


def stage_bounds(layers: int, stages: int) -> list[int]:
    """The first layer of each stage, and `layers` at the end: an even split
    (stage k has floor or ceil of layers / stages)."""
    if layers < stages:
        raise ValueError(f"parallel='pipeline': {stages} stages need at least {stages} layers, the model has {layers}")
    return [k * layers // stages for k in range(stages)] + [layers]


def _layer_list(module: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of layers: its longest ModuleList (the encoder's)."""
    lists = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"parallel='pipeline': found no layer list in {type(module).__name__}")
    return max(lists, key=len)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return type(obj)(*(_to(x, device) for x in obj)) if hasattr(obj, "_fields") else tuple(_to(x, device) for x in obj)
    if isinstance(obj, list):
        return [_to(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _place_rest(model: torch.nn.Module, layers: Sequence[torch.nn.Module], device: torch.device) -> None:
    """Every parameter and buffer outside `layers` onto `device` (the
    embeddings, norms and heads: the first stage's), leaving the layers where
    their stages put them."""
    inside = {id(t) for layer in layers for t in (*layer.parameters(), *layer.buffers())}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None and id(t) not in inside and t.device != device:
                    t.data = t.data.to(device)


def _pre_hook(runner: "weakref.ref[PipelineRunner]", layer: int) -> Callable:
    """The forward pre-hook of a padded layer past the first stage: the batch
    takes that stage, its inputs go to the stage's device."""
    stage = runner().stage_of(layer)
    dev = runner().devices[stage]

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        staged = runner()
        if staged is not None:  # (gone: the engine dropped, its hooks left on the model)
            staged._enter(stage)
        return _to(args, dev), _to(kwargs, dev)

    return hook


class PipelineRunner:
    """A runner whose layers run as pipeline stages. `run` is called by one
    worker per stage at once; the stage locks order them."""

    def __init__(self, runner: Any, devices: Sequence[torch.device], model: torch.nn.Module) -> None:
        # The hooks reach this runner through a weak reference: the model (or
        # the inner runner) pointing back at it would make a cycle, which
        # gc.freeze() would keep past close() (engine.py, process.freeze_gc).
        me = weakref.ref(self)
        self._handles: list[Any] = []
        self.inner = runner
        self.name = runner.name
        self.devices = list(devices)
        self.first = self.devices[0]
        S = len(self.devices)
        distinct = len({str(d) for d in self.devices}) > 1
        if getattr(runner, "attention", None) == "flash" and distinct:
            raise ValueError("parallel='pipeline' over several GPUs cannot run flash-attn's varlen kernel; set "
                             "FASTSERVE_PACKED_ATTENTION=pad or execution='padded'")
        if isinstance(runner, PackedRunner):
            layers: list[torch.nn.Module] = list(runner.blocks)
            self.bounds = stage_bounds(len(layers), S)
            for i, block in enumerate(layers):
                dev = self.devices[self.stage_of(i)]
                block.to(dev)
                qkv = runner.attn[i].qkv
                if qkv.own and qkv.tensors()[0].device != qkv.projections[0].weight.device:
                    # The moved Q/K/V parameters are no longer views of the
                    # fused tensors: fused again there, one copy.
                    runner.attn[i].qkv = FusedQKV(*qkv.projections, own=True)
            runner.stage_hook = lambda layer, h: me()._packed_hook(layer, h)  # noqa: E731
        elif getattr(runner, "name", None) == "padded":
            layers = list(_layer_list(runner.encoder))
            self.bounds = stage_bounds(len(layers), S)
            for i, layer in enumerate(layers):
                layer.to(self.devices[self.stage_of(i)])
                if self.stage_of(i) > 0:
                    self._handles.append(layer.register_forward_pre_hook(_pre_hook(me, i), with_kwargs=True))
            first = self.first
            self._handles.append(layers[-1].register_forward_hook(lambda mod, args, out: _to(out, first)))
        else:
            raise ValueError(f"parallel='pipeline' supports the BERT-family packed runner and the padded runner, "
                             f"not {type(runner).__name__} (use execution='padded')")
        self.layers = len(layers)
        _place_rest(model, layers, self.first)
        self._locks = [threading.Lock() for _ in self.devices]
        self._local = threading.local()
        self._stats_lock = threading.Lock()
        self.stage_batches = [0] * S
        self.stage_busy_s = [0.0] * S
        # Called as trace(stage, batch_seq) once the batch holds the stage (tests, debugging).
        self.trace: Optional[Callable[[int, int], None]] = None

    def __getattr__(self, name: str) -> Any:
        # kernels, attention, attention_batches, ...: the wrapped runner's.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def stage_of(self, layer: int) -> int:
        for k in range(len(self.devices)):
            if layer < self.bounds[k + 1]:
                return k
        raise IndexError(layer)

    def run(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        local = self._local
        self._locks[0].acquire()
        local.stage, local.seq, local.since = 0, int(getattr(batch, "seq", 0)), time.perf_counter()
        try:
            if self.trace is not None:
                self.trace(0, local.seq)
            return self.inner.run(batch, *args, **kwargs)
        except Exception as e:
            raise StageError(local.stage, self.devices[local.stage], e) from e
        finally:
            self._account(local.stage, time.perf_counter() - local.since)
            self._locks[local.stage].release()

    def _account(self, stage: int, seconds: float) -> None:
        with self._stats_lock:
            self.stage_batches[stage] += 1
            self.stage_busy_s[stage] += seconds

    def _enter(self, stage: int) -> None:
        """Hand over from the stage the batch holds to `stage`."""
        local = self._local
        held = getattr(local, "stage", None)
        if held is None or stage <= held:
            return  # (None: not a batch of this pipeline, e.g. the caller's own forward)
        for k in range(held + 1, stage + 1):
            self._locks[k].acquire()
            self._locks[k - 1].release()
            now = time.perf_counter()
            self._account(k - 1, now - local.since)
            local.stage, local.since = k, now
            if self.trace is not None:
                self.trace(k, local.seq)

    def _packed_hook(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if layer >= self.layers:
            return _to(h, self.first)
        stage = self.stage_of(layer)
        self._enter(stage)
        return _to(h, self.devices[stage])

    def close(self) -> None:
        """Take the stages' hooks off the model and the inner runner (the
        engine closed, or refused at construction): the model runs as a
        plain model again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.inner.stage_hook = None

    def report(self) -> dict[str, Any]:
        with self._stats_lock:
            return {
                "stages": [
                    {"stage": k, "device": str(d), "layers": [self.bounds[k], self.bounds[k + 1]],
                     "batches": self.stage_batches[k], "busy_s": self.stage_busy_s[k]}
                    for k, d in enumerate(self.devices)
                ],
            }
