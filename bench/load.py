"""The load generator: concurrent HTTP clients posting JPEGs to ``POST /detect``.

``run_clients`` is the benchmarks' one client loop (``python -m bench``, ``bench.service``,
``bench.gpu``). ``python -m bench.load`` runs it in a process of its own, so that a benchmark
can spread many clients over several processes (one Python process of httpx clients tops out
below the rates a GPU service may reach): it prints ``ready``, waits for a line on stdin (the
parent's start signal, so all processes start together), runs, and prints one JSON line
``{"elapsed_s": ..., "latencies_s": [...]}``. Only light imports: no torch.

    python -m bench.load --url http://127.0.0.1:8000 --clients 16 --requests 256 [--size 640x480]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time

import httpx
from PIL import Image, ImageDraw

IMAGE_COUNT = 16  # distinct images cycled through by the clients


def scenes(size: tuple[int, int] = (480, 360)) -> list[bytes]:
    """JPEGs of ``size`` (width, height) scenes, a circle and a square at varying places
    (laid out for 480x360 and scaled to ``size``)."""
    images = []
    sx, sy = size[0] / 480, size[1] / 360
    for i in range(IMAGE_COUNT):
        image = Image.new("RGB", size, (230, 232, 225))
        draw = ImageDraw.Draw(image)
        x = 20 + 12 * i
        draw.ellipse((x * sx, 40 * sy, (x + 150) * sx, 190 * sy), fill=(210, 40, 40))
        square = (300 - 5 * i) * sx, 150 * sy, (440 - 5 * i) * sx, 290 * sy
        draw.rectangle(square, fill=(40, 70, 200))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


async def run_clients(
    url: str, images: list[bytes], clients: int, total: int
) -> tuple[float, list[float]]:
    """Elapsed seconds and per-request latencies (seconds) for ``total`` POST /detect requests
    of JPEG ``images`` (cycled) by ``clients`` concurrent clients, one request at a time each."""
    latencies: list[float] = []
    counter = iter(range(total))

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:
            start = time.perf_counter()
            response = await http.post(
                "/detect", content=images[i % len(images)], headers={"Content-Type": "image/jpeg"}
            )
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await http.post("/detect", content=images[0], headers={"Content-Type": "image/jpeg"})
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - start, latencies


def _size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def main() -> None:
    """Run ``--clients`` clients for ``--requests`` requests after the start signal."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--size", type=_size, default=(480, 360), help="WIDTHxHEIGHT")
    args = parser.parse_args()
    images = scenes(args.size)
    print("ready", flush=True)
    sys.stdin.readline()
    elapsed, latencies = asyncio.run(run_clients(args.url, images, args.clients, args.requests))
    print(json.dumps({"elapsed_s": elapsed, "latencies_s": latencies}), flush=True)


if __name__ == "__main__":
    main()
