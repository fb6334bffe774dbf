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


def dumps_list_in(before: dict, key: str, items: list, after: dict, chunk: int = 64) -> bytes:
    """dumps({**before, key: items, **after}), byte for byte, written `chunk`
    items at a time: one orjson call holds the GIL throughout, so a large
    answer written in a worker thread still stalled the event loop (75 ms
    for 2,048 embeddings of 1,024 numbers); between pieces the GIL passes
    to the loop (a piece of 64 such embeddings takes about 2 ms)."""
    if len(items) <= chunk:  # one piece: one call
        return dumps({**before, key: items, **after})
    head = dumps(before)
    parts = [head[:-1] + (b"," if before else b"") + dumps(key) + b":["]
    for i in range(0, len(items), chunk):
        if i:
            parts.append(b",")
        parts.append(dumps(items[i:i + chunk])[1:-1])
    tail = dumps(after)
    parts.append(b"]" + (b"," + tail[1:] if after else b"}"))
    return b"".join(parts)


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
