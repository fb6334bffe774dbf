"""The API's request and response bodies, as pydantic models: FastAPI
validates requests with them and writes the OpenAPI document from them."""

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

Texts = Union[StrictStr, list[StrictStr]]
EmbeddingInput = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request. `model` and `user` are accepted and
    ignored: the server serves one model."""

    input: EmbeddingInput = Field(description="a text, a list of texts, token ids, or a list of token-id lists")
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[StrictInt] = Field(default=None, description="keep the first N dimensions (Matryoshka)")
    user: Optional[str] = None
    # Extensions (not in OpenAI's API), as SentenceTransformer.encode takes them.
    prompt_name: Optional[StrictStr] = Field(
        default=None, description="fastserve extension: one of the model's prompts by name, put in front of each "
                                  "text (default: the model's default prompt, if it has one)")
    prompt: Optional[StrictStr] = Field(
        default=None, description="fastserve extension: a prompt put in front of each text (wins over prompt_name; "
                                  "\"\" for none)")


class ClassifyRequest(BaseModel):
    input: Texts
    model: Optional[str] = None


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


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
