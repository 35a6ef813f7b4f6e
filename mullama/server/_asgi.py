"""ASGI plumbing for one HTTP exchange, independent of what is served.

It owns reading the request (the body bounded in size, ``MAX_BODY``, and in
time, ``io_timeout``; JSON that must be Unicode text), sending the response
(each write bounded by ``io_timeout``, a failed or stalled write counting as
a disconnect), server-sent events (with per-stream templates so a token event
costs one string encoding), and noticing the client's ``http.disconnect``
while a response is being made (:func:`cancel_on_disconnect`). A request it
refuses (400, 408, 413) raises :class:`~._openai.ApiError`, which the app answers.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, List, MutableMapping, Optional, Sequence, Tuple

import anyio

from .._config import SERVER_IO_TIMEOUT_S as IO_TIMEOUT_S
from ..aio import unwrap_single
from . import _openai as oa

__all__ = ["Exchange", "Disconnected", "EventTemplate", "cancel_on_disconnect", "MAX_BODY"]

#: largest request body accepted (bytes)
MAX_BODY = 8 << 20

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Disconnected(Exception):
    """The client went away while we were answering."""


class Exchange:
    """One HTTP request and its response."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, io_timeout: float = IO_TIMEOUT_S) -> None:
        self.scope = scope
        self.receive = receive
        self._send = send
        self.io_timeout = io_timeout
        self.started = False
        #: the last part of the response is being sent (a disconnect from now on is the normal end)
        self.complete = False
        self.status = 0
        #: headers every response of this exchange carries (CORS)
        self.extra_headers: List[Tuple[str, str]] = []

    @property
    def path(self) -> str:
        """The request's path below the application's mount point (``root_path``,
        which ASGI servers such as Ray Serve's proxy keep in ``path``)."""
        path: str = self.scope["path"]
        root = self.scope.get("root_path") or ""
        if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
            return path[len(root):] or "/"
        return path

    def raw_header(self, name: bytes) -> Optional[bytes]:
        for key, value in self.scope.get("headers", ()):
            if key.lower() == name:
                return bytes(value)
        return None

    async def body(self) -> bytes:
        chunks: List[bytes] = []
        size = 0
        with anyio.move_on_after(self.io_timeout) as scope:
            while True:
                msg = await self.receive()
                if msg["type"] == "http.disconnect":
                    raise Disconnected()
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > MAX_BODY:
                    raise oa.ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
                chunks.append(chunk)
                if not msg.get("more_body", False):
                    return b"".join(chunks)
        assert scope.cancelled_caught
        raise oa.ApiError(408, f"the request body did not arrive within {self.io_timeout:g} s",
                          code="request_timeout")

    async def json(self) -> Any:
        raw = await self.body()
        try:
            obj = json.loads(raw)
        except RecursionError:
            raise oa.ApiError(400, "the request body is not valid JSON: it is nested too deeply") from None
        except ValueError as exc:  # (JSONDecodeError, UnicodeDecodeError, an integer of too many digits)
            raise oa.ApiError(400, f"the request body is not valid JSON: {exc}") from None
        _check_text(obj)
        return obj

    async def start(self, status: int, headers: List[Tuple[str, str]]) -> None:
        self.started = True
        self.status = status
        await self.send({"type": "http.response.start", "status": status,
                         "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                                     for k, v in [*headers, *self.extra_headers]]})

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True  # hypercorn answers this send with http.disconnect on receive()
        # A client that stops receiving must not hold its request (and its slot) for
        # ever: a send that cannot complete within io_timeout counts as a disconnect.
        # (hypercorn shields its socket writes from cancellation; `mullama serve`
        # bounds those in its server, see _run.py.)
        with anyio.move_on_after(self.io_timeout) as scope:
            try:
                await self._send(message)
            except OSError as exc:  # the connection is gone (uvicorn's ClientDisconnected is an OSError)
                raise Disconnected() from exc
        if scope.cancelled_caught:
            raise Disconnected()

    async def respond(self, status: int, body: bytes, content_type: str,
                      headers: Sequence[Tuple[str, str]] = ()) -> None:
        await self.start(status, [("content-type", content_type), ("content-length", str(len(body))), *headers])
        await self.send({"type": "http.response.body", "body": body})

    async def respond_json(self, status: int, obj: Any, headers: Sequence[Tuple[str, str]] = ()) -> None:
        await self.respond(status, _dumps(obj), "application/json", headers)

    async def event(self, obj: Any) -> None:
        """One server-sent event."""
        await self.send_event(sse(obj))

    async def send_event(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end_events(self) -> None:
        await self.send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def sse(obj: Any) -> bytes:
    """The bytes of a server-sent event of *obj* as JSON."""
    return b"data: " + _dumps(obj) + b"\n\n"


def _check_text(obj: Any) -> None:
    """Refuse strings that are not Unicode text: a lone surrogate (``"\\ud800"`` is
    valid JSON) cannot be encoded, tokenized or echoed."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
        elif isinstance(o, str) and not o.isascii():
            try:
                o.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise oa.ApiError(400, f"the request holds a lone surrogate ({o[exc.start]!r}) in {o[:40]!r}: "
                                       "strings must be Unicode text") from None


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _dumps(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode("utf-8")


class EventTemplate:
    """The bytes of a chunk event around its one changing string: one
    string encoding per token event instead of a whole dict."""

    MARK = "\x01mullama\x01"

    def __init__(self, chunk_with_mark: Any) -> None:
        raw = b"data: " + _dumps(chunk_with_mark) + b"\n\n"
        self._head, mark, self._tail = raw.partition(_dumps(self.MARK))
        assert mark, "the chunk holds no mark"

    def render(self, text: str) -> bytes:
        return self._head + _dumps(text) + self._tail


class DisconnectWatch:
    disconnected = False


@asynccontextmanager
async def cancel_on_disconnect(ex: Exchange) -> AsyncIterator[DisconnectWatch]:
    """Run the body in a cancel scope that is cancelled when the client
    disconnects before the response is complete."""
    watch = DisconnectWatch()
    with unwrap_single():
        async with anyio.create_task_group() as tg:
            async def wait_for_disconnect() -> None:
                while (await ex.receive())["type"] != "http.disconnect":
                    pass
                if not ex.complete:
                    watch.disconnected = True
                    tg.cancel_scope.cancel()

            tg.start_soon(wait_for_disconnect)
            try:
                yield watch
            finally:
                tg.cancel_scope.cancel()
