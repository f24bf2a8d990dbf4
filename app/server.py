"""The HTTP server around the app: uvicorn with connection limits it does not have by itself.

Uvicorn's httptools protocol waits forever for a request's headers, keeps buffering a header
that never ends, keeps a connection whose client trickles a body nobody reads, and answers
malformed requests in plain text. ``GuardedProtocol`` adds, per connection:

- a header timeout, from the connection opening (or the first byte of the next request on a
  keep-alive connection) to the end of the headers: 408 and close (an idle connection that
  sent nothing is just closed);
- a cap on the request line plus headers: 431 and close;
- after an answer sent before its request body was read to the end, the rest of that body must
  arrive within the body timeout, or the connection closes;
- a cap on open connections: one more is answered 503 and closed;
- JSON bodies on all of these, and on the parser's own 400.

Body timeouts and the minimum body rate are the app's (``app/uploads.py``), where the answer
can be counted; the bounded shutdown is uvicorn's ``timeout_graceful_shutdown`` plus the
app's cut of slow uploads (``app/shutdown.py``).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import uvicorn
from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app.errors import RETRY_AFTER_S
from app.settings import Settings

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


class _HeadTooLargeError(Exception):
    """Raised from a parser callback to stop parsing a head over the cap."""


class GuardedProtocol(HttpToolsProtocol):
    """Uvicorn's httptools protocol with the limits above; ``limits`` is set by
    ``protocol_class``."""

    limits: ConnectionLimits

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        # Waiting for a request's line and headers: from the connection opening, or from the
        # end of the previous request (its body read to the end and its answer sent).
        self._awaiting_head = True
        self._head_bytes = 0
        self._message_done = True  # the current request's body has been read to its end
        self._over_capacity = False

    # Connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """A new connection: note whether it is over the cap, and start the header timer."""
        super().connection_made(transport)
        # This connection is already counted in self.connections.
        self._over_capacity = len(self.connections) > self.limits.max_connections
        self._arm(self.limits.header_timeout_s, self._on_header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection closed: stop its timer."""
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Bytes arrived: count them against the header cap while the head is incomplete."""
        if self._awaiting_head:
            # The whole chunk counts, though it may hold the start of the body after the
            # headers: checked only if the headers are still incomplete after it.
            self._head_bytes += len(data)
        super().data_received(data)
        if self._awaiting_head and not self.transport.is_closing() and self._head_too_large():
            self._refuse_head_size()

    # Parser callbacks

    def on_message_begin(self) -> None:
        """A request begins: its head is awaited, under the header timer."""
        super().on_message_begin()
        self._message_done = False
        if not self._awaiting_head:
            # A pipelined request, begun while the previous one is still being answered: its
            # head counts from the next read on (at most one read of slack).
            self._wait_for_next_head()
        if self._timer is None:  # the first byte of a request on a kept-alive connection
            self._arm(self.limits.header_timeout_s, self._on_header_timeout)

    def on_headers_complete(self) -> None:
        """The head is complete: stop the header timer and check the head's exact size."""
        self._awaiting_head = False
        self._disarm()
        # The exact size (the byte count above may include body bytes): a head that arrived
        # whole in one read is checked here. Raising makes the parser fail the request, and
        # send_400_response then answers 431.
        self._head_bytes = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if self._head_too_large():
            raise _HeadTooLargeError
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The body's last byte arrived: if already answered, await the next head."""
        self._message_done = True
        if self.cycle is not None and self.cycle.response_complete:
            # The tail of a body nobody read has now passed: wait for the next request, for
            # no longer than a head may take (uvicorn's keep-alive timer ended with the tail).
            self._wait_for_next_head()
            self._arm(self.limits.header_timeout_s, self._on_header_timeout)
        super().on_message_complete()

    def on_response_complete(self) -> None:
        """The answer went out: await the next head under the header timer."""
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._message_done:
            self._wait_for_next_head()
        else:
            # Answered before the body was read (413, say): the parser discards the rest,
            # which must still not take longer than a body may.
            self._arm(self.limits.body_timeout_s, self._on_body_timeout)

    def _wait_for_next_head(self) -> None:
        self._awaiting_head, self._head_bytes = True, 0

    def _head_too_large(self) -> bool:
        return self._head_bytes > self.limits.max_header_bytes

    def _refuse_head_size(self) -> None:
        self._answer_and_close(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            f"the request line and headers are over {self.limits.max_header_bytes} bytes "
            "(SSD_MAX_HEADER_BYTES)",
        )

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        if self._over_capacity:
            app = _too_many_connections(self.limits.max_connections)
        super()._start_asgi_task(cycle, app)

    def send_400_response(self, msg: str) -> None:
        """The parser's refusal of a malformed request (bad framing, a negative or conflicting
        Content-Length, bad characters), as JSON; 431 if the head was over the cap anyway."""
        if self._head_too_large() and (self._awaiting_head or not self._message_done):
            self._refuse_head_size()
            return
        self._answer_and_close(HTTPStatus.BAD_REQUEST, "malformed_request", msg)

    # Timers

    def _arm(self, delay: float, callback: object) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)  # type: ignore[arg-type]

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_header_timeout(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes == 0:  # nothing sent at all: an idle connection, closed quietly
            self.transport.close()
            return
        self._answer_and_close(
            HTTPStatus.REQUEST_TIMEOUT,
            "request_timeout",
            f"the request headers did not arrive within {self.limits.header_timeout_s:g} s "
            "(SSD_HEADER_TIMEOUT_S)",
        )

    def _on_body_timeout(self) -> None:
        self._timer = None
        if not self._message_done and not self.transport.is_closing():
            self.transport.close()

    def _answer_and_close(self, status: HTTPStatus, code: str, message: str) -> None:
        """Write a complete JSON error response outside any ASGI cycle, then close."""
        self._disarm()
        body = error_body(code, message)
        head = [f"HTTP/1.1 {status.value} {status.phrase}".encode()]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json",
            b"content-length: " + str(len(body)).encode(),
            b"connection: close",
        ]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()
        log.info("%s %s from %s", status.value, code, self.client)


