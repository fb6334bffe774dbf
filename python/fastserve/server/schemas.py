"""The API's request and response bodies, as pydantic models: FastAPI
validates requests with them and writes the OpenAPI document from them."""

import difflib
import itertools
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

# Unknown keys of a body checked for near misses of the request's fields.
NEAR_MISS_KEYS = 16
# Lists of inputs are never empty (the routes answer 400 to an empty one).
NonEmpty = Field(min_length=1)
Texts = Union[StrictStr, Annotated[list[StrictStr], NonEmpty]]
EmbeddingInput = Union[StrictStr, Annotated[list[StrictStr], NonEmpty], Annotated[list[StrictInt], NonEmpty],
                       Annotated[list[Annotated[list[StrictInt], NonEmpty]], NonEmpty]]


class UnknownField(ValueError):
    """A request field that is a near miss of one the request has."""

    def __init__(self, field: str, meant: str) -> None:
        super().__init__(f"unknown field {field!r}: did you mean {meant!r}?")
        # As the error's `param`: a name with a lone surrogate, which no
        # UTF-8 (no JSON answer) can carry, escaped.
        self.field = field.encode("utf-8", "backslashreplace").decode("utf-8")


class _Request(BaseModel):
    """A request body. A field it does not have is ignored, as the APIs it
    stands in for ignore other vendors' extensions (vLLM's, Jina's, Cohere
    v2's `priority`), unless its name is a near miss of one it has (a
    misspelt `dimension` returned the whole vector with a 200): 400 naming
    both."""

    @model_validator(mode="before")
    @classmethod
    def _no_near_misses(cls, data: Any) -> Any:
        if isinstance(data, dict):
            # The first NEAR_MISS_KEYS unknown keys only: difflib on each of a
            # body's 100,000 keys held the event loop for seconds.
            unknown = (key for key in data if isinstance(key, str) and key not in cls.model_fields)
            for key in itertools.islice(unknown, NEAR_MISS_KEYS):
                near = difflib.get_close_matches(key, cls.model_fields, n=1, cutoff=0.8)
                if near:
                    raise UnknownField(key, near[0])
        return data


class EmbeddingRequest(_Request):
    """OpenAI's embeddings request. `model` and `user` are accepted and
    ignored: the server serves one model."""

    input: EmbeddingInput = Field(description="a text, a list of texts, token ids, or a list of token-id lists")
    model: Optional[str] = None
    encoding_format: Optional[Literal["float", "base64"]] = "float"  # (null: float, as dimensions: null is none)
    dimensions: Optional[StrictInt] = Field(default=None, description="keep the first N dimensions (Matryoshka)")
    user: Optional[str] = None
    # Extensions (not in OpenAI's API), as SentenceTransformer.encode takes them.
    prompt_name: Optional[StrictStr] = Field(
        default=None, description="fastserve extension: one of the model's prompts by name, put in front of each "
                                  "text (default: the model's default prompt, if it has one)")
    prompt: Optional[StrictStr] = Field(
        default=None, description="fastserve extension: a prompt put in front of each text (wins over prompt_name; "
                                  "\"\" for none)")


class ClassifyRequest(_Request):
    input: Texts
    model: Optional[str] = None


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]
    tokens: Optional[int] = Field(default=None, description="the input's full length in tokens")
    truncated: Optional[bool] = None
    chunks: Optional[int] = Field(default=None, description="windows it ran as (truncate='chunk'), else 1")


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ClassificationItem(BaseModel):
    object: Literal["classification"] = "classification"
    index: int
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ClassificationItem]
    model: str
    usage: Usage


class RerankDocument(BaseModel):
    """A document as an object (Cohere's and Jina's form): its `text`, and any
    other fields (`rank_fields` may name them; return_documents sends the
    object back as it came)."""

    model_config = ConfigDict(extra="allow")

    text: Optional[StrictStr] = None


class RerankRequest(_Request):
    """The rerank request Cohere, Jina, vLLM and Infinity share. Documents
    are strings or objects; `model` is accepted and ignored."""

    query: StrictStr
    documents: Annotated[list[Union[StrictStr, RerankDocument]], NonEmpty]
    model: Optional[str] = None
    top_n: Optional[StrictInt] = Field(default=None, description="return the best N (default: all)")
    return_documents: bool = False
    raw_scores: bool = Field(default=False, description="logits, without the model's activation")
    rank_fields: Optional[list[StrictStr]] = Field(
        default=None, description="Cohere v1: the document objects' fields to rank on, in order (default: text); "
                                  "several are ranked as 'field: value' lines")
    max_chunks_per_doc: Optional[StrictInt] = Field(
        default=None, description="Cohere v1: only 1 is accepted (a document past the model's limit is cut, "
                                  "not split into chunks)")
    max_tokens_per_doc: Optional[StrictInt] = Field(
        default=None, description="Cohere v2: accepted at or above the model's limit, where pairs are cut anyway")
    priority: Optional[StrictInt] = Field(default=None, description="Cohere v2: accepted and not used")
    relevant_spans: Optional[dict[str, Any]] = Field(
        default=None, description="Cohere v2: accepted only disabled ({\"enabled\": false}): no spans are returned")


class RerankResultItem(BaseModel):
    index: int
    relevance_score: float
    document: Optional[RerankDocument] = None


class RerankResponse(BaseModel):
    id: str
    object: Literal["rerank"] = "rerank"
    model: str
    results: list[RerankResultItem]
    usage: Usage


class TeiRerankRequest(_Request):
    """text-embeddings-inference's /rerank request."""

    query: StrictStr
    texts: Annotated[list[StrictStr], NonEmpty]
    raw_scores: bool = False
    return_text: bool = False
    truncate: Optional[bool] = Field(default=None, description="false: a pair past the model's limit gets 413 "
                                                               "(default: cut, as text-embeddings-inference's true)")
    truncation_direction: Optional[StrictStr] = Field(default=None, description="only the side the server cuts on "
                                                                                "(Right, unless --truncate left)")


class TeiRank(BaseModel):
    index: int
    score: float
    text: Optional[str] = None


class ExtractRequest(_Request):
    input: Texts
    model: Optional[str] = None
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = "simple"
    ignore_labels: list[StrictStr] = Field(default=["O"], description="labels left out of the answer")


class EntityItem(BaseModel):
    label: str
    score: float
    start: int
    end: int
    text: str
    word: str
    index: Optional[int] = Field(default=None, description="the token's position (aggregation_strategy none)")


class Extraction(BaseModel):
    object: Literal["entities"] = "entities"
    index: int
    entities: list[EntityItem]


class ExtractResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Extraction]
    model: str
    usage: Usage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    model_config = ConfigDict(title="Error")
    error: ErrorBody


# The error answers the API routes document (FastAPI's `responses=`).
ERROR_RESPONSES: dict[Union[int, str], dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in {
        400: "invalid input",
        401: "missing or wrong API key",
        413: "payload or number of inputs over the limit",
        429: "the engine's queue is full (see Retry-After)",
        503: "the engine is closed or unhealthy",
        504: "the request's deadline passed",
    }.items()
}
