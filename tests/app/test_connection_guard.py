"""The connection guard (``app/connection_guard.py``) in front of uvicorn's protocol, and what it
relies on in uvicorn beyond its documented options: each test here fails naming what changed.

Real sockets to a real uvicorn, run in a thread of this process with a tiny ASGI app (no model),
so the guard's wiring is checked in a second; the limits themselves, on the real service, are
``tests/app/test_server.py``'s.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from app.connection_guard import (
    ConnectionLimits,
    ConnectionSignals,
    GuardedConnection,
    protocol_class,
    uvicorn_protocol,
)
from tests.app.support import PATIENCE_S, eventually, free_port, read_all

LIMITS = ConnectionLimits(
    header_timeout_s=PATIENCE_S, max_header_bytes=4096, body_timeout_s=PATIENCE_S, max_connections=8
)
CHANGED = f"uvicorn {uvicorn.__version__} changed (see app/connection_guard.py's docstring): "


# /held answers only once the test releases it (set from the test's thread).
HELD_STARTED, HELD_RELEASED = threading.Event(), threading.Event()


async def tiny_app(scope: dict, receive: object, send: object) -> None:
    """200 with the request's path as the body; ``/held`` waits for ``HELD_RELEASED``."""
    assert scope["type"] == "http"
    if scope["path"] == "/held":
        HELD_STARTED.set()
        while not HELD_RELEASED.is_set():
            await asyncio.sleep(0.01)
    body = scope["path"].encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": body})  # type: ignore[operator]


class Running:
    """A uvicorn server in a thread, guarded as ``python -m app`` guards it (``server_config``:
    the ``GuardedConnection`` class as ``http``, ``ws="none"``, the app in
    ``ConnectionSignals``)."""

    def __init__(self) -> None:
        self.protocol = protocol_class(LIMITS)
        self.port = free_port()
        config = uvicorn.Config(
            ConnectionSignals(tiny_app),  # type: ignore[arg-type]
            host="127.0.0.1",
            port=self.port,
            http=self.protocol,
            ws="none",
            lifespan="off",
            log_config=None,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        eventually(lambda: self.server.started, "the in-thread uvicorn started")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(PATIENCE_S)

    def exchange(self, data: bytes) -> bytes:
        """Send ``data`` on a new connection; everything answered until the server closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(data)
            answer, _ = read_all(sock)
        return answer


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    with Running() as server:
        yield server


def get(path: str, close: bool = False) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{connection}\r\n".encode()


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """What the server sends on ``sock`` up to and including ``marker``."""
    sock.settimeout(PATIENCE_S)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before {marker!r}; got {data!r}"
        data += chunk
    return data


def statuses(answer: bytes) -> list[int]:
    return [int(line.split(b" ")[1]) for line in answer.split(b"\r\n") if b"HTTP/1.1 " in line]


def last_json(answer: bytes) -> dict:
    return json.loads(answer[answer.rindex(b"\r\n\r\n") + 4 :])


def test_uvicorn_names_its_httptools_protocol() -> None:
    try:
        found = uvicorn_protocol("httptools")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    assert issubclass(found, asyncio.Protocol)
    assert not issubclass(found, GuardedConnection)
    with pytest.raises(RuntimeError, match="no longer names its --http nonesuch protocol"):
        uvicorn_protocol("nonesuch")


def test_every_request_reports_its_answer_to_its_connection(running: Running) -> None:
    # One request, then two pipelined in one write (uvicorn starts the second from the first's
    # task), then a malformed one: its 400 is sent only once the guard has counted the three
    # answers, which it learns from ConnectionSignals.
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(get("/a"))
        read_until(sock, b"/a")
        assert running.protocol.open, (
            CHANGED + "uvicorn.Config(http=<class>) no longer runs the class as each "
            "connection's protocol"
        )
        sock.sendall(get("/b") + get("/c"))
        answers = read_until(sock, b"/c")
        assert statuses(answers) == [200, 200], answers
        assert not ConnectionSignals.lost_warned, (
            CHANGED + "a request's ASGI task no longer runs in the context uvicorn's protocol "
            "had in data_received, so ConnectionSignals cannot tell the guard it was answered"
        )
        sock.sendall(b"BAD\x01 / HTTP/1.1\r\n\r\n")
        answer, _ = read_all(sock)
    assert statuses(answer) == [400], answer
    assert last_json(answer)["error"]["code"] == "malformed_request"


def test_a_refusal_behind_a_request_waits_for_its_answer(running: Running) -> None:
    HELD_STARTED.clear()
    HELD_RELEASED.clear()
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(get("/held"))
        assert HELD_STARTED.wait(PATIENCE_S), "/held was not called"
        sock.sendall(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n")
        HELD_RELEASED.set()
        answer, _ = read_all(sock)
    assert statuses(answer) == [200, 400], answer
    assert answer.index(b"/held") < answer.index(b"malformed_request")


def test_a_malformed_chunked_body_is_answered_as_json(running: Running) -> None:
    head = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = running.exchange(head + b"zz\r\nabc\r\n")
    assert statuses(answer) == [400], answer
    assert last_json(answer)["error"]["code"] == "malformed_request"


@pytest.mark.parametrize("upgrade", ["websocket", "h2c"])
def test_upgrade_requests_are_served_plainly_and_leave_the_count(
    running: Running, upgrade: str
) -> None:
    # ws="none": uvicorn never hands the socket to another protocol, which would take the
    # connection out of the guard (and its count) for good.
    request = (
        f"GET /up HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(request)
        answer = read_until(sock, b"/up")
        sock.sendall(get("/after", close=True))
        answer += read_all(sock)[0]
    assert statuses(answer) == [200, 200], answer
    eventually(lambda: not running.protocol.open, "every connection left the guard's count")


def test_a_head_under_the_cap_is_served_in_any_number_of_reads(running: Running) -> None:
    # 3,500 bytes of head (the cap is 4,096), sent in pieces: counted once, not per piece.
    lines = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 80) for i in range(35))
    request = b"GET /pieces HTTP/1.1\r\nHost: t\r\n" + lines + b"Connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        for start in range(0, len(request), 700):
            sock.sendall(request[start : start + 700])
            time.sleep(0.05)  # separate reads, most likely; the verdict holds either way
        answer, _ = read_all(sock)
    assert statuses(answer) == [200], answer
