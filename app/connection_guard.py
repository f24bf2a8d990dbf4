"""Connection limits uvicorn lacks, kept in front of its HTTP protocol rather than inside it.

``GuardedConnection`` is the asyncio protocol uvicorn runs for each connection (a class passed
as ``uvicorn.Config(http=...)``). It hands every transport event on, unchanged, to uvicorn's
own httptools protocol, built from the arguments uvicorn passed, and reads the same bytes on
the way with an httptools parser of its own: the parser uvicorn's protocol uses, so both find
the same request boundaries. Knowing where each head and body ends, it adds per connection:

- a header timeout, from the connection opening (or the first byte after an answered request)
  to the end of the headers: 408 and close; a connection that began no request (nothing, or
  only blank lines) is just closed;
- a cap on the request line plus headers: 431 and close, before the head ends;
- after an answer sent before its request body was read to the end, the rest of that body must
  arrive within the body timeout, or the connection closes;
- a cap on open connections: one more is answered 503 when its head ends, and closed; it never
  reaches uvicorn's protocol;
- JSON bodies on all of these, and 400 with the parser's reason for malformed framing: those
  bytes never reach uvicorn's protocol, which would answer in plain text.

A refusal of a request behind one still being served waits for that one's answer to go out.

The bytes do not show when an answer has gone out; ``ConnectionSignals``, ASGI middleware
outside the app, reports it. It finds its connection in a context variable that
``GuardedConnection`` sets while uvicorn's protocol handles the bytes: the request's task is
started there, and an asyncio task runs in a copy of the context it was created in.

What this relies on in uvicorn beyond its documented options, each pinned by
``tests/app/test_connection_guard.py`` with a message naming what changed:

1. ``Config(http=cls)`` builds each connection's protocol as ``cls(*args, **kwargs)``; they
   are passed on to uvicorn's protocol unread.
2. ``uvicorn.config.HTTP_PROTOCOLS["httptools"]`` names the class ``--http httptools`` runs.
3. A request's ASGI task is created while uvicorn's protocol handles ``data_received`` (or, for
   a pipelined request, from the task of the request before it).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, ClassVar, cast

import httptools
import uvicorn.config
import uvicorn.importer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import RETRY_AFTER_S

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection limits, in seconds and bytes (see the ``SSD_*`` settings of the same
    names)."""

    header_timeout_s: float
    max_header_bytes: int
    body_timeout_s: float
    max_connections: int


def error_body(code: str, message: str) -> bytes:
    """The service's JSON error body (``app.errors.error_response`` makes the same one)."""
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def uvicorn_protocol(name: str) -> type[asyncio.Protocol]:
    """The protocol class uvicorn runs for ``--http name``, resolved the way uvicorn does.

    Raises:
        RuntimeError: this uvicorn no longer resolves the name that way.
    """
    try:
        path = uvicorn.config.HTTP_PROTOCOLS[name]
        found = uvicorn.importer.import_from_string(path)
    except (AttributeError, KeyError, uvicorn.importer.ImportFromStringError) as exc:
        raise RuntimeError(
            f"uvicorn {uvicorn.__version__} changed: uvicorn.config.HTTP_PROTOCOLS[{name!r}] no "
            f"longer names its --http {name} protocol ({exc!r}); app/connection_guard.py wraps "
            "that protocol"
        ) from exc
    if not (isinstance(found, type) and issubclass(found, asyncio.Protocol)):
        raise RuntimeError(
            f"uvicorn {uvicorn.__version__} changed: --http {name} resolves to {found!r}, not "
            "an asyncio.Protocol class; app/connection_guard.py wraps that protocol"
        )
    return found


# The connection whose bytes uvicorn's protocol is handling; request tasks inherit it.
_CONNECTION: contextvars.ContextVar[GuardedConnection | None] = contextvars.ContextVar(
    "ssd_connection", default=None
)


class _StopParsingError(Exception):
    """Raised from a parser callback once the request is to be refused."""


