"""One image at a time through the service, as an NVR's detector client sends them: the latency
of each route for the same image, sequential requests, each on a new connection (Frigate's
DeepStack detector calls ``requests.post`` without a session).

    python -m bench.latency [--requests 200] [--size 320] [--weights PATH]

It starts ``python -m app`` (the shipped model unless ``--weights``), warms it up, then sends
``--requests`` requests to each route in turn and prints p50, p90 and p99 in milliseconds. The
image is the test scene (a circle and a square) resized to ``--size`` pixels square: Frigate
sends its detector the model's input, 320 x 320 by default.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import requests
from PIL import Image, ImageDraw

from tests.support.server_process import ServerProcess

ROUTES = ("/v1/vision/detection", "/detect")  # both take the multipart field "image"


def scene(size: int) -> bytes:
    """A red circle and a blue square on a light background, as a JPEG."""
    image = Image.new("RGB", (480, 360), (236, 236, 228))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 60, 219, 239), fill=(214, 32, 32))
    draw.rectangle((270, 110, 429, 269), fill=(30, 60, 210))
    buffer = io.BytesIO()
    image.resize((size, size)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p90 and p99 in milliseconds."""
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {f"p{p}": round(cuts[p - 1] * 1000, 1) for p in (50, 90, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--weights", help="SSD_WEIGHTS (default: the shipped model)")
    args = parser.parse_args()
    image = scene(args.size)
    env = {"SSD_WEIGHTS": args.weights} if args.weights else {}
    with tempfile.TemporaryDirectory() as folder:
        server = ServerProcess(env, Path(folder) / "server.log").wait_ready()
        try:
            for route in ROUTES:
                url = server.url + route
                for _ in range(10):  # warm-up: connections, allocator, caches
                    requests.post(url, files={"image": image}, timeout=30)
                times = []
                for _ in range(args.requests):
                    started = time.perf_counter()
                    response = requests.post(url, files={"image": image}, timeout=30)
                    times.append(time.perf_counter() - started)
                    response.raise_for_status()
                print(f"{route:<24} {args.requests} requests, {args.size} px: {percentiles(times)}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
