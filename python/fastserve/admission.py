"""Admission: how a call's inputs become queued requests.

Inputs are texts (tokenized by the engine) or token-id lists (checked by
validate_token_ids, the one validator for them). A list of inputs is queued in
order, many per scheduler call; when the queue is full, a call that has made
progress waits its turn instead of failing half served, and only a call with
nothing accepted yet is refused (QueueFullError).

Callers use Engine.submit_many / Engine.asubmit_many / Engine.validate_token_ids
and wait_all (exported as fastserve.wait_all); the functions below that take a
`submit` are the engine's plumbing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import math
import numbers
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np

from .errors import InvalidInputError

CHUNK = 4096  # a list's inputs queued per scheduler call (one lock: the worker sees them together)
PAUSE_S = 0.002  # a list waiting its turn behind other callers' inputs polls this often

# Seconds each input may wait in the queue: a number, None (no limit), or a
# callable returning either, asked as each chunk is queued (it may raise, e.g.
# RequestTimeoutError once a caller's own deadline has passed).
Timeout = Union[float, None, Callable[[], Union[float, None]]]
# Queues a prefix of token lists (as many as fit), returning their futures;
# QueueFullError when not even the first fits.
# submit(requests, priority, timeout, waiting=...): the accepted prefix's
# futures; with waiting=True an empty list where none fits (no refusal).
Submit = Callable[..., list[cf.Future]]

_INT = frozenset((int,))


class TokenLists(list):
    """Token-id lists already checked and truncated for one engine (what its
    tokenize and validate_token_ids return): submit_many queues them as they
    are, without checking every id again (on the HTTP server that check
    would run twice on the event loop)."""


def validate_token_ids(token_lists: Sequence[Any], *, vocab_size: int, max_length: int,
                       truncate: bool) -> list[Sequence[int]]:
    """Each token-id list checked (a sequence of int, not empty, every id in
    [0, vocab_size)) and cut to max_length (or, with truncate=False, refused
    when longer): InvalidInputError naming the first bad list's index. All are
    checked before any is queued, so a bad list late in a call never leaves
    earlier ones running for nothing."""
    if isinstance(token_lists, (str, bytes, bytearray)) or not isinstance(token_lists, Sequence):
        raise InvalidInputError(f"token ids must be given as a list of token-id lists, got {type(token_lists).__name__}")
    out = []
    for i, ids in enumerate(token_lists):
        # The common case (a list of plain ints in range) in C loops; anything
        # else gets the full check, which names what is wrong.
        if not (type(ids) is list and ids and _INT.issuperset(map(type, ids))
                and min(ids) >= 0 and max(ids) < vocab_size):
            ids = _check_token_ids(ids, where(i, len(token_lists)), vocab_size)
        if len(ids) > max_length:
            if not truncate:
                raise InvalidInputError(f"input{where(i, len(token_lists))} is {len(ids)} tokens long; "
                                        f"the model's limit is {max_length}")
            ids = ids[:max_length]
        out.append(ids)
    return TokenLists(out)


def in_vocabulary(token_lists: Sequence[Sequence[int]], vocab_size: int, why: str = "") -> None:
    """InvalidInputError for the first list holding an id outside [0,
    vocab_size) (lists already known to be non-empty lists of int: the
    tokenizer's, or TokenLists handed back, which a caller may have edited).
    An id past the model's embeddings would fail the whole batch it ran in,
    other callers' requests with it. `why`: what to add to the message."""
    for i, ids in enumerate(token_lists):
        if not isinstance(ids, (list, tuple)):  # an edit put an array (or else) there
            raise InvalidInputError(f"token ids{where(i, len(token_lists))} must be a list of int in a "
                                    f"TokenLists, got {type(ids).__name__}")
        try:
            outside = bool(ids) and (min(ids) < 0 or max(ids) >= vocab_size)
        except TypeError:  # an edit put other than ints there: the full check names it
            _check_token_ids(ids, where(i, len(token_lists)), vocab_size)
            raise
        if outside:
            bad = next(t for t in ids if t < 0 or t >= vocab_size)
            raise InvalidInputError(f"token id {bad}{where(i, len(token_lists))} is outside the model's "
                                    f"vocabulary [0, {vocab_size}){why}")


def where(i: int, n: int) -> str:
    """Where an input is, in an error message (nothing when it is alone)."""
    return "" if n == 1 else f" at index {i}"


def indexed(error: InvalidInputError, i: int, n: int) -> InvalidInputError:
    """`error`, about the input at index i of n, with that index attached
    (error.index; None when it is alone), so that a caller that passed a
    different list (rerank: the distinct documents) can name its own."""
    error.index = i if n != 1 else None  # type: ignore[attr-defined]
    return error


def reindexed(error: InvalidInputError, positions: Sequence[int]) -> InvalidInputError:
    """An error from indexed() about a list made from the caller's: the same
    error naming the caller's index, positions[error.index]."""
    i = getattr(error, "index", None)
    if i is None:
        return error
    out = InvalidInputError(str(error).replace(f" at index {i}", f" at index {positions[i]}", 1))
    out.index = positions[i]  # type: ignore[attr-defined]
    return out


def not_unicode(what: str, text: str) -> Optional[InvalidInputError]:
    """The error for a text that is not valid Unicode (a lone surrogate,
    which no UTF-8 can carry), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return InvalidInputError(f"{what} is not valid Unicode: a lone surrogate {text[e.start]!r} at character "
                                 f"{e.start} (no UTF-8 text can hold one)")
    return None


def untokenizable(what: str, texts: Sequence[Any], error: Exception) -> InvalidInputError:
    """The error for texts the tokenizer refused: the first one that is not
    valid Unicode named (a pair, a tuple of texts, by which of them), else
    the tokenizer's own message."""
    for i, t in enumerate(texts):
        parts = [("", t)] if isinstance(t, str) else [(f"'s {nth} text", p) for nth, p in zip(("first", "second"), t)]
        for part, text in parts:
            found = not_unicode(f"{what}{where(i, len(texts))}{part}", text)
            if found is not None:
                return indexed(found, i, len(texts))
    return InvalidInputError(f"{what} could not be tokenized: {error}")


def _check_token_ids(ids: Any, at: str, vocab_size: int) -> list[int]:
    """`ids` once checked (as given when its items are int; a 1-D integer
    numpy array or numpy integers, as tokenizers return them, as a list of
    int), else InvalidInputError naming what is wrong."""
    if isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype.kind in "iu":
        ids = ids.tolist()
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Sequence):
        raise InvalidInputError(f"token ids{at} must be a sequence of int, got {type(ids).__name__}")
    if not ids:
        raise InvalidInputError(f"token ids{at} must not be empty")
    types = set(map(type, ids))
    if not all(t is not bool and issubclass(t, (int, np.integer)) for t in types):  # bool refused
        raise InvalidInputError(f"token ids{at} must all be int")
    bad = next((t for t in ids if t < 0 or t >= vocab_size), None)
    if bad is not None:
        raise InvalidInputError(f"token id {bad}{at} is outside the vocabulary [0, {vocab_size}): token ids must be "
                                "the model's own, special tokens included, as its tokenizer gives them (a client "
                                "sending OpenAI's tiktoken ids, LangChain's OpenAIEmbeddings by default, should "
                                "send the texts)")
    # as given when they are ints (a pair's list keeps its segment), else as ints
    return ids if all(issubclass(t, int) for t in types) else [int(t) for t in ids]


