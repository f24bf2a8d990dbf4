"""Reading request bodies (``app/uploads.py``): the size cap, multipart fields, and the body's
time and rate limits.

The size and multipart tests run in process. The slow and half-sent bodies use the real
server: what they test is bytes trickling in, or stopping, on a socket, which the in-process
transport (it hands the app the whole body at once) cannot do.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.app.support import (
    BODY_TIMEOUT_S,
    LATENESS_S,
    Server,
    check_answer,
    connect,
    encode,
    eventually,
    head,
    metric,
    read_answer,
    shapes_image,
)

JPEG = encode(shapes_image(), "JPEG", quality=90)


# ---- in process ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    body = JPEG + b"\0" * (3_000_001 - len(JPEG))  # SSD_MAX_UPLOAD_BYTES is 3000000
    response = await client.post("/detect", content=body, headers={"Content-Type": "image/jpeg"})
    check_answer(response, 413, "too_large")


@pytest.mark.anyio
async def test_oversized_chunked_body_without_length_is_413(client: httpx.AsyncClient) -> None:
    async def chunks():
        for _ in range(40):
            yield b"\0" * 100_000

    response = await client.post(
        "/detect", content=chunks(), headers={"Content-Type": "image/jpeg"}
    )
    assert "content-length" not in response.request.headers  # sent chunked
    check_answer(response, 413, "too_large")


@pytest.mark.anyio
async def test_missing_multipart_field_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/detect", files={"picture": ("a.jpg", JPEG, "image/jpeg")})
    check_answer(response, 422, "bad_request")
    assert "'image'" in response.json()["error"]["message"]


@pytest.mark.anyio
async def test_text_in_the_image_field_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/detect",
        data={"image": "not a file"},
        files={"note": ("note.txt", b"forces multipart", "text/plain")},
    )
    check_answer(response, 422, "bad_request")


@pytest.mark.anyio
async def test_form_urlencoded_body_is_judged_by_its_bytes(client: httpx.AsyncClient) -> None:
    response = await client.post("/detect", data={"image": "not a file"})
    check_answer(response, 415, "unsupported_type")


@pytest.mark.anyio
async def test_malformed_multipart_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/detect",
        content=b"--x\r\nnot a header\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    check_answer(response, 422, "bad_request")


# ---- real server: bodies that trickle or stop ------------------------------------------------


def test_slow_body_gets_408_and_the_connection_closes(guarded: Server) -> None:
    # Content-Length 1,000 bytes more than is sent: the server must not wait for the rest.
    with connect(guarded) as sock:
        sock.sendall(head(content_length=1003) + b"abc")
        status, body, elapsed = read_answer(sock)
    assert status == 408, body
    assert body["error"]["code"] == "slow_upload"
    assert elapsed < BODY_TIMEOUT_S + LATENESS_S  # at the rate limit or the body timeout


def test_half_sent_body_then_close_counts_499_and_logs_no_traceback(guarded: Server) -> None:
    before = guarded.metrics()
    for _ in range(5):
        with connect(guarded) as sock:
            sock.sendall(head(content_length=1000) + b"abc")
            time.sleep(0.1)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    def all_counted() -> bool:
        nonlocal after
        after = guarded.metrics()
        return delta("ssd_requests_total", route="/detect", status="499") >= 5

    after = ""
    eventually(all_counted, "five abandoned uploads counted")

    assert delta("ssd_requests_total", route="/detect", status="499") == 5
    assert delta("ssd_rejected_total", reason="disconnected") == 5
    assert delta("ssd_requests_total", route="/detect", status="500") == 0
    assert "Traceback" not in guarded.output()
