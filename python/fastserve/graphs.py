"""CUDA graphs for the packed runner.

On a GPU a small batch is bound by launches, not arithmetic: BERT-base in
float16 answered one request in 3.6 ms on an H200, of which about 3.1 ms were
the model's ~200 kernel launches and the Python that issues them
(benchmarks/README.md, "GPU"). A CUDA graph records those launches once and
replays them with one call.

A graph has fixed shapes and addresses, so batches are rounded up to a ladder
of sizes and copied into the graph's own input buffer:

- the token count T to `shapes.bucket(T)` (steps of 16 tokens below 128, then
  eight sizes per doubling: at most 1/8 more tokens computed);
- the sequence count to a power of two.

The extra tokens form ghost sequences (pad ids, positions from the start, each
within the model's maximum length), and the sequence slots left after them
are empty (cu_seqlens repeats T). Attention is torch's variable-length flash
kernel over cu_seqlens, so no real token attends to a ghost, and every other
op works per token: a real token's output is what an eager batch gives it. The
graph's max_seqlen is the bucket's (capped at the model's maximum length): a
bound the kernel's grid covers, not a shape.

Graphs are captured lazily, the first time a shape is met (the engine's
warm-up batch captures the first), into one memory pool that they share: a
graph's output is read before the next replay, which is all sharing needs.
stats() reports how many were captured, the seconds and bytes of device
memory that took, and the batches replayed or run eagerly. A graph keeps the
addresses of the weights as they were at capture: a weight changed in place
(load_state_dict, copy_) is read by the next replay; a weight replaced by
another tensor, or Q/K/V unfused, drops every graph (they are captured again).
While a forward hook or a replaced forward is on one of the model's modules,
or autocast is on, batches run eagerly, so that what the caller attached runs.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import shapes
from .shapes import ghost_pieces

log = logging.getLogger("fastserve")

# The most graphs kept; the least recently used is dropped past it.
MAX_GRAPHS = 128
# One capture at a time in the process (torch's rule), whichever engine or
# replica captures.
_CAPTURING = threading.Lock()


def sequence_slots(sequences: int) -> int:
    """The sequence count a graph is captured for: the power of two >= sequences."""
    return 1 << max(0, int(sequences) - 1).bit_length()


class _Graph:
    """One captured forward: its host and device input buffers (token ids,
    positions, cu_seqlens as int64, one copy per batch), and its outputs."""

    def __init__(self, tokens: int, slots: int, device: torch.device) -> None:
        self.tokens, self.slots = tokens, slots
        n = 2 * tokens + slots + 1
        # Pinned: the copy to the device is asynchronous.
        self.host = torch.zeros(n, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.dev = torch.zeros(n, dtype=torch.int64, device=device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.hidden: Optional[torch.Tensor] = None  # [tokens, H]
        self.cu: Optional[torch.Tensor] = None  # [slots + 1] int32

    def fill(self, ids: np.ndarray, positions: np.ndarray, cu: np.ndarray, pad_id: int, max_length: int,
             position_offset: int) -> None:
        """Write a batch (its packed ids, positions and cu_seqlens) into the
        host buffer with its ghosts and empty slots, and copy it over."""
        T, S = self.tokens, self.slots
        buf = self.host.numpy()
        real = len(ids)
        pieces = ghost_pieces(T - real, max_length)
        buf[:real] = ids
        buf[real:T] = pad_id
        buf[T : T + real] = positions
        at = T + real
        for n in pieces:
            buf[at : at + n] = np.arange(position_offset, position_offset + n)
            at += n
        b = len(cu)
        buf[2 * T : 2 * T + b] = cu
        ends = real + np.cumsum(pieces, dtype=np.int64)
        buf[2 * T + b : 2 * T + b + len(pieces)] = ends
        buf[2 * T + b + len(pieces) :] = T
        self.dev.copy_(self.host, non_blocking=True)


class CudaGraphs:
    """The packed runner's graphs, by (tokens, sequence slots).

    forward(ids [T] int64, positions [T] int64, cu_seqlens [S + 1] int32,
    max_seqlen) -> hidden [T, H] is the runner's whole encoder, with no host
    sync and nothing that depends on the data on the host."""

    def __init__(self, forward: Callable[..., torch.Tensor], model: torch.nn.Module, device: torch.device, *,
                 pad_id: int, max_length: int, position_offset: int, max_tokens: int,
                 max_graphs: int = MAX_GRAPHS) -> None:
        from .runners import Stamps, _touched  # (runners imports this module)

        self.forward = forward
        self.device = device
        self.pad_id = pad_id
        self.max_length = max_length
        self.position_offset = position_offset
        self.max_tokens = max_tokens  # above it batches run eagerly
        self.max_graphs = max_graphs
        self._modules = list(model.modules())
        self._touched = _touched
        # Which tensor each parameter and buffer is, and where its data lives.
        self._stamps = Stamps([(m, name) for m in self._modules
                               for name in (*m._parameters, *m._buffers)], versions=False)
        self._graphs: collections.OrderedDict[tuple[int, int], _Graph] = collections.OrderedDict()
        self._pool: Any = None
        self._stream: Optional[torch.cuda.Stream] = None  # this object's capture stream, on its device
        self._failed: set[tuple[int, int]] = set()  # shapes whose capture raised: eager from then on
        self.lock = threading.Lock()
        self.captured = 0
        self.failed = 0
        self.last_capture_s = 0.0  # the capture time of the last run() (0: none)
        self.capture_s = 0.0
        self.capture_bytes = 0
        self.replays = 0
        self.eager = 0
        self.dropped = 0

    def shape(self, tokens: int, sequences: int) -> Optional[tuple[int, int]]:
        """The graph a batch runs in, or None (eager: too many tokens)."""
        if tokens > self.max_tokens or tokens <= 0:
            return None
        T = shapes.bucket(tokens)
        return T, sequence_slots(sequences + len(ghost_pieces(T - tokens, self.max_length)))

    def usable(self) -> bool:
        """Whether batches may replay now (else they run eagerly): no hook
        or replaced forward on any module, autocast off. Graphs made with
        weights since replaced are dropped."""
        if self._touched(self._modules) or torch.is_autocast_enabled("cuda"):
            return False
        if self._stamps.changed():
            self.drop()
            self._stamps.take()
        return True

    def drop(self) -> None:
        """Forget every graph (captured again as met)."""
        self.dropped += len(self._graphs)
        self._graphs.clear()

    def run(self, ids: np.ndarray, positions: np.ndarray, cu: np.ndarray) -> Optional[tuple[torch.Tensor,
                                                                                            torch.Tensor]]:
        """Replay the batch's graph (capturing it first if new): the real
        tokens' hidden states [T, H] and the batch's cu_seqlens [B + 1]
        (int32), views of the graph's outputs, valid until the next replay
        (hold `lock` until they are read). None: the batch is not for a graph."""
        self.last_capture_s = 0.0
        key = self.shape(len(ids), len(cu) - 1)
        if key is None or key in self._failed:
            self.eager += 1
            return None
        g = self._graphs.get(key)
        if g is None:
            g = _Graph(*key, self.device)
        else:
            self._graphs.move_to_end(key)
        g.fill(ids, positions, cu, self.pad_id, self.max_length, self.position_offset)
        if g.graph is None and not self._capture(g):  # warmed up and captured on this batch
            self.eager += 1
            return None
        with torch.cuda.device(self.device):
            g.graph.replay()
        self.replays += 1
        return g.hidden[: len(ids)], g.cu[: len(cu)]

    def _capture(self, g: _Graph) -> bool:
        """Capture g's forward, its input buffer holding a batch (which the
        warm-up run computes on). False where it raised: the shape runs
        eagerly from then on (counted in `failed`, logged once per shape)."""
        t0 = time.perf_counter()
        try:
            # The device and the stream set for the capture, put back however
            # it ends (torch's graph context leaves its capture stream current
            # where ending the capture raises).
            with torch.cuda.device(self.device), torch.cuda.stream(torch.cuda.current_stream(self.device)):
                with _CAPTURING:
                    self._capture_on_device(g)
        except Exception as e:  # noqa: BLE001 - the batch then runs eagerly
            self._failed.add((g.tokens, g.slots))
            self.failed += 1
            log.warning("CUDA graph capture failed for batches of %d tokens in %d sequence slots (%r); they run "
                        "without a graph", g.tokens, g.slots, e)
            return False
        finally:
            self.last_capture_s = time.perf_counter() - t0
            self.capture_s += self.last_capture_s
        return True

    def _capture_on_device(self, g: _Graph) -> None:
        before = torch.cuda.memory_reserved(self.device)
        tokens = g.tokens
        max_seqlen = min(tokens, self.max_length)

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            cu = g.dev[2 * tokens :].to(torch.int32)
            return self.forward(g.dev[:tokens], g.dev[tokens : 2 * tokens], cu, max_seqlen), cu

        # One eager run on a side stream first (cuBLAS and the allocator set
        # up outside the capture), as torch's graph notes advise.
        current = torch.cuda.current_stream(self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        side = self._stream
        side.wait_stream(current)
        with torch.cuda.stream(side):
            step()
        current.wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # On this object's own stream, on its device (torch's default capture
        # stream is one per process, made on whichever device was current);
        # thread_local: another worker's CUDA calls meanwhile are not refused.
        with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
            g.hidden, g.cu = step()
        g.graph = graph
        self._graphs[(tokens, g.slots)] = g
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
            self.dropped += 1
        self.captured += 1
        self.capture_bytes += max(0, torch.cuda.memory_reserved(self.device) - before)

    def stats(self) -> dict[str, Any]:
        return {
            "graphs": len(self._graphs),
            "captured": self.captured,
            "capture_s": round(self.capture_s, 4),
            "capture_bytes": self.capture_bytes,
            "failed": self.failed,
            "replays": self.replays,
            "eager": self.eager,
            "dropped": self.dropped,
            "max_tokens": self.max_tokens,
        }