class GuardedConnection(asyncio.Protocol):
    """uvicorn's protocol behind the limits above; ``limits``, ``served_by`` and ``open`` are
    set by ``protocol_class``, since uvicorn builds one protocol per connection from a class."""

    limits: ClassVar[ConnectionLimits]
    served_by: ClassVar[type[asyncio.Protocol]]  # uvicorn's protocol class
    open: ClassVar[set[GuardedConnection]]  # the open connections of this server

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # uvicorn's arguments, for its own protocol; built when the connection is accepted.
        self._args, self._kwargs = args, kwargs
        self._served: asyncio.Protocol | None = None  # None while over the cap
        self._transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self._parser = httptools.HttpRequestParser(self)
        self._timer: asyncio.TimerHandle | None = None
        self._heads = 0  # requests whose head ended (handed to uvicorn's protocol)
        self._answered = 0  # of those, the ones answered
        self._in_head = False  # a request began and its headers have not ended
        self._in_body = False  # the latest request's headers ended and its body has not
        self._head_read = 0  # bytes of the current head, counted by whole reads
        self._head_parsed = 0  # bytes of the current head's target and header lines
        self._ended_here = False  # a request ended in the bytes being parsed
        self._refusal: tuple[HTTPStatus, str, str] | None = None  # to send, or sent
        self._held: bytes | None = None  # a refusal waiting for an earlier answer to go out

    # Transport events, handed on to uvicorn's protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A new connection: served unless over the cap, under the header timer."""
        # A stream transport (uvloop's does not subclass asyncio.Transport, but behaves as one).
        self._transport = cast(asyncio.Transport, transport)
        self.open.add(self)
        self._arm(self.limits.header_timeout_s, self._on_header_timeout)
        if len(self.open) <= self.limits.max_connections:
            self._served = self.served_by(*self._args, **self._kwargs)
            self._hand_on(self._served.connection_made, transport)

    def data_received(self, data: bytes) -> None:
        """Bytes arrived: find the request boundaries in them, then hand them on."""
        if self._refusal is not None:
            return  # refused: nothing more is read
        self._ended_here, heads = False, self._heads
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # both parsers stop at the same byte; uvicorn serves it as a plain request
        except httptools.HttpParserError as exc:  # _StopParsingError arrives wrapped in one
            # The body of a request handed on before this read, which uvicorn's protocol reads.
            served_body = self._in_body and self._heads == heads
            self._heads = heads  # requests whole in this read are not handed on either
            if served_body and self._answered == self._heads:
                self._disarm()
                self._transport.close()  # the tail of a body answered already: nothing is owed
            else:
                self._refuse(*(self._refusal or self._malformed(exc)), at_once=served_body)
            return
        if self._in_head:
            if self._timer is None:  # its first byte came in this read
                self._arm(self.limits.header_timeout_s, self._on_header_timeout)
            if not self._ended_here:
                # A head that began in this read, after a request that ended in it, is
                # counted from the next read on: at most one read of slack.
                self._head_read += len(data)
                if self._head_read > self.limits.max_header_bytes:
                    self._heads = heads
                    self._refuse(*self._head_too_large())
                    return
        elif self._timer is None and not self._in_body and self._heads == heads:
            # Bytes that began no request (blank lines): they stop uvicorn's keep-alive timer.
            self._arm(self.limits.header_timeout_s, self._on_header_timeout)
        if self._served is not None:
            self._hand_on(self._served.data_received, data)

    def eof_received(self) -> bool | None:
        """The client will send no more: uvicorn's protocol decides (it closes)."""
        return self._served.eof_received() if self._served is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection closed: stop its timer and let uvicorn's protocol clean up."""
        self.open.discard(self)
        self._disarm()
        if self._served is not None:
            self._hand_on(self._served.connection_lost, exc)

    def pause_writing(self) -> None:
        """The transport's write buffer is full (uvicorn's protocol waits before writing)."""
        if self._served is not None:
            self._served.pause_writing()

    def resume_writing(self) -> None:
        """The transport's write buffer has drained."""
        if self._served is not None:
            self._served.resume_writing()

    def _hand_on(self, event: Callable[..., object], *args: object) -> None:
        token = _CONNECTION.set(self)
        try:
            event(*args)
        finally:
            _CONNECTION.reset(token)

    # Parser callbacks (httptools calls these while data_received feeds it)

    def on_message_begin(self) -> None:
        """A request begins: its head is awaited under the header timer (armed after the
        read, unless the head ends in it)."""
        self._in_head, self._head_read, self._head_parsed = True, 0, 0

    def on_url(self, url: bytes) -> None:
        """A piece of the request target."""
        self._head_parsed += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header line (4 bytes for ': ' and CRLF)."""
        self._head_parsed += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        """The head ended: check its exact size; refuse it if over the cap or over capacity."""
        self._disarm()
        # The reads of an unfinished head were checked as they came; this also catches a
        # head that came whole in one read.
        if self._head_parsed > self.limits.max_header_bytes:
            self._refusal = self._head_too_large()
            raise _StopParsingError
        if self._served is None:
            self._refusal = (
                HTTPStatus.SERVICE_UNAVAILABLE,
                "too_many_connections",
                f"the server has {self.limits.max_connections} connections open "
                "(SSD_MAX_CONNECTIONS); retry later",
            )
            raise _StopParsingError
        self._in_head, self._in_body = False, True
        self._heads += 1

    def on_message_complete(self) -> None:
        """The body's last byte arrived; if it was answered already, the connection idles
        under the header timer (uvicorn's keep-alive timer stopped when the tail came)."""
        self._in_body, self._ended_here = False, True
        if self._answered == self._heads:
            self._disarm()
            self._arm(self.limits.header_timeout_s, self._on_header_timeout)

    # From ConnectionSignals

    def response_complete(self) -> None:
        """A request's answer went out: send a refusal held for it, or wait for the rest of
        its body under the body timer."""
        self._answered += 1
        if self._answered < self._heads:
            return
        if self._held is not None:
            self._send_and_close(self._held)
        elif self._in_body and not self._transport.is_closing():
            self._arm(self.limits.body_timeout_s, self._on_body_timeout)

    # Timers

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_header_timeout(self) -> None:
        self._timer = None
        if self._in_head:
            self._refuse(
                HTTPStatus.REQUEST_TIMEOUT,
                "request_timeout",
                f"the request headers did not arrive within {self.limits.header_timeout_s:g} s "
                "(SSD_HEADER_TIMEOUT_S)",
            )
        elif self._answered == self._heads:
            self._transport.close()  # nothing asked (or only blank lines): closed quietly
        # else a request is being served; uvicorn's keep-alive timer follows its answer

    def _on_body_timeout(self) -> None:
        self._timer = None
        if self._in_body:
            self._transport.close()  # answered already: nothing is owed

    # Refusals

    def _head_too_large(self) -> tuple[HTTPStatus, str, str]:
        return (
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            f"the request line and headers are over {self.limits.max_header_bytes} bytes "
            "(SSD_MAX_HEADER_BYTES)",
        )

    def _malformed(self, exc: httptools.HttpParserError) -> tuple[HTTPStatus, str, str]:
        return HTTPStatus.BAD_REQUEST, "malformed_request", f"malformed request: {exc}"

    def _refuse(self, status: HTTPStatus, code: str, message: str, at_once: bool = False) -> None:
        """Answer ``status`` as JSON and close: after the answers to the requests being
        served, or ``at_once`` (one of them is broken)."""
        self._refusal = (status, code, message)
        self._disarm()
        log.info("%s %s from %s", status.value, code, self._transport.get_extra_info("peername"))
        response = _response(status, code, message)
        if self._answered < self._heads and not at_once:
            self._held = response  # sent after the last answer due (response_complete)
        else:
            self._send_and_close(response)

    def _send_and_close(self, response: bytes) -> None:
        if not self._transport.is_closing():
            self._transport.write(response)
            self._transport.close()


def _response(status: HTTPStatus, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 response with a JSON error body that closes the connection."""
    body = error_body(code, message)
    head = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"date: {formatdate(usegmt=True)}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        head.append(f"retry-after: {RETRY_AFTER_S}")
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


def protocol_class(limits: ConnectionLimits) -> type[GuardedConnection]:
    """``GuardedConnection`` bound to ``limits`` in front of uvicorn's httptools protocol, with
    its own count of open connections (one per server)."""
    attributes = {"limits": limits, "served_by": uvicorn_protocol("httptools"), "open": set()}
    return type("GuardedConnection", (GuardedConnection,), attributes)


class ConnectionSignals:
    """ASGI middleware telling each request's ``GuardedConnection`` when its answer went out
    (the last body message sent, or the app returned or failed without one)."""

    lost_warned: ClassVar[bool] = False

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; for an HTTP request, report its answer to its connection."""
        connection = _CONNECTION.get()
        if scope["type"] != "http" or connection is None:
            if scope["type"] == "http":
                self._warn_lost()
            await self.app(scope, receive, send)
            return
        answered = False

        async def send_and_report(message: Message) -> None:
            nonlocal answered
            await send(message)
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if last and not answered:
                answered = True
                connection.response_complete()

        try:
            await self.app(scope, receive, send_and_report)
        finally:
            if not answered:
                connection.response_complete()

    @classmethod
    def _warn_lost(cls) -> None:
        if not cls.lost_warned:
            cls.lost_warned = True
            log.error(
                "uvicorn %s changed: a request ran outside its connection's context, so "
                "answered requests are not reported to app/connection_guard.py (unread bodies "
                "are not timed; refusals behind a request are not held)",
                uvicorn.__version__,
            )


def guarded_app() -> ASGIApp:
    """``app.main:app`` inside ``ConnectionSignals``: the app factory ``python -m app`` serves
    (imported when uvicorn loads it, as ``app.main:app`` would be)."""
    from app.main import app  # here, not at import: it builds the app (and its routes)

    return ConnectionSignals(app)
