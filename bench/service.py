"""The HTTP service under N concurrent clients against the bare model, in the same run.

Starts ``python -m app`` on 127.0.0.1, has ``--clients`` clients post ``--requests``
images in all (each client one request at a time), and reads the mean batch size from
/metrics. Then, with the server stopped, runs ``Detector.predict`` on batches of the same
sizes (the mean batch size and the maximum) from the same encoded images. Prints images/s,
latency percentiles and the service / bare-model ratio; never fails on a time.

    .venv/bin/python -m bench.service [--clients 32] [--requests 256] [--weights PATH]

Without ``--weights`` it uses the shipped model, or a small random one when that is absent
(the ratio still means something: both sides run the same network).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import statistics
import tempfile
from pathlib import Path

import httpx
import torch
from PIL import Image

from app.settings import DEFAULT_WEIGHTS
from bench.load import run_clients, scenes
from bench.timing import median_seconds
from model import Detector, ssd300_vgg16
from model.data.synthetic import CLASS_NAMES
from model.weights.checkpoint import save_checkpoint
from tests.support.server_process import ServerProcess

READY_TIMEOUT_S = 120.0


def metric(text: str, name: str, label: str = "") -> float:
    """The sample ``name`` of Prometheus text ``text``, summed over its series (one per model)
    whose labels contain ``label`` (e.g. ``stage="decode"``; empty: all)."""
    found = re.findall(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", text, re.MULTILINE)
    return sum(float(value) for labels, value in found if label in labels)


def start_server(
    weights: Path,
    *,
    precision: str = "auto",
    max_batch_size: int = 8,
    max_wait_ms: float = 10.0,
    clients: int = 32,
    threads: int = 1,
    device: str = "cpu",
    backend: str = "torch",
) -> ServerProcess:
    """``python -m app`` serving ``weights`` on ``device`` with these settings, ready.

    The server's stdout is its JSON access log, a line per request: not wanted here, so it is
    discarded. Its warnings and errors go to stderr, which stays.
    """
    env = {
        "SSD_BACKEND": backend,  # onnxruntime: weights is an .onnx file (model.export)
        "SSD_WEIGHTS": str(weights.resolve()),  # the server runs from the repository root
        "SSD_DEVICE": device,
        "SSD_PRECISION": precision,
        "SSD_MAX_BATCH_SIZE": str(max_batch_size),
        "SSD_MAX_WAIT_MS": str(max_wait_ms),
        "SSD_MAX_QUEUE": str(max(64, 2 * clients)),
        "SSD_MAX_CONNECTIONS": str(max(256, 2 * clients)),  # the clients' and a few more
        "SSD_REQUEST_TIMEOUT_S": "300",
        "OMP_NUM_THREADS": str(threads),
    }
    server = ServerProcess(env)
    try:
        return server.wait_ready(READY_TIMEOUT_S)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--precision", default="auto", help="for both sides: auto, fp32, bf16 or fp16"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights or (DEFAULT_WEIGHTS if DEFAULT_WEIGHTS.is_file() else None)
        if weights is None:
            weights = Path(tmp) / "random.safetensors"
            network = ssd300_vgg16(7, width=0.25, batch_norm=True, preset="coco").eval()
            save_checkpoint(weights, network, CLASS_NAMES)
            print(f"{DEFAULT_WEIGHTS} not found: using a random SSD300 of width 0.25")
        images = scenes()

        server = start_server(
            weights,
            precision=args.precision,
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            clients=args.clients,
            threads=args.threads,
        )
        url = server.url
        try:
            before = httpx.get(url + "/metrics").text
            elapsed, latencies = asyncio.run(run_clients(url, images, args.clients, args.requests))
            after = httpx.get(url + "/metrics").text
        finally:
            server.stop()
        batches = metric(after, "ssd_batch_size_count") - metric(before, "ssd_batch_size_count")
        batched = metric(after, "ssd_batch_size_sum") - metric(before, "ssd_batch_size_sum")
        mean_batch = batched / batches if batches else float("nan")
        service_rate = args.requests / elapsed

        torch.set_num_threads(args.threads)
        detector = Detector.load(weights, device="cpu", precision=args.precision)
        bare = {}
        for size in sorted({max(1, round(mean_batch)), args.max_batch_size}):
            batch = images[:size] if size <= len(images) else (images * size)[:size]

            def run(batch: list[bytes] = batch) -> None:
                detector.predict([Image.open(io.BytesIO(data)) for data in batch])

            bare[size] = size / median_seconds(run, repeats=args.repeats, warmup=1)

    cuts = statistics.quantiles(latencies, n=100)
    print(
        f"model {weights} ({detector.precision}), {args.threads} torch threads, batches of at most "
        f"{args.max_batch_size} within {args.max_wait_ms} ms"
    )
    print(f"service, {args.clients} clients, {args.requests} requests:")
    print(
        f"  {service_rate:7.1f} images/s   latency p50 {cuts[49] * 1000:.0f} ms, "
        f"p95 {cuts[94] * 1000:.0f} ms, p99 {cuts[98] * 1000:.0f} ms"
    )
    print(f"  mean batch size {mean_batch:.2f} ({batches:.0f} batches, from /metrics)")
    print("bare model (Detector.predict, decode included, no HTTP):")
    for size, rate in bare.items():
        ratio = service_rate / rate
        print(f"  batch {size:3d}  {rate:7.1f} images/s   service / bare {ratio:.2f}x")


if __name__ == "__main__":
    main()
