"""What each route does with the engine: inputs in (through the engine's
admission API), answers out. Every failure becomes an OpenAI-shaped error."""

import asyncio
import base64
import functools
import time
from typing import Any, Optional

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from ..admission import TokenLists, wait_all
from ..engine import Engine
from ..errors import InvalidInputError
from ..inputs import infos_of
from .edge import Urgency
from .errors import CLIENT_CLOSED, ApiError, ClientGone, api_error
from .lifecycle import InFlight
from .metrics import Metrics
from .replies import Reply, dumps, dumps_list_in
from .schemas import ClassifyRequest, EmbeddingRequest

DEFAULT_MAX_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request
# Texts are tokenized, and their answer written, on the event loop up to this
# many characters in one request (prompts included, and PER_INPUT_CHARS for
# each input: the tokenizer's cost per text, about what 32 characters take),
# or token ids validated up to this many ids; larger requests do that work in
# a worker thread, so one large request cannot stall the loop. So is an
# answer of more than INLINE_ANSWER_NUMBERS numbers (2,048 one-character
# texts of a 1,024-wide model wrote 26 MB on the loop: 130-355 ms).
INLINE_CHARS = 8192
# The longest prompt a request may give (characters): far past any model's
# limit in tokens, and a bound on the prompt's tokenization on the event loop.
MAX_PROMPT_CHARS = 16384
PER_INPUT_CHARS = 32
INLINE_ANSWER_NUMBERS = 16384


