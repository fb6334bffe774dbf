"""One API request in flight: its deadline, the watch on the client's
connection, and cancelling what it queued in the engine when it ends."""

import asyncio
import concurrent.futures as cf
import time
from typing import Optional

from ..errors import RequestTimeoutError
from .errors import ClientGone


class InFlight:
    """One API request in flight: its deadline, and a watch on the client's
    connection. Every wait goes through wait(), which gives up when the
    client leaves (ClientGone) or the deadline passes (RequestTimeoutError);
    close() then cancels whatever the request still has queued in the engine.

    Kept lean, since it runs on the event loop for every request: the watch is
    one pending receive() (re-armed if a message other than http.disconnect
    comes), the deadline one timer armed only while waiting, and a wait
    cancels the awaited future directly instead of racing it in
    asyncio.wait()."""

    def __init__(self, receive, timeout: Optional[float]) -> None:
        self.start = time.perf_counter()
        self.deadline = None if timeout is None else self.start + timeout
        self.futures: list[cf.Future] = []  # the engine's futures of its inputs, once queued
        self._receive = receive
        self._gone = False
        self._expired = False
        self._waiting: Optional[asyncio.Future] = None
        self._watch: Optional[asyncio.Future] = None
        self._arm()

    def _arm(self) -> None:
        self._watch = asyncio.ensure_future(self._receive())
        self._watch.add_done_callback(self._on_message)

    def _on_message(self, watch: asyncio.Future) -> None:
        if watch.cancelled():
            return
        if watch.exception() is not None or watch.result().get("type") == "http.disconnect":
            self._gone = True
            if self._waiting is not None:
                self._waiting.cancel()
        else:  # the body was replayed to a route; the next message is the disconnect
            self._arm()

    def _on_deadline(self) -> None:
        self._expired = True
        if self._waiting is not None:
            self._waiting.cancel()

    def remaining(self) -> Optional[float]:
        """Seconds left before the deadline (None without one);
        RequestTimeoutError once it has passed."""
        if self.deadline is None:
            return None
        left = self.deadline - time.perf_counter()
        if left <= 0:
            raise RequestTimeoutError("the request's deadline passed before it could be served")
        return left

    async def wait(self, awaitable):
        """Await `awaitable`, or give up (cancelling it) when the client
        leaves or the deadline passes. Takes ownership of `awaitable`: it is
        awaited or cancelled on every path, never dropped."""
        fut = asyncio.ensure_future(awaitable)
        if self._gone:
            _abandon(fut)
            raise ClientGone()
        try:
            left = self.remaining()  # raises once the deadline has passed
        except RequestTimeoutError:
            _abandon(fut)
            raise
        timer = None if left is None else asyncio.get_running_loop().call_later(left, self._on_deadline)
        self._waiting = fut
        try:
            return await fut
        except asyncio.CancelledError:
            if self._gone:
                raise ClientGone() from None
            if self._expired:
                raise RequestTimeoutError("the request's deadline passed before it could be served") from None
            raise  # the task itself was cancelled (server shutdown)
        finally:
            self._waiting = None
            if timer is not None:
                timer.cancel()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for f in self.futures:
            f.cancel()  # a no-op for done or running ones; a queued one leaves the queue

    def timing_headers(self, tokenize_s: float) -> dict[str, str]:
        """text-embeddings-inference's timing headers, in ms; for several
        inputs, the largest queue and inference time among them."""
        queue = inference = 0.0
        for f in self.futures:
            t = getattr(f, "timing", None)
            if t:
                queue = max(queue, t.get("queue_s", 0.0))
                inference = max(inference, t.get("inference_s", 0.0))
        return {
            "x-total-time": _ms(time.perf_counter() - self.start),
            "x-tokenization-time": _ms(tokenize_s),
            "x-queue-time": _ms(queue),
            "x-inference-time": _ms(inference),
        }


def _abandon(task: asyncio.Future) -> None:
    """Cancel a wait nobody will read; its outcome (a gather reports its
    children's cancellation as an exception) is consumed, not logged."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"
