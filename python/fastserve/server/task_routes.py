"""The routes of the rerank and token-classify tasks: POST /v1/rerank (the
shape Cohere, Jina, vLLM and Infinity share) and its text-embeddings-inference
alias POST /rerank, and POST /v1/extract. They go through the same path as
the embeddings route (Api._serve): limits, deadline, the client's leaving,
metrics, usage and errors are the same."""

import uuid

from ..admission import not_unicode, reindexed
from ..errors import InvalidInputError
from ..inputs import infos_of
from ..tasks import check_top_n, distinct, first_places, ranking
from .edge import Urgency
from .errors import ApiError
from .replies import Reply, dumps
from .routes import Api
from .schemas import ExtractRequest, RerankRequest, TeiRerankRequest


class TaskRoutes:
    """The task routes of one app, over its Api."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.engine = api.engine

    def _check_rerank(self, n: int, param: str, top_n=None) -> None:
        self.api._check_count(n, param)
        if len(self.engine.labels) != 1:
            raise ApiError(400, f"rerank needs a one-logit model; this one has {len(self.engine.labels)} labels",
                           code="invalid_model")
        try:
            check_top_n(top_n)
        except InvalidInputError as e:
            raise ApiError(400, str(e), param="top_n", code="invalid_top_n") from None

    async def _scores(self, receive, route: str, query: str, docs: list[str], raw: bool, write,
                      param: str, cut: bool = True, urgency: Urgency = Urgency()) -> Reply:
        """Score (query, doc) pairs, then `write(scores, usage)` the body (a
        document given more than once is scored once, as Engine.rerank; an
        error names the document by its index in `docs`, the request's
        `param` field). cut=False: a pair past the model's limit is refused
        (413), not cut."""
        bad = not_unicode("query", query)
        if bad is not None:
            raise ApiError(400, str(bad), param="query", code="invalid_input")
        unique, where = distinct(docs)

        def answer(logits, usage, infos) -> bytes:
            return write(self.engine.pair_scores(logits, raw)[where], usage)

        def tokenize(pairs):
            try:
                lists = self.engine.tokenize_pairs(pairs)
            except InvalidInputError as e:  # about a distinct document: named by its first place in `docs`
                raise ApiError(400, str(reindexed(e, first_places(where))), param=param,
                               code="invalid_input") from None
            long = next((i for i, info in enumerate(infos_of(lists)) if info.truncated), None) if not cut else None
            if long is not None:
                raise ApiError(413, f"texts[{where.tolist().index(long)}]: the pair is longer than the model's "
                                    f"{self.engine.max_length} tokens (truncate=false)", param="texts",
                               code="input_too_long")
            return lists

        pairs = [(query, d) for d in unique]
        chars = len(query) * len(unique) + sum(map(len, unique))
        return await self.api._serve(receive, route, pairs, None, answer, tokenize=tokenize, chars=chars,
                                     inputs=len(docs), urgency=urgency)

    async def rerank(self, body: RerankRequest, receive, route: str = "/v1/rerank", urgency: Urgency = Urgency()) -> Reply:
        """POST /v1/rerank (and Cohere v2's /v2/rerank): results best first,
        each with its document's index and relevance_score (and the
        document, return_documents)."""
        docs = [rank_text(d, body.rank_fields, i) for i, d in enumerate(body.documents)]
        self._check_rerank(len(docs), "documents", body.top_n)
        limit = self.engine.max_length
        if body.max_tokens_per_doc is not None and body.max_tokens_per_doc < limit:
            raise ApiError(400, f"max_tokens_per_doc below the model's limit ({limit} tokens per pair) is not "
                                f"supported, got {body.max_tokens_per_doc}", param="max_tokens_per_doc")
        if body.relevant_spans and body.relevant_spans.get("enabled"):
            raise ApiError(400, "relevant_spans is not supported: no spans are returned", param="relevant_spans")
        if body.max_chunks_per_doc not in (None, 1):
            raise ApiError(400, "max_chunks_per_doc other than 1 is not supported: a document past the model's "
                                f"limit ({limit} tokens per pair) is cut, not split into chunks; got "
                                f"{body.max_chunks_per_doc}", param="max_chunks_per_doc")

        # The documents go back as sent: one JSON cannot carry (a lone
        # surrogate, nesting past orjson's limit) is a 400 now, not a 500
        # once its batch has run.
        sent = [returnable(d, i) for i, d in enumerate(body.documents)] if body.return_documents else None

        def write(scores, usage) -> bytes:
            ranked = ranking(scores, docs, body.top_n, False)
            results = [{"index": r.index, "relevance_score": r.score,
                        **({"document": sent[r.index]} if sent is not None else {})}
                       for r in ranked]
            return dumps({"id": f"rerank-{uuid.uuid4().hex}", "object": "rerank", "model": self.api.model_name,
                          "results": results, "usage": usage})

        return await self._scores(receive, route, body.query, docs, body.raw_scores, write, "documents",
                                  urgency=urgency)

    async def tei_rerank(self, body: TeiRerankRequest, receive, urgency: Urgency = Urgency()) -> Reply:
        """POST /rerank, text-embeddings-inference's shape: a list of
        {index, score, (text)}, best first."""
        self._check_rerank(len(body.texts), "texts")
        side = "left" if self.engine.truncate == "left" else "right"
        if body.truncation_direction is not None and body.truncation_direction.lower() != side:
            raise ApiError(400, f"truncation_direction {body.truncation_direction!r}: this server cuts pairs on "
                                f"the {side}", param="truncation_direction")

        def write(scores, usage) -> bytes:
            ranked = ranking(scores, body.texts, None, body.return_text)
            return dumps([{"index": r.index, "score": r.score, **({"text": r.document} if body.return_text else {})}
                          for r in ranked])

        return await self._scores(receive, "/rerank", body.query, list(body.texts), body.raw_scores, write,
                                  "texts", cut=body.truncate is not False, urgency=urgency)

    async def extract(self, body: ExtractRequest, receive, urgency: Urgency = Urgency()) -> Reply:
        """POST /v1/extract: each text's entities."""
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        self.api._check_count(len(texts))
        prepared = []

        def tokenize(texts):
            inputs, lists = self.engine.prepare_extract(texts)
            prepared.extend(inputs)
            return lists

        def answer(logits, usage, infos) -> bytes:
            found = self.engine.entities(prepared, logits, aggregation_strategy=body.aggregation_strategy,
                                         ignore_labels=body.ignore_labels)
            data = [{"object": "entities", "index": i,
                     "entities": [{"label": e.label, "score": e.score, "start": e.start, "end": e.end,
                                   "text": e.text, "word": e.word,
                                   **({"index": e.index} if e.index is not None else {})} for e in ents]}
                    for i, ents in enumerate(found)]
            return dumps({"object": "list", "data": data, "model": self.api.model_name, "usage": usage})

        return await self.api._serve(receive, "/v1/extract", texts, None, answer, tokenize=tokenize,
                                     urgency=urgency)


