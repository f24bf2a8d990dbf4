"""The service process's resident memory: freed memory goes back to the system
(``app/memory.py``), and tiny files declaring huge images cost little (the reduced-scale JPEG
decode of ``app/images.py`` under its pixel budget).

Real server: what is measured is the resident size (RSS) of the ``python -m app`` process,
which a test process sharing its heap with the app could not tell apart from its own.
"""

from __future__ import annotations

import asyncio
import struct
import time
from pathlib import Path

import httpx
from PIL import Image

from app.memory import TRIM_INTERVAL_S
from tests.app.support import (
    PATIENCE_S,
    Server,
    connect,
    encode,
    eventually,
    head,
    shapes_image,
)

PNG = encode(shapes_image((320, 240)), "PNG")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A valid 16x16 baseline JPEG whose frame header is rewritten to claim width x height:
    a few hundred bytes that a full decode would allocate width x height for."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 90, 90)), "JPEG", quality=50))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _round_of(server: Server, data: bytes, count: int = 16) -> list[int]:
    async def post_all() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=PATIENCE_S) as client:
            posts = [client.post("/detect", content=data) for _ in range(count)]
            return [r.status_code for r in await asyncio.gather(*posts)]

    return asyncio.run(post_all())


def test_tiny_jpegs_declaring_huge_images_leave_memory_bounded(guarded: Server) -> None:
    data = jpeg_declaring(6000, 6000)
    assert len(data) < 1000
    # Rounds of ordinary images first: the batches' own working memory is not the point.
    for _ in range(2):
        assert _round_of(guarded, PNG) == [200] * 16
    before = rss_bytes(guarded.process.pid)
    peaks = []
    for _ in range(3):
        statuses = _round_of(guarded, data)
        assert set(statuses) <= {200, 400}, statuses  # a truncated scan: grey pixels or 400
        peaks.append(rss_bytes(guarded.process.pid))
    growth = max(peaks) - before
    print(f"RSS {before / 2**20:.0f} MiB -> {[round(p / 2**20) for p in peaks]} MiB")
    # Decoded at full scale, 16 x 6000 x 6000 x 3 bytes would be 1.7 GB (the unfixed service
    # grew by 850 MiB here); at the 1/8 DCT scale each is 750 x 750, and the pixel budget
    # bounds how many are held at once. What growth remains is the batches' working memory
    # and the allocator's slack: 30 to 105 MiB measured here.
    assert growth < 250 * 2**20, growth


def test_memory_of_abandoned_uploads_goes_back(guarded: Server) -> None:
    # From a trimmed baseline: free memory left by earlier tests would be reused by the
    # bodies, hiding them.
    time.sleep(TRIM_INTERVAL_S + 0.5)
    before = rss_bytes(guarded.process.pid)
    body = b"x" * (8 * 2**20)
    socks = []
    for _ in range(20):  # 160 MiB of bodies held at once, never finished
        sock = connect(guarded)
        sock.sendall(head(content_length=len(body) + 100) + body)
        socks.append(sock)
    # The bodies were really held: polled, as a busy server reads them more slowly.
    during = eventually(
        lambda: (rss := rss_bytes(guarded.process.pid)) - before > 100 * 2**20 and rss,
        "100 MiB of bodies held",
    )
    for sock in socks:
        sock.close()
    # Given back at a trim (every TRIM_INTERVAL_S), however late a busy machine runs it.
    after = eventually(
        lambda: (rss := rss_bytes(guarded.process.pid)) - before < 15 * 2**20 and rss,
        "the bodies' memory given back",
    )
    print(f"RSS {before / 2**20:.0f} -> {during / 2**20:.0f} -> {after / 2**20:.0f} MiB")
