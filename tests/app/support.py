"""Helpers for the service tests: the in-process client, the real server (``python -m app``
in a subprocess), test images, metric parsing."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image, ImageDraw

from app.settings import DEFAULT_WEIGHTS, ENV_PREFIX, Settings
from model.data.synthetic import CLASS_NAMES as CLASS_NAMES  # of every checkpoint here
from tests.support.server_process import REPO, ServerProcess
from tests.support.server_process import free_port as free_port  # re-exported: tests/deploy use it

# The shipped model; tests that need trained weights skip without it.
SHIPPED_WEIGHTS = REPO / DEFAULT_WEIGHTS


# Small batching settings shared by the default test server: batches of up to 8, formed within
# 30 ms, so 32 concurrent clients give several multi-image batches.
DEFAULT_ENV = {
    "SSD_MAX_BATCH_SIZE": "8",
    "SSD_MAX_WAIT_MS": "30",
    "SSD_MAX_QUEUE": "64",
    "SSD_MAX_UPLOAD_BYTES": "3000000",
    "SSD_MAX_IMAGE_PIXELS": "20000000",
    "SSD_REQUEST_TIMEOUT_S": "60",
    "SSD_DEVICE": "cpu",
}


def settings_from(env: dict[str, str], **overrides: object) -> Settings:
    """The ``Settings`` a server started with the SSD_* variables ``env`` reads, plus
    ``overrides`` (field names); so in-process apps and real servers share one configuration."""
    fields = {key.removeprefix(ENV_PREFIX).lower(): value for key, value in env.items()}
    return Settings(**{**fields, **overrides})


class Server(ServerProcess):
    """``python -m app`` in a subprocess on 127.0.0.1 with one torch thread (unless ``env``
    says otherwise) and the given SSD_* settings; its output goes to ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path, log_level: str = "warning") -> None:
        threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        super().__init__({**threads, **env}, log_path, log_level)

    def metrics(self) -> str:
        """The /metrics text."""
        return httpx.get(self.url + "/metrics", timeout=PATIENCE_S).text


def metric(text: str, sample: str, /, **labels: str) -> float:
    """The value of the sample ``sample{labels}`` in Prometheus text (0.0 if absent)."""
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)$", line)
        if not match or match.group(1) != sample:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(3) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(4))
    return 0.0


def check_answer(response: httpx.Response, status: int, code: str | None) -> None:
    """``response`` has ``status``, and is a detection body (``code`` None) or an error body
    with that ``code``, a message and no traceback."""
    assert response.status_code == status, response.text
    body = response.json()
    if code is None:
        assert set(body) == {"detections", "image", "model"}
    else:
        assert set(body) == {"error"}
        assert body["error"]["code"] == code
        assert body["error"]["message"]
        assert "Traceback" not in response.text


