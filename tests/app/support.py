"""Helpers for the service tests: a uvicorn subprocess, test images, metric parsing."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
from fastapi import FastAPI
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]
# The shipped model; tests that need trained weights skip without it.
SHIPPED_WEIGHTS = REPO / "weights" / "ssd300_shapes.safetensors"
CLASS_NAMES = ["circle", "square", "triangle", "star", "cross", "bar"]
READY_TIMEOUT_S = 90.0  # start-up imports torch and builds the model on a busy 2-core machine


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (free when asked; the server binds it right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(port: int) -> list[str]:
    """The command that serves the app as ``make run`` does (``python -m app``), on
    127.0.0.1:``port``."""
    return [
        sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning",
    ]  # fmt: skip


class Server:
    """``python -m app`` in a subprocess on 127.0.0.1, one torch thread, given SSD_* env.

    Output goes to ``log_path`` (a pipe could fill up and block the server).
    """

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SSD_")},
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            **env,
        }
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            server_command(self.port),
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        """What the server printed so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> Server:
        """Block until /readyz answers 200; fail with the server's output if it dies."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"server exited with {code}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.output()}")

    def stop(self) -> None:
        """SIGINT (no drain delay), then kill if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def metrics(self) -> str:
        """The /metrics text."""
        return httpx.get(self.url + "/metrics", timeout=10).text


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


@asynccontextmanager
async def in_process(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s lifespan and give a client that calls it in-process (no socket)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


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
    """IoU of two xyxy boxes (a test-side check, independent of model.boxes)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_tuple(detection: dict) -> tuple[float, float, float, float]:
    """A response detection's box as an xyxy tuple."""
    box = detection["box"]
    return (box["x_min"], box["y_min"], box["x_max"], box["y_max"])