def rank_text(doc, fields, i: int) -> str:
    """The text a document is ranked on: a string as it is; an object's
    `text`, or with Cohere's rank_fields the named fields in order (one alone
    as it is, several as "field: value" lines)."""
    if fields is not None and not fields:
        raise ApiError(400, "rank_fields must name at least one field", param="rank_fields")
    if isinstance(doc, str):
        if fields is not None and fields != ["text"]:
            raise ApiError(400, f"documents[{i}] is a string: rank_fields needs document objects", param="rank_fields")
        return doc
    fields = fields or ["text"]
    values = dict(doc.model_extra or {}, **({"text": doc.text} if doc.text is not None else {}))
    missing = [f for f in fields if not isinstance(values.get(f), str)]
    if missing:
        raise ApiError(400, f"documents[{i}] has no text field {missing[0]!r} to rank on (each field rank_fields "
                            "names, default 'text', must be a string)", param="documents")
    if len(fields) == 1:
        return values[fields[0]]
    return "\n".join(f"{f}: {values[f]}" for f in fields)


def as_sent(doc) -> dict:
    """A document as the request sent it, for return_documents (a string as {"text": ...})."""
    return {"text": doc} if isinstance(doc, str) else doc.model_dump(exclude_unset=True)


def returnable(doc, i: int) -> dict:
    """as_sent(doc), checked to be writable as JSON; else a 400 naming it."""
    out = as_sent(doc)
    try:
        dumps(out)
    except (TypeError, ValueError) as e:  # orjson.JSONEncodeError is a TypeError
        raise ApiError(400, f"documents[{i}] cannot be returned as JSON (return_documents): {e}",
                       param="documents", code="invalid_input") from None
    return out