@asynccontextmanager
async def in_process(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s lifespan and give a client that calls it in-process (no socket)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


def detect_scope(length: int, query: bytes = b"") -> dict[str, Any]:
    """The ASGI scope a server passes on for ``POST /detect?query`` with a PNG body of
    ``length`` bytes, for tests that drive the app's receive and send themselves."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/detect",
        "raw_path": b"/detect",
        "query_string": query,
        "root_path": "",
        "headers": [
            (b"host", b"app"),
            (b"content-type", b"image/png"),
            (b"content-length", str(length).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }


# The guarded server's connection limits: short, so the tests of them stay fast.
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 24
MAX_HEADER_BYTES = 4096
GUARDED_ENV = {
    "SSD_DEVICE": "cpu",
    "SSD_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "SSD_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "SSD_MIN_BODY_RATE": "1000",
    "SSD_KEEP_ALIVE_S": "1",
    "SSD_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "SSD_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
    "SSD_REQUEST_TIMEOUT_S": "10",
}


# ---- waiting on a real server -----------------------------------------------------------

# How long a test waits for something the server does by itself (a timeout firing, a log line
# written, memory given back). Long on purpose: every wait ends as soon as the thing happens,
# so this only costs time when it never does, and CI's 2-core machine may be busy.
PATIENCE_S = 60.0
# How late a server-side timeout may fire and still count as honoured. It fires on the
# server's event loop, which a batch on the CPU or a busy machine can hold up; 10 s allows for
# a machine many times slower than ours (docs/test-suite.md), while a server that ignores the
# timeout holds the connection for all of PATIENCE_S.
LATENESS_S = 10.0

T = TypeVar("T")


def eventually(check: Callable[[], T], what: str, patience: float = PATIENCE_S) -> T:
    """``check()``'s first truthy value, polled every 0.1 s; AssertionError naming ``what``
    and the last value if none comes within ``patience`` seconds."""
    end = time.monotonic() + patience
    while not (value := check()):
        assert time.monotonic() < end, f"{what}: not within {patience:.0f} s (last: {value!r})"
        time.sleep(0.1)
    return value


# ---- raw HTTP to a real server ----------------------------------------------------------


def connect(server: ServerProcess) -> socket.socket:
    """A TCP connection to ``server``."""
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def head(path: str = "/detect", content_length: int | None = None, extra: str = "") -> bytes:
    """A POST request's head (PNG body declared), with ``extra`` header lines."""
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: image/png"]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def read_all(sock: socket.socket, timeout: float = PATIENCE_S) -> tuple[bytes, float]:
    """Everything the server sends on ``sock`` until it closes, and the seconds that took.

    Raises:
        AssertionError: the server kept the connection open for ``timeout`` seconds.
    """
    sock.settimeout(timeout)
    start, data = time.monotonic(), b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError(
                f"the server kept the connection open for {timeout:.0f} s; got {data[:200]!r}"
            ) from None
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def read_answer(sock: socket.socket, timeout: float = PATIENCE_S) -> tuple[int, dict, float]:
    """(status, JSON body, seconds until the server closed) of the one response on ``sock``;
    status 0 if the server closed without answering."""
    data, elapsed = read_all(sock, timeout)
    if not data:
        return 0, {}, elapsed
    header, _, body = data.partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}, elapsed


# ---- images -------------------------------------------------------------------------------

# A large red circle and a blue square on a light background, boxes xyxy in pixel edges.
SHAPES_SIZE = (480, 360)
CIRCLE_BOX = (40.0, 60.0, 220.0, 240.0)
SQUARE_BOX = (270.0, 110.0, 430.0, 270.0)


def shapes_image(size: tuple[int, int] = SHAPES_SIZE) -> Image.Image:
    """The test scene: ``CIRCLE_BOX`` filled red, ``SQUARE_BOX`` filled blue."""
    image = Image.new("RGB", size, (236, 236, 228))
    draw = ImageDraw.Draw(image)
    # PIL's ellipse/rectangle take inclusive end pixels: the box's right edge minus one.
    x0, y0, x1, y1 = CIRCLE_BOX
    draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=(214, 32, 32))
    x0, y0, x1, y1 = SQUARE_BOX
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(30, 60, 210))
    return image


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    """``image`` saved in ``fmt`` to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is rewritten to claim width x height (CRC fixed)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    # IHDR data starts after the 8-byte signature, 4-byte length and 4-byte type (offset 16).
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def sixteen_bit_png() -> bytes:
    """A 16-bit greyscale PNG with values spanning 0..65535."""
    ramp = np.linspace(0, 65535, 320 * 240, dtype=np.float64).reshape(240, 320)
    return encode(Image.fromarray(ramp.astype(np.uint16)), "PNG")


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two xyxy boxes (a test-side check, independent of model.network.boxes)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_tuple(detection: dict) -> tuple[float, float, float, float]:
    """A response detection's box as an xyxy tuple."""
    box = detection["box"]
    return (box["x_min"], box["y_min"], box["x_max"], box["y_max"])


# ---- a real browser ----------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
# No sandbox (CI runs as root), and nothing that reaches out to the network on its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, driven through Playwright (which never downloads a
    browser here): a ``playwright.sync_api.Browser``. Skips where Chromium is not installed,
    and fails in CI, which installs it."""
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium package")
        pytest.skip("Chromium is not installed (apt-get install chromium); CI installs it")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
