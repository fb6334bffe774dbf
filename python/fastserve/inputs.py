"""Inputs longer than the model's limit: cut on the right or the left,
refused, or split into windows ("chunk"), each window its own request.

Texts are tokenized whole (special tokens added, nothing cut); Fit then does
what the engine's `truncate` says. The cut keeps the tokenizer's special
tokens: the content between the template's prefix and suffix ([CLS] ... [SEP]
for BERT) is cut, as the tokenizer's own truncation does, so an input's full
length is known (InputInfo) without tokenizing it twice. A window is built the
same way: prefix + a slice of the content + suffix.

A chunked input's result is the token-count-weighted mean of its windows'
pooled outputs, normalised when the model normalises (docs/design.md, "Long
inputs").
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from .admission import TokenLists, where
from .errors import InvalidInputError

TRUNCATIONS = ("right", "left", "error", "chunk")


def truncation_mode(truncate: Any) -> str:
    """`truncate` as one of TRUNCATIONS (True is "right", False "error";
    an Engine then makes True its tokenizer's own truncation_side)."""
    if truncate is True:
        return "right"
    if truncate is False:
        return "error"
    if isinstance(truncate, str) and truncate in TRUNCATIONS:
        return truncate
    raise ValueError(f"truncate must be one of {TRUNCATIONS} (or True/False), got {truncate!r}")


class InputInfo(NamedTuple):
    """What became of one input: its full length in tokens (special tokens
    included), the tokens the model ran over for it (every window's, so with
    chunk_overlap more than `tokens`), whether it was cut, and how many
    windows it ran as (1 unless chunked)."""

    tokens: int
    computed_tokens: int
    truncated: bool
    chunks: int


class Template(NamedTuple):
    """The special tokens the tokenizer puts around one text's content."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]

    @classmethod
    def detect(cls, tokenizer: Any) -> Optional["Template"]:
        """Found by tokenizing probe texts with and without special tokens:
        None unless every probe is prefix + content + suffix with the same
        prefix and suffix."""
        found = None
        for probe in ("a", "Hello, world!", "two words"):
            try:
                full = tokenizer(probe, add_special_tokens=True)["input_ids"]
                bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
            except Exception:  # an unusual tokenizer: no template
                return None
            n = len(full) - len(bare)
            starts = [i for i in range(n + 1) if full[i : i + len(bare)] == bare] if bare else []
            if len(starts) != 1:
                return None
            t = cls(tuple(full[: starts[0]]), tuple(full[starts[0] + len(bare) :]))
            if found is not None and t != found:
                return None
            found = t
        return found

    def content(self, ids: Sequence[int]) -> tuple[Sequence[int], Sequence[int], Sequence[int]]:
        """(prefix, content, suffix) of ids; an input that does not carry the
        template (token ids a caller made) is all content."""
        p, s = len(self.prefix), len(self.suffix)
        if (len(ids) >= p + s and tuple(ids[:p]) == self.prefix
                and (s == 0 or tuple(ids[len(ids) - s :]) == self.suffix)):
            return ids[:p], ids[p : len(ids) - s], ids[len(ids) - s :] if s else []
        return [], ids, []


class Fit:
    """What one engine does with an input past max_length (its `truncate`)."""

    def __init__(self, mode: str, max_length: int, *, template: Optional[Template], overlap: int = 0,
                 retokenize: Optional[Callable[[list[str]], list[list[int]]]] = None) -> None:
        self.mode = mode
        self.max_length = max_length
        self.template = template
        self.overlap = overlap
        # Texts cut by the tokenizer itself, where no template was found.
        self.retokenize = retokenize
        if template is not None and max_length <= len(template.prefix) + len(template.suffix):
            # No room for one token of text: every text would be refused (or
            # cut to more than max_length).
            raise ValueError(f"max_length={max_length} leaves no room for text: the tokenizer's special tokens "
                             f"alone take {len(template.prefix) + len(template.suffix)}")
        if mode == "chunk":
            if template is None:
                raise ValueError("truncate='chunk' needs a tokenizer that puts its special tokens around the "
                                 "text (none was found for this one)")
            room = max_length - len(template.prefix) - len(template.suffix)
            if not 0 <= overlap < room:
                raise ValueError(f"chunk_overlap must be in [0, {room}) for max_length={max_length}, got {overlap}")

    @property
    def room(self) -> int:
        """Content tokens per window (max_length less the special tokens)."""
        t = self.template
        return self.max_length - len(t.prefix) - len(t.suffix) if t else self.max_length

    def fit(self, lists: list[Sequence[int]], texts: Optional[Sequence[str]] = None,
            what: str = "text", lead: int = 0) -> TokenLists:
        """Token lists as the engine queues them, with `.infos`: cut (right,
        left), refused (error: InvalidInputError naming the first too long
        one), or left whole for submit to split (chunk)."""
        limit = self.max_length
        n = len(lists)
        out = TokenLists(lists)
        infos = [InputInfo(k, k, False, 1) for k in map(len, lists)]
        long = [i for i, info in enumerate(infos) if info.tokens > limit]
        if long and self.mode == "error":
            i = long[0]
            raise InvalidInputError(
                f"{what}{where(i, n)} is {infos[i].tokens} tokens long; the model's limit is {limit} "
                "(truncate='right', 'left' or 'chunk' takes it)")
        if self.mode == "chunk":
            for i in long:
                infos[i] = self.windows_info(infos[i].tokens, lead, bare=self._bare(lists[i]))
        elif long:
            cut = self._cut_texts([texts[i] for i in long]) if texts is not None and self.template is None else None
            for j, i in enumerate(long):
                out[i] = cut[j] if cut is not None else self.cut(lists[i])
                infos[i] = InputInfo(infos[i].tokens, len(out[i]), True, 1)
        out.infos = infos
        return out

    def cut(self, ids: Sequence[int]) -> list[int]:
        """ids cut to max_length on the engine's side, special tokens kept."""
        if self.template is None:
            pre, body, post = [], ids, []
        else:
            pre, body, post = self.template.content(ids)
        room = self.max_length - len(pre) - len(post)
        body = body[:room] if self.mode != "left" else body[len(body) - room :]
        return [*pre, *body, *post]

    def _cut_texts(self, texts: list[str]) -> Optional[list[list[int]]]:
        return self.retokenize(texts) if self.retokenize is not None else None

    def windows_info(self, tokens: int, lead: int = 0, bare: bool = False) -> InputInfo:
        """The windows of an input of `tokens` ids (`bare`: ids without the
        special tokens, which each window gets)."""
        specials = len(self.template.prefix) + len(self.template.suffix)
        spans = self._spans(tokens - lead - (0 if bare else specials), lead)
        return InputInfo(tokens, sum(b - a + specials + lead for a, b in spans), False, len(spans))

    def _bare(self, ids: Sequence[int]) -> bool:
        pre, _, post = self.template.content(ids)
        return not pre and not post

    def _spans(self, n: int, lead: int = 0) -> list[tuple[int, int]]:
        """[start, end) of each window over n content tokens: `room` less
        `lead` long, each starting `overlap` tokens before the previous one's
        end; the last may be shorter."""
        room = self.room - lead
        if room <= self.overlap:
            raise InvalidInputError(f"a prompt of {lead} tokens leaves no room in {self.max_length}-token windows "
                                    f"with chunk_overlap={self.overlap}")
        step = room - self.overlap
        spans = [(0, min(room, n))]
        while spans[-1][1] < n:
            a = spans[-1][0] + step
            spans.append((a, min(a + room, n)))
        return spans

    def windows(self, ids: Sequence[int], lead: int = 0) -> list[list[int]]:
        """The windows of one input longer than max_length. Its first `lead`
        content tokens (a prompt) start every window."""
        pre, body, post = self.template.content(ids)
        if not pre and not post:  # token ids without the template: each window gets it
            pre, post = self.template.prefix, self.template.suffix
        head, body = body[:lead], body[lead:]
        return [[*pre, *head, *body[a:b], *post] for a, b in self._spans(len(body), lead)]

    def split(self, lists: Sequence[Sequence[int]],
              lead: int = 0) -> tuple[list[Sequence[int]], list[tuple[int, int]]]:
        """Every input's windows in one flat list, and each input's [start,
        end) in it (one window for an input within the limit). `lead`: the
        prompt's tokens, repeated at the start of each window."""
        flat: list[Sequence[int]] = []
        spans = []
        for ids in lists:
            a = len(flat)
            if len(ids) > self.max_length:
                flat.extend(self.windows(ids, lead))
            else:
                flat.append(ids)
            spans.append((a, len(flat)))
        return flat, spans


def infos_of(lists: Sequence[Sequence[int]]) -> list[InputInfo]:
    """The InputInfo of each list (`.infos` where Fit made them)."""
    infos = getattr(lists, "infos", None)
    if infos is not None and len(infos) == len(lists):
        return infos
    return [InputInfo(k, k, False, 1) for k in map(len, lists)]


def attach(futures: Sequence[cf.Future], infos: Sequence[InputInfo]) -> None:
    for f, info in zip(futures, infos):
        f.info = info


def weighted_mean(rows: list[np.ndarray], weights: Sequence[int], normalize: bool) -> np.ndarray:
    """The windows' pooled outputs averaged, each weighted by its token
    count; then L2-normalised when the model normalises."""
    if len(rows) == 1:
        v = np.asarray(rows[0], dtype=np.float32).copy()
    else:
        w = np.asarray(weights, dtype=np.float64)
        v = (np.stack(rows).astype(np.float64) * w[:, None]).sum(0) / w.sum()
        v = v.astype(np.float32)
    if normalize:
        norm = float(np.linalg.norm(v))
        if norm > 0:
            v /= norm
    return v


_UNSET = object()


class Gathered(cf.Future):
    """One input's future over the futures of its requests (a chunked
    text's windows): done when all are, failed as soon as one fails (the
    others are then cancelled), cancelled with them (cancelling it cancels
    them). Its result, `finish(results)`, is computed in the thread that
    first asks for it, not in the engine's worker."""

    def __init__(self, parts: Sequence[cf.Future], finish: Callable[[list[Any]], Any]) -> None:
        super().__init__()
        self._parts = list(parts)
        self._finish = finish
        self._left = len(self._parts)
        self._lock = threading.Lock()
        self._value: Any = _UNSET
        self._cancelling = False
        for p in self._parts:
            p.add_done_callback(self._on_part)

    def _on_part(self, part: cf.Future) -> None:
        if part.cancelled():
            self.cancel()
            return
        error = part.exception()
        with self._lock:
            self._left -= 1
            last = self._left == 0
        try:
            if error is not None:
                self.set_exception(error)
            elif last:
                times = [getattr(p, "timing", None) or {} for p in self._parts]
                self.timing = {k: max(t.get(k, 0.0) for t in times) for k in ("queue_s", "inference_s")}
                self.set_result(None)
            else:
                return
        except cf.InvalidStateError:  # already failed or cancelled
            return
        if error is not None:
            for p in self._parts:
                p.cancel()

    def cancel(self) -> bool:
        """Cancel the windows that have not started; the text is cancelled
        if one of them was. With every window running or done there is
        nothing to stop: like any Future's, cancel() then says False and the
        result still comes."""
        with self._condition:
            walking, self._cancelling = self._cancelling, True
        if walking or self.done():
            # A window cancelled while the windows are walked (its callback,
            # _on_part) must not walk them anew: a recursion as deep as the
            # windows are many, and their square in calls.
            return super().cancel()
        for p in self._parts:
            p.cancel()  # the first one cancelled cancels the text (_on_part)
        with self._condition:  # (reentrant) no executor runs it: notify cf.wait / as_completed here, once
            if self._state == "CANCELLED":
                self.set_running_or_notify_cancel()
            elif self._state == "PENDING":  # no window could be stopped
                self._cancelling = False
            return self.cancelled()

    def result(self, timeout: Optional[float] = None) -> Any:
        super().result(timeout)
        with self._lock:
            if self._value is _UNSET:
                self._value = self._finish([p.result() for p in self._parts])
            return self._value