class Api:
    """The routes of one app, over one engine."""

    def __init__(self, engine: Engine, metrics: Metrics, *, model_name: str, max_inputs: int,
                 request_timeout: Optional[float]) -> None:
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.max_inputs = max_inputs
        self.request_timeout = request_timeout
        self.created = int(time.time())

    # ---------------------------------------------------------------- inputs

    def _check_count(self, n: int, param: str = "input") -> None:
        if n == 0:
            raise ApiError(400, f"{param} must not be empty", param=param, code="invalid_input")
        if n > self.max_inputs:
            raise ApiError(413, f"{n} inputs in one request; the limit is {self.max_inputs}", param=param,
                           code="too_many_inputs")

    def _prompt_chars(self, prompt: dict[str, Any]) -> int:
        """The length of the prompt engine.tokenize puts before every text
        (the given one, a prompt_name's or the model's default); a
        prompt_name the model lacks is a 400 naming it."""
        given = prompt.get("prompt")
        if given is not None and len(given) > MAX_PROMPT_CHARS:
            # Tokenized alone on the event loop (its length, a chunked text's
            # lead) and past what a prompt cache holds: bounded here.
            raise ApiError(400, f"prompt is {len(given)} characters; the limit is {MAX_PROMPT_CHARS}",
                           param="prompt", code="invalid_input")
        try:
            return len(self.engine._prompt(prompt.get("prompt_name"), given))
        except InvalidInputError as e:
            raise ApiError(400, str(e), param="prompt" if given is not None else "prompt_name",
                           code="invalid_input") from None

    @staticmethod
    async def _run(req: Optional[InFlight], inline: bool, fn, *args):
        """fn(*args) on the event loop when `inline`, else in a worker
        thread: through req.wait (the client leaving or the deadline ends the
        wait), or with req None to its end (the answer of a request whose
        inputs are all computed: the deadline is for the work, not for
        writing what it gave)."""
        if inline:
            return fn(*args)
        work = asyncio.to_thread(fn, *args)
        return await (work if req is None else req.wait(work))

    async def _serve(self, receive, route: str, texts: Optional[list],
                     token_lists: Optional[list[list[int]]], answer, tokenize=None,
                     chars: Optional[int] = None, prompt: Optional[dict[str, Any]] = None,
                     inputs: Optional[int] = None, urgency: Urgency = Urgency()) -> Reply:
        """Tokenize (or validate the token ids), queue, run and answer one
        request. The inputs go in through engine.asubmit_many: as many at a
        time as the queue takes; once some are queued, a full queue means
        waiting its turn (through req.wait, so the client leaving or the
        deadline ends it); only a request with nothing queued yet gets 429.
        `tokenize` turns `texts` into token lists (default engine.tokenize;
        `chars` their size, for where it runs); `answer(results, usage,
        infos)` writes the body. usage counts every token the model runs.
        `prompt`: embed's prompt_name / prompt arguments. `inputs`: how many
        the client sent, for the metrics (default: one per token list).
        `urgency`: the priority and deadline the request's headers ask for
        (checked by the edge); a deadline past the server's is cut to it."""
        timeout = self.request_timeout
        if urgency.timeout is not None:
            timeout = urgency.timeout if timeout is None else min(timeout, urgency.timeout)
        req = InFlight(receive, timeout)
        prompt = prompt or {}
        try:
            tokenize_s, size = 0.0, 0
            lead = self._prompt_chars(prompt) if tokenize is None else 0  # (checks prompt_name first)
            if texts is not None:
                t0 = time.perf_counter()
                size = chars if chars is not None else sum(len(t) for t in texts) + lead * len(texts)
                size += PER_INPUT_CHARS * len(texts)
                if tokenize is None:
                    tokenize = functools.partial(self.engine.tokenize, **prompt) if prompt else self.engine.tokenize
                token_lists = await self._run(req, size <= INLINE_CHARS, tokenize, texts)
                tokenize_s = time.perf_counter() - t0
            elif type(token_lists) is not TokenLists:  # checked before any is queued
                size = sum(map(len, token_lists)) + lead  # (a chunking engine tokenizes the prompt)
                token_lists = await self._run(req, size <= INLINE_CHARS,
                                              functools.partial(self.engine.validate_token_ids, **prompt),
                                              token_lists)
            req.futures = await self.engine.asubmit_many(token_lists, priority=urgency.priority, timeout=req.remaining,
                                                         wait=req.wait, **prompt)
            results = await req.wait(wait_all(req.futures))
            infos = infos_of(token_lists)
            n_tokens = sum(info.computed_tokens for info in infos)
            self.metrics.inputs_for(route).inc(len(token_lists) if inputs is None else inputs)
            self.metrics.prompt_tokens_for(route).inc(n_tokens)
            numbers = len(results) * self.engine.dim if self.engine.task == "embed" else 0
            body = await self._run(None, size <= INLINE_CHARS and numbers <= INLINE_ANSWER_NUMBERS, answer, results,
                                   {"prompt_tokens": n_tokens, "total_tokens": n_tokens}, infos)
            return Reply(200, body, req.timing_headers(tokenize_s))
        except ClientGone:
            return Reply(CLIENT_CLOSED, b"", {})  # never reaches the client; counted in metrics
        except Exception as exc:
            return api_error(exc).reply()
        finally:
            req.close()

    # ---------------------------------------------------------------- routes

    async def embeddings(self, body: EmbeddingRequest, receive, urgency: Urgency = Urgency()) -> Reply:
        """POST /v1/embeddings. `receive` is the request's ASGI receive, its
        body already read (the watch on the client's connection); `urgency`
        what its headers ask for (as every route's)."""
        raw = body.input
        if isinstance(raw, str):
            texts, token_lists = [raw], None
        elif raw and isinstance(raw[0], str):
            texts, token_lists = list(raw), None
        elif raw and isinstance(raw[0], int):
            texts, token_lists = None, [list(raw)]
        else:
            texts, token_lists = None, [list(x) for x in raw]
        self._check_count(len(texts if texts is not None else token_lists))
        dim = self.engine.dim
        dims = body.dimensions
        if dims is not None and not 1 <= dims <= dim:
            raise ApiError(400, f"dimensions must be in [1, {dim}] for this model, got {dims}", param="dimensions",
                           code="invalid_dimensions")
        b64 = body.encoding_format == "base64"
        renormalize = self.engine.normalize

        def answer(vectors: list[np.ndarray], usage: dict[str, int], infos) -> bytes:
            data = []
            for i, (v, info) in enumerate(zip(vectors, infos)):
                v = np.asarray(v, dtype=np.float32)
                if dims is not None and dims < dim:
                    v = v[:dims]
                    if renormalize:  # Matryoshka: truncate, then back to unit length
                        norm = float(np.linalg.norm(v))
                        v = v / norm if norm > 0 else v
                if b64:
                    emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                else:
                    emb = v if v.flags.c_contiguous else np.ascontiguousarray(v)
                data.append({"object": "embedding", "index": i, "embedding": emb, "tokens": info.tokens,
                             "truncated": info.truncated, "chunks": info.chunks})
            return dumps_list_in({"object": "list"}, "data", data, {"model": self.model_name, "usage": usage})

        prompt = {k: v for k, v in (("prompt_name", body.prompt_name), ("prompt", body.prompt)) if v is not None}
        return await self._serve(receive, "/v1/embeddings", texts, token_lists, answer, prompt=prompt,
                                 urgency=urgency)

    async def classify(self, body: ClassifyRequest, receive, urgency: Urgency = Urgency()) -> Reply:
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        self._check_count(len(texts))

        def answer(results: list, usage: dict[str, int], infos) -> bytes:
            data = [{"object": "classification", "index": i, "label": c.label, "score": c.score, "scores": c.scores}
                    for i, c in enumerate(results)]
            return dumps({"object": "list", "data": data, "model": self.model_name, "usage": usage})

        return await self._serve(receive, "/v1/classify", texts, None, answer, urgency=urgency)

    def _card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "fastserve",
                "task": self.engine.task, "dimensions": self.engine.dim, "max_length": self.engine.max_length}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._card()]}

    async def model(self, model_id: str) -> dict[str, Any]:
        """GET /v1/models/{id} (OpenAI's `models.retrieve`): the served model,
        or 404 model_not_found for any other id."""
        if model_id != self.model_name:
            raise ApiError(404, f"The model '{model_id}' does not exist; this server serves "
                                f"'{self.model_name}'", param="model", code="model_not_found")
        return self._card()

    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def ready(self) -> Response:
        h = self.engine.health()
        body = {"status": "ready" if h["healthy"] else "unavailable", **h}
        return Response(dumps(body), status_code=200 if h["healthy"] else 503, media_type="application/json")

    async def metrics_text(self) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
