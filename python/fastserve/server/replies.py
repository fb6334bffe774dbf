"""How an answer is encoded and sent: JSON bytes, then either the two raw
ASGI messages (the embeddings fast path) or a Starlette Response (routes
that run inside FastAPI)."""

from typing import Any, NamedTuple

import orjson
from starlette.responses import Response


def dumps(obj: Any) -> bytes:
    """Compact JSON; numpy float32 arrays are written directly, in float32's
    shortest round-trip form, without a Python list in between (much faster
    than json.dumps(v.tolist()): docs/design.md)."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


class Reply(NamedTuple):
    """A JSON answer, as a route computes it."""

    status: int
    body: bytes
    headers: dict[str, str]

    def response(self) -> Response:
        return Response(self.body, status_code=self.status, media_type="application/json", headers=self.headers)

    async def send(self, send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(self.body))]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})
