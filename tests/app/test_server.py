"""The server around the app (``app/server.py``): header timeouts and caps, unread bodies,
keep-alive, malformed framing, the connection cap.

Real server: these limits live in front of the uvicorn protocol that ``python -m app`` runs
(``app/connection_guard.py``), not in the ASGI app, and only show on real sockets (partial
heads, trickled bytes, held connections).
Timeouts are set short through the settings (``GUARDED_ENV``) so the suite stays fast.
"""

from __future__ import annotations

import io
import time

import httpx
import pytest

from tests.app.support import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    LATENESS_S,
    MAX_CONNECTIONS,
    PATIENCE_S,
    Server,
    connect,
    encode,
    eventually,
    head,
    read_all,
    read_answer,
    shapes_image,
)

PNG = encode(shapes_image((320, 240)), "PNG")


def test_partial_headers_and_idle_connections_are_closed(guarded: Server) -> None:
    with connect(guarded) as partial, connect(guarded) as idle:
        partial.sendall(b"POST /detect HTTP/1.1\r\nHost: test\r\n")
        status, body, elapsed = read_answer(partial)
        assert status == 408, body
        assert body["error"]["code"] == "request_timeout"
        assert elapsed < HEADER_TIMEOUT_S + LATENESS_S
        status, _, elapsed = read_answer(idle)
        assert status == 0  # nothing was asked: closed without an answer
        assert elapsed < HEADER_TIMEOUT_S + LATENESS_S


def test_body_left_unread_after_an_early_answer_must_still_arrive_in_time(
    guarded: Server,
) -> None:
    # /healthz answers 405 to a POST without reading its body; a client that then trickles
    # the rest, a byte at a time (each byte would restart uvicorn's keep-alive timer), is
    # closed after the body timeout, not held.
    with connect(guarded) as sock:
        sock.sendall(head("/healthz", content_length=1000) + b"abc")
        start = time.monotonic()
        with pytest.raises(OSError):  # the server closes while we still send
            while time.monotonic() - start < PATIENCE_S:
                sock.sendall(b"x")
                time.sleep(0.25)
        closed_after = time.monotonic() - start
        data, _ = read_all(sock)
    assert data.startswith(b"HTTP/1.1 405") and data.count(b"HTTP/1.1") == 1
    assert closed_after < BODY_TIMEOUT_S + LATENESS_S


def test_idle_keep_alive_connection_closes(guarded: Server) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        data, elapsed = read_all(sock)
    assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1") == 1
    assert elapsed < 1 + LATENESS_S  # SSD_KEEP_ALIVE_S is 1 here


def test_blank_lines_after_an_answer_do_not_hold_the_connection(guarded: Server) -> None:
    # Blank lines between requests are allowed (RFC 9112, sec. 2.2) and begin no request, but
    # each one stops uvicorn's keep-alive timer: the header timer must close the connection.
    with connect(guarded) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        start = time.monotonic()
        with pytest.raises(OSError):  # the server closes while we still send
            while time.monotonic() - start < PATIENCE_S:
                sock.sendall(b"\r\n")
                time.sleep(0.25)
        closed_after = time.monotonic() - start
        data, _ = read_all(sock)
    assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1") == 1
    assert closed_after < HEADER_TIMEOUT_S + LATENESS_S


def test_headers_over_the_cap_get_431_before_they_end(guarded: Server) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"POST /detect HTTP/1.1\r\nHost: test\r\nX-Filler: ")
        with pytest.raises(OSError):  # the server answers and closes while we still send
            for _ in range(10_000):
                sock.sendall(b"a" * 1024)
        status, body, _ = read_answer(sock)
    assert status in (0, 431)  # the answer may be lost to the reset of our unread data
    if status:
        assert body["error"]["code"] == "headers_too_large"
    with connect(guarded) as sock:  # behind a complete request on the same connection
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\nGET / HTTP/1.1\r\nX-A: ")
        with pytest.raises(OSError):
            for _ in range(10_000):
                sock.sendall(b"a" * 1024)
        data, _ = read_all(sock)
    assert data.startswith(b"HTTP/1.1 200")
    with connect(guarded) as sock:  # a long URL, all of it sent
        sock.sendall(b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: test\r\n\r\n")
        status, body, _ = read_answer(sock)
    assert status == 431 and body["error"]["code"] == "headers_too_large"


@pytest.mark.parametrize(
    "framing",
    ["Content-Length: -5\r\n", "Content-Length: 5\r\nContent-Length: 7\r\n"],
    ids=["negative", "conflicting"],
)
def test_malformed_framing_is_answered_as_json(guarded: Server, framing: str) -> None:
    with connect(guarded) as sock:
        sock.sendall(head(extra=framing) + b"abcde")
        status, body, _ = read_answer(sock)
    assert status == 400
    assert body["error"]["code"] == "malformed_request"


def test_connections_over_the_cap_get_503(guarded: Server) -> None:
    # The server accepts connections in the order they came (FIFO), so the held ones are
    # counted before the next is.
    held = [connect(guarded) for _ in range(MAX_CONNECTIONS)]
    try:
        response = httpx.get(guarded.url + "/healthz", timeout=PATIENCE_S)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "too_many_connections"
        assert "Retry-After" in response.headers
    finally:
        for sock in held:
            sock.close()
    # Room again once the server has seen the held connections close.
    eventually(
        lambda: httpx.get(guarded.url + "/healthz", timeout=PATIENCE_S).status_code == 200,
        "a connection accepted after the held ones closed",
    )


def test_bad_input_catalogue_still_holds(guarded: Server) -> None:
    """The defences change nothing for ordinary clients: a keep-alive client sends several
    requests on one connection, and a bad image still gets its own 4xx."""
    with httpx.Client(base_url=guarded.url, timeout=PATIENCE_S) as client:
        assert [client.post("/detect", content=PNG).status_code for _ in range(3)] == [200] * 3
        assert client.post("/detect", content=io.BytesIO(b"GIF89a").read()).status_code == 415