def _too_many_connections(limit: int) -> ASGI3Application:
    """An ASGI app answering 503 as JSON and closing, for a connection over the cap."""
    body = error_body(
        "too_many_connections",
        f"the server has {limit} connections open (SSD_MAX_CONNECTIONS); retry later",
    )

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": HTTPStatus.SERVICE_UNAVAILABLE.value,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(RETRY_AFTER_S).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return app


def protocol_class(limits: ConnectionLimits) -> type[GuardedProtocol]:
    """``GuardedProtocol`` bound to ``limits`` (uvicorn builds one protocol per connection
    from a class, passing it only its own config)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits})


def server_config(settings: Settings, *, host: str, port: int, log_level: str) -> uvicorn.Config:
    """The uvicorn configuration that serves ``app.main:app`` with the settings' limits.

    The graceful-shutdown timeout counts from the end of the drain, so the process exits at
    most ``SSD_SHUTDOWN_TIMEOUT_S`` after SIGTERM.
    """
    limits = ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        body_timeout_s=settings.body_timeout_s,
        max_connections=settings.max_connections,
    )
    return uvicorn.Config(
        "app.main:app",
        host=host,
        port=port,
        http=protocol_class(limits),
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=settings.shutdown_timeout_s - settings.drain_s,  # type: ignore[arg-type]
        log_level=log_level,
        log_config=logging_config(log_level),
        access_log=False,  # the app writes its own, as JSON (app/access.py)
        workers=1,
    )


def logging_config(log_level: str) -> dict[str, Any]:
    """Uvicorn's logging set-up, plus the app's loggers: ``app`` like ``uvicorn.error`` at
    ``log_level``, and ``app.access`` writing its JSON lines as they are to stdout (always)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["json_line"] = {"format": "%(message)s"}
    config["handlers"]["json_lines"] = {
        "formatter": "json_line",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stdout",
    }
    config["loggers"]["app"] = {
        "handlers": ["default"],
        "level": log_level.upper(),
        "propagate": False,
    }
    config["loggers"]["app.access"] = {
        "handlers": ["json_lines"],
        "level": "INFO",
        "propagate": False,
    }
    return config