def token_lists(inputs: Sequence[Any], tokenize: Callable[[Sequence[Any]], list[list[int]]],
                validate: Callable[[Sequence[Any]], list[Sequence[int]]], vocab_size: int) -> list[Sequence[int]]:
    """What a list of inputs queues: texts through `tokenize`, token-id lists
    through `validate`, TokenLists as they are once their ids are in the
    vocabulary. The first input says which the list holds; an input of the
    other kind is refused with its index."""
    if type(inputs) is TokenLists:
        in_vocabulary(inputs, vocab_size)
        return inputs
    if type(inputs) is not list:
        if isinstance(inputs, str):
            raise InvalidInputError("expected a list of inputs, got one str (submit() queues a single text)")
        if isinstance(inputs, (bytes, bytearray)) or not isinstance(inputs, Sequence):
            raise InvalidInputError(
                f"inputs must be a str, a list of str or a list of token-id lists, got {type(inputs).__name__}")
    if not inputs:
        return []
    first = inputs[0]
    if isinstance(first, str):
        return tokenize(inputs)
    if type(first) is not list and not isinstance(first, np.ndarray) and (
            isinstance(first, (bytes, bytearray)) or not isinstance(first, Sequence)):
        raise InvalidInputError(
            f"input{where(0, len(inputs))} must be a str or a sequence of int (token ids), got {type(first).__name__}")
    return validate(inputs)


