"""One image at a time through the service, as an NVR's detector client sends them: the latency
of each way of asking for the same image, sequential requests, each on a new connection
(Frigate's DeepStack detector calls ``requests.post`` without a session).

    python -m bench.latency [--requests 200] [--size 320] [--weights PATH]

It starts ``python -m app`` (the shipped model unless ``--weights``) twice: without API keys,
then with them. It warms each up, sends ``--requests`` requests of each case in turn and prints
p50, p90 and p99 in milliseconds: the DeepStack route, ``/detect``, ``/detect`` with a class
filter (the cost of filters), and ``/detect`` with a key on the server with keys (the cost of
authentication). The image is the test scene (a circle and a square) resized to ``--size``
pixels square: Frigate sends its detector the model's input, 320 x 320 by default.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import requests

from tests.app.support import encode, shapes_image
from tests.support.server_process import ServerProcess

KEY = "bench-key-0123456789"
# (server, label, path, headers): every case posts the image in the multipart field "image".
CASES = (
    ("open", "/v1/vision/detection", "/v1/vision/detection", {}),
    ("open", "/detect", "/detect", {}),
    ("open", "/detect?classes=circle", "/detect?classes=circle", {}),
    ("keyed", "/detect with a key", "/detect", {"X-API-Key": KEY}),
)


def scene(size: int) -> bytes:
    """The test scene (a red circle and a blue square), ``size`` pixels square, as a JPEG."""
    return encode(shapes_image().resize((size, size)), "JPEG", quality=90)


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
    base = {"SSD_WEIGHTS": args.weights} if args.weights else {}
    servers = {"open": base, "keyed": {**base, "SSD_API_KEYS": KEY}}
    with tempfile.TemporaryDirectory() as folder:
        for name, env in servers.items():
            server = ServerProcess(env, Path(folder) / f"{name}.log").wait_ready()
            try:
                for where, label, path, headers in CASES:
                    if where == name:
                        times = _timed(server.url + path, image, headers, args.requests)
                        print(f"{label:<28} {args.requests} x {args.size} px: {percentiles(times)}")
            finally:
                server.stop()


def _timed(url: str, image: bytes, headers: dict[str, str], count: int) -> list[float]:
    """Seconds of each of ``count`` sequential posts, after 10 to warm up."""
    for _ in range(10):  # connections, allocator, caches
        requests.post(url, files={"image": image}, headers=headers, timeout=30).raise_for_status()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        response = requests.post(url, files={"image": image}, headers=headers, timeout=30)
        times.append(time.perf_counter() - started)
        response.raise_for_status()
    return times


if __name__ == "__main__":
    main()