def check_texts(texts: Any, call: str) -> None:
    """InvalidInputError unless `texts` is a list (a sequence) of inputs, not
    one str: what tokenize-like calls take (each text is checked later)."""
    if isinstance(texts, str):
        raise InvalidInputError(f"{call} takes a list of texts, got one str")
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise InvalidInputError(f"{call} takes a list of texts, got {type(texts).__name__}")


def check_timeout(timeout: float | None) -> float | None:
    """A request's timeout in seconds: None (no limit) or a number >= 0
    (else InvalidInputError, a ValueError)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise InvalidInputError(f"timeout must be a number of seconds, got {type(timeout).__name__}")
    if not timeout >= 0:
        raise InvalidInputError(f"timeout must be >= 0 seconds, got {timeout!r}")
    return seconds(timeout)


def seconds(value: numbers.Real) -> float:
    """A real number of seconds as a float (what the scheduler takes): an
    int past the float range is inf, no limit, as math.inf is."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


PRIORITY_RANGE = (-(1 << 31), (1 << 31) - 1)  # the scheduler's int


def check_priority(priority: Any) -> int:
    """A request's priority: an int within the scheduler's range (a bool is
    refused), else InvalidInputError."""
    if isinstance(priority, bool) or not isinstance(priority, numbers.Integral):
        raise InvalidInputError(f"priority must be an int, got {type(priority).__name__}")
    lo, hi = PRIORITY_RANGE
    if not lo <= priority <= hi:
        raise InvalidInputError(f"priority must be within [{lo}, {hi}], got {priority}")
    return int(priority)


def timeout_callable(timeout: Timeout) -> Callable[[], float | None]:
    """`timeout` as a callable (a number is checked once, then returned each time)."""
    if callable(timeout):
        return timeout
    seconds = check_timeout(timeout)
    return lambda: seconds


class Prepare:
    """What _admit yields before it slices requests that a LazyRequests has
    not made yet: `run()` makes them (tokenizes them), in the caller's
    thread (submit_all) or a worker thread (asubmit_all: the event loop
    goes on meanwhile)."""

    def __init__(self, run: Callable[[], None]) -> None:
        self.run = run


def _admit(submit: Submit, requests: Sequence[Sequence[int]], futures: list[cf.Future], priority: int,
           timeout: Callable[[], float | None]) -> Iterator[cf.Future | Prepare | None]:
    """Queue `requests` in order, appending each one's future to `futures`,
    up to CHUNK per scheduler call. Where `requests` makes its items as they
    are asked for (`prepare(stop)`, `ready(stop)` and its `piece` size:
    engine._TokenizedPieces), up to a piece per call, and a Prepare for the
    next piece is yielded first, to be run by the caller.
    When the queue is full and nothing was accepted yet: QueueFullError
    (the call is refused whole). Once something
    was, the caller waits its turn: for the yielded future (its own oldest
    outstanding input; its failure fails the call) or, when None is yielded
    (its inputs so far are done and others' fill the queue), for PAUSE_S;
    then iterates on."""
    oldest = pos = 0
    lazy = callable(getattr(requests, "prepare", None))
    step = requests.piece if lazy else CHUNK  # type: ignore[attr-defined]
    while pos < len(requests):
        if lazy and not requests.ready(pos + step):  # type: ignore[attr-defined]
            yield Prepare(functools.partial(requests.prepare, pos + step))  # type: ignore[attr-defined]
        # Once part of the list is queued, a full queue is a wait, not a
        # refusal: the scheduler then neither raises nor counts one.
        new = submit(requests[pos : pos + step], priority, check_timeout(timeout()), waiting=bool(futures))
        if not new:
            if oldest == len(futures):
                yield None
            else:
                oldest += 1
                yield futures[oldest - 1]
            continue
        futures.extend(new)
        pos += len(new)


def _cancel(futures: list[cf.Future]) -> None:
    for f in futures:
        f.cancel()  # a no-op for a done or running one; a queued one leaves the queue


def submit_all(submit: Submit, requests: Sequence[Sequence[int]], priority: int,
               timeout: Callable[[], float | None],
               before_wait: Callable[[], None] | None = None) -> list[cf.Future]:
    """Queue every request (_admit), blocking while the call waits its turn
    (calling `before_wait` first, which may raise instead); a call that fails
    part way (lazy requests failing to make a piece, too) cancels what it had
    queued."""
    futures: list[cf.Future] = []
    try:
        for turn in _admit(submit, requests, futures, priority, timeout):
            if isinstance(turn, Prepare):
                turn.run()
                continue
            if before_wait is not None:
                before_wait()
            if turn is None:
                time.sleep(PAUSE_S)
            else:
                turn.result()  # its failure fails the call
    except BaseException:
        _cancel(futures)
        raise
    return futures


async def asubmit_all(submit: Submit, requests: Sequence[Sequence[int]], priority: int,
                      timeout: Callable[[], float | None],
                      wait: Callable[[Awaitable[Any]], Awaitable[Any]] | None) -> list[cf.Future]:
    """submit_all awaiting its turn instead of blocking (through `wait` when
    given), and awaiting requests made as they are asked for (each Prepare
    runs in a worker thread: a list's tokenizing never blocks the loop); a
    call that fails part way, or is cancelled, cancels what it had queued. A
    call the queue takes at once, of requests made beforehand, never
    suspends."""
    futures: list[cf.Future] = []
    aw: Optional[asyncio.Future] = None
    try:
        for turn in _admit(submit, requests, futures, priority, timeout):
            if isinstance(turn, Prepare):
                await asyncio.to_thread(turn.run)
                continue
            # A future this call owns: a `wait` hook that gives up without
            # awaiting it leaves nothing unawaited or unretrieved behind.
            aw = asyncio.ensure_future(asyncio.sleep(PAUSE_S)) if turn is None else asyncio.wrap_future(turn)
            await (aw if wait is None else wait(aw))
    except BaseException:
        _cancel(futures)
        if aw is not None and not aw.cancel() and not aw.cancelled():
            aw.exception()  # done: its outcome read, so asyncio does not log it as never retrieved
        raise
    return futures


def result_of(future: cf.Future) -> Any:
    """One request's result (a single-input call's answer); a wait that is
    interrupted (KeyboardInterrupt) or fails cancels the request if it is
    still queued, as results_of does for a list."""
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


def results_of(futures: Sequence[cf.Future]) -> list[Any]:
    """Each future's result, in order (a list call's answer). When one
    fails, the call has failed: those of its inputs still queued are
    cancelled, so the model does not run work nobody will read, and the
    failure is raised."""
    futures = list(futures)
    try:
        # The first failure whichever input it is, not once those before it are done.
        done = cf.wait(futures, return_when=cf.FIRST_EXCEPTION).done
        for f in futures:
            if f in done and not f.cancelled() and f.exception() is not None:
                f.result()  # raises it
        return [f.result() for f in futures]
    except BaseException:
        _cancel(futures)
        raise


async def all_results(futures: Sequence[cf.Future]) -> list[Any]:
    """wait_all(futures), awaited, cancelling the rest when it fails (as results_of)."""
    try:
        return await wait_all(futures)
    except BaseException:
        _cancel(futures)
        raise


def wait_all(futures: Sequence[cf.Future]) -> asyncio.Future:
    """An asyncio future (of the running loop) for a group of the engine's
    futures: it resolves to their results, in order, once all are done, or
    fails with the first failure as soon as it happens (cancelled if one of
    them is). Cancelling it cancels those not yet done.

    It is settled by whichever thread completes the group: one event-loop
    wake-up for the whole group, not one per future as with
    gather(wrap_future(...))."""
    loop = asyncio.get_running_loop()
    group = loop.create_future()
    futures = list(futures)
    left = [len(futures)]
    lock = threading.Lock()

    def settle(error: BaseException | None) -> None:
        if group.done():
            return
        if error is None:  # the last one is done (a failure just before it may not have settled yet)
            try:
                results = [f.result() for f in futures]
            except BaseException as e:  # noqa: BLE001 - becomes the group's outcome
                error = e
        if isinstance(error, cf.CancelledError):
            group.cancel()  # on_cancel cancels the rest
            return
        # on_cancel is for a cancelled group only: removed, it is not scheduled for nothing.
        group.remove_done_callback(on_cancel)
        if error is None:
            group.set_result(results)
        else:
            group.set_exception(error)

    def on_done(f: cf.Future) -> None:
        error = cf.CancelledError() if f.cancelled() else f.exception()
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if (last or error is not None) and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(settle, error)
            except RuntimeError:  # the loop closed since the check: nobody is left to tell
                pass

    def on_cancel(g: asyncio.Future) -> None:
        if g.cancelled():
            _cancel(futures)

    group.add_done_callback(on_cancel)
    if not futures:
        settle(None)
    for f in futures:
        f.add_done_callback(on_done)
    return group
