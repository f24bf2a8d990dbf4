"""``python -m bench`` (``make bench``): the whole comparison of issue #12 in one run, one table.

(a) torchvision's ``ssd300_vgg16`` (weights=None, the same number of classes) through its own
eager pipeline; (b) our ``Detector`` from JPEG bytes to detections, for every precision
``auto`` may choose here and for ``auto`` itself, and beside it the same network exported to
ONNX (``model.export``, the full graph) run by ONNX Runtime's ``OnnxDetector`` in fp32 and
in static INT8 (``model.inference.onnx_int8``); (c) the service end to end (``python -m
app``) under concurrent clients posting the same JPEGs, on torch (``SSD_PRECISION=auto``) and
on ``SSD_BACKEND=onnxruntime`` serving each ONNX file. (a) and (b) are timed at batch 1 and
8 and decode the JPEGs with PIL inside the timed call. Prints the table and the ratios (b)/(a)
and (c)/(b), writes everything with the machine's description to
``bench/results/<machine>-<date>.json``, and never fails on a time.

    .venv/bin/python -m bench [--quick] [--shipped] [--width 1.0] [--out PATH]

By default (b) and (c) run a full-width SSD300 (width 1.0, the shipped model's architecture
otherwise) with random weights, saved as a temporary checkpoint: speed does not depend on the
weights' values. ``--shipped`` runs ``weights/ssd300_shapes.safetensors`` instead.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from app.settings import DEFAULT_WEIGHTS
from bench import machine
from bench.load import run_clients
from bench.service import start_server
from bench.timing import load_figures, median_seconds
from model import Detector, ssd300_vgg16
from model.data import load_dataset
from model.data.synthetic import CLASS_NAMES
from model.evaluation.int8_guard import calibration_batches, quantize_network
from model.export import export_onnx
from model.inference import autotune
from model.inference.int8 import (
    activation_qparams,
    int8_artifact_for,
    int8_artifact_path,
    save_int8,
)
from model.inference.onnx_detector import OnnxDetector
from model.inference.onnx_int8 import onnx_int8_path, quantize_onnx
from model.inference.runtime import INT8
from model.network.preprocessing import PIXEL_MEAN
from model.network.ssd import SSD
from model.weights.checkpoint import read_metadata, save_checkpoint

JPEGS = Path("../shared/datasets/raccoon/JPEGImages")  # real photos, 0.3-1 megapixel
RESULTS = Path("bench/results")
JPEG_COUNT = 16  # distinct images cycled through by every part
BATCHES = (1, 8)  # issue #12: batch 1 and 8; 8 is also the service's SSD_MAX_BATCH_SIZE
CONCURRENCY = (1, 8, 16, 32)  # issue #12: clients at once (its target is at 16)
Rates = dict[str, dict[int, float]]  # {precision: {batch size: images/s}}
ONNX_CONCURRENCY = (1, 8, 16)  # issue #26: the onnxruntime backend at 1, 8 and 16 clients
CALIBRATION_IMAGES = 16  # int8 speed does not depend on how many images set its ranges
# Requests per level: 4 per client, and at least 32 so the percentiles rest on some data.
REQUESTS_PER_CLIENT, MIN_REQUESTS = 4, 32


def read_jpegs(folder: Path, count: int) -> list[bytes]:
    """The first ``count`` JPEG files of ``folder`` (sorted by name), as bytes.

    Raises:
        SystemExit: the folder is missing or holds no JPEG, with a message naming it.
    """
    files = sorted(folder.glob("*.jpg"))[:count]
    if not files:
        raise SystemExit(f"no JPEG images in {folder}: the benchmark needs real photos there")
    return [path.read_bytes() for path in files]


def torchvision_rates(
    jpegs: list[bytes], num_classes: int, batches: tuple[int, ...], repeats: int
) -> dict[int, float]:
    """(a) images/s of torchvision's SSD300 (random weights) per batch size, bytes in."""
    model = torchvision.models.detection.ssd300_vgg16(
        weights=None, weights_backbone=None, num_classes=num_classes
    ).eval()
    rates = {}
    for size in batches:

        @torch.inference_mode()
        def run(batch: list[bytes] = jpegs[:size]) -> None:
            images = [pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB")) for data in batch]
            model([image.float() / 255 for image in images])  # its transform normalises

        rates[size] = size / median_seconds(run, repeats=repeats, warmup=1)
    return rates


def detector_rates(
    weights: Path,
    onnx: dict[str, Path],
    jpegs: list[bytes],
    batches: tuple[int, ...],
    repeats: int,
    threads: int,
) -> tuple[Rates, Rates, autotune.PrecisionChoice | None]:
    """(b) images/s of ``Detector.predict`` from bytes, per precision and batch size, and of
    ``OnnxDetector.predict`` on each ONNX file of ``onnx`` (``{precision: path}``).

    Every precision ``auto`` may choose on the CPU is forced, and ``auto`` itself is loaded
    (choosing by its own measurement). The timed runs are interleaved, one of each detector
    and batch size per round, so that a drift of the machine's speed (another tenant, the
    clock) falls on every figure alike, not on whichever was timed last: ``auto`` against the
    fastest single precision is a comparison of a few percent. Returns the median rates
    (``{precision: {batch: images/s}}``) of torch's and of ONNX Runtime's, and what ``auto``
    measured.
    """
    int8 = [INT8] if int8_artifact_for(weights) is not None else []
    precisions = [*autotune.candidates(torch.device("cpu")), *int8, "auto"]
    detectors: dict[str, Detector | OnnxDetector] = {
        p: Detector.load(weights, device="cpu", precision=p) for p in precisions
    }
    choice = detectors["auto"].precision_choice  # type: ignore[union-attr]
    for precision, path in onnx.items():
        detectors[f"onnxruntime {precision}"] = OnnxDetector(path, threads=threads)
    runs = {}
    for name, detector in detectors.items():
        for size in batches:

            def run(batch: list[bytes] = jpegs[:size], detector: Any = detector) -> None:
                detector.predict([Image.open(io.BytesIO(data)) for data in batch])

            run()  # warm-up
            runs[name, size] = run
    seconds: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            seconds[key].append(median_seconds(run, repeats=1, warmup=0))
    rates = {
        name: {size: size / statistics.median(seconds[name, size]) for size in batches}
        for name in detectors
    }
    ours = {p: rates[p] for p in precisions}
    theirs = {p: rates[f"onnxruntime {p}"] for p in onnx}
    return ours, theirs, choice


def onnx_files(weights: Path, folder: Path) -> dict[str, Path]:
    """``weights`` exported as a full ONNX graph into ``folder``, and its ONNX Runtime INT8
    graph calibrated on ``CALIBRATION_IMAGES`` synthetic images: ``{"fp32": path, "int8":
    path}``."""
    fp32 = export_onnx(weights, folder / "model.onnx")
    images = load_dataset(f"synthetic:{CALIBRATION_IMAGES}", split="train")
    pictures = (Image.fromarray(images[i][0].permute(1, 2, 0).numpy()) for i in range(len(images)))
    return {"fp32": fp32, "int8": quantize_onnx(fp32, pictures, onnx_int8_path(fp32))}


def service_rates(
    weights: Path,
    jpegs: list[bytes],
    levels: tuple[int, ...],
    max_batch: int,
    threads: int,
    min_requests: int = MIN_REQUESTS,
    backend: str = "torch",
) -> dict[int, dict[str, float]]:
    """(c) images/s and latency percentiles (ms) of ``python -m app`` (SSD_PRECISION=auto,
    batches of at most ``max_batch``, on ``backend``: ``weights`` an .onnx file for
    onnxruntime) under each number of concurrent clients in ``levels``."""
    server = start_server(
        weights, max_batch_size=max_batch, clients=max(levels), threads=threads, backend=backend
    )
    results = {}
    try:
        for clients in levels:
            total = max(min_requests, REQUESTS_PER_CLIENT * clients)
            elapsed, latencies = asyncio.run(run_clients(server.url, jpegs, clients, total))
            results[clients] = load_figures(total, elapsed, latencies)
    finally:
        server.stop()
    return results


def ratios(report: dict) -> dict[str, float]:
    """(b)/(a) per batch size for ``auto``; ``auto`` against the fastest forced precision per
    batch size; and (c)/(b) per concurrency against ``auto`` at the service's largest batch
    (the most the service can batch)."""
    model, ours, service = report["torchvision"], report["detector"]["auto"], report["service"]
    out = {f"detector_auto/torchvision@batch{b}": ours[b] / model[b] for b in model}
    forced = [rates for name, rates in report["detector"].items() if name != "auto"]
    for b in model:
        out[f"detector_auto/fastest_forced@batch{b}"] = ours[b] / max(r[b] for r in forced)
    largest = max(ours)
    for clients, row in service.items():
        out[f"service@{clients}/detector_auto@batch{largest}"] = row["images_per_s"] / ours[largest]
    for precision, rates in report["onnxruntime"].items():
        torch_rates = report["detector"].get(precision)
        for b in rates:
            if torch_rates:
                key = f"onnxruntime_{precision}/detector_{precision}@batch{b}"
                out[key] = rates[b] / torch_rates[b]
    for precision, levels in report["onnxruntime_service"].items():
        for clients, row in levels.items():
            key = f"service_onnxruntime_{precision}@{clients}/service@{clients}"
            if clients in service:
                out[key] = row["images_per_s"] / service[clients]["images_per_s"]
    return out


def print_table(report: dict) -> None:
    """The report as one table of images/s and latencies, then the ratios."""
    info = report["machine"]
    print(f"{info['cpu_model']}, {info['torch_threads']} torch threads, torch {info['torch']}")
    print(f"model: {report['model']}; auto chose {report['auto_choice']}")
    print(f"{'pipeline':<44} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for size, rate in report["torchvision"].items():
        print(f"{'(a) torchvision ssd300_vgg16, batch ' + str(size):<44} {rate:9.2f}")
    for precision, rates in report["detector"].items():
        for size, rate in rates.items():
            print(f"{f'(b) Detector {precision}, batch {size}':<44} {rate:9.2f}")
    for precision, rates in report["onnxruntime"].items():
        for size, rate in rates.items():
            print(f"{f'(b) ONNX Runtime {precision}, batch {size}':<44} {rate:9.2f}")
    services = {"torch auto": report["service"]}
    services.update({f"onnxruntime {p}": rows for p, rows in report["onnxruntime_service"].items()})
    for backend, rows in services.items():
        for clients, row in rows.items():
            name = f"(c) service {backend}, {clients} clients"
            print(
                f"{name:<44} {row['images_per_s']:9.2f} {row['p50_ms']:8.0f} "
                f"{row['p95_ms']:8.0f} {row['p99_ms']:8.0f}"
            )
    for name, value in report["ratios"].items():
        print(f"  {name:<50} {value:.2f}x")


def _network_checkpoint(args: argparse.Namespace, folder: Path) -> tuple[Path, str]:
    """The checkpoint (b) and (c) run, and a description of it."""
    if args.shipped:
        return DEFAULT_WEIGHTS, f"{DEFAULT_WEIGHTS} (shipped)"
    path, network, description = random_checkpoint(args.width, folder)
    # Its INT8 artifact, calibrated on synthetic images (random weights time like trained
    # ones), so that int8 is timed in (b) and competes in auto in (b) and (c).
    images = load_dataset("synthetic:16", split="train")
    calibration = calibration_batches(images, 16, 8, network.input_size, PIXEL_MEAN)
    quantized = quantize_network(network.eval(), calibration)
    save_int8(int8_artifact_path(path), activation_qparams(quantized), path, {"bench": True})
    return path, description


def random_checkpoint(width: float, folder: Path) -> tuple[Path, SSD, str]:
    """An SSD300 of ``width`` with random weights and the shipped model's architecture
    otherwise (speed does not depend on the weights' values), saved in ``folder``: its path,
    the network (eval mode, on the CPU) and a description."""
    config = read_metadata(DEFAULT_WEIGHTS)["architecture"] if DEFAULT_WEIGHTS.is_file() else {}
    preset, batch_norm = config.get("preset", "fine"), config.get("batch_norm", True)
    classes = len(CLASS_NAMES) + 1
    network = ssd300_vgg16(classes, width=width, batch_norm=batch_norm, preset=preset).eval()
    path = folder / "random.safetensors"
    save_checkpoint(path, network, CLASS_NAMES)
    description = f"SSD300 width {width}, random weights ({preset}, batch_norm={batch_norm})"
    return path, network, description


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: batch 1, 1 client")
    parser.add_argument("--shipped", action="store_true", help=f"(b), (c) on {DEFAULT_WEIGHTS}")
    parser.add_argument("--width", type=float, default=1.0, help="of the random SSD300")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per figure")
    parser.add_argument("--jpegs", type=Path, default=JPEGS)
    parser.add_argument("--out", type=Path, default=None, help="the JSON file to write")
    return parser.parse_args()


def main() -> None:
    """Run (a), (b) and (c), print the table, write the JSON."""
    args = _parse_args()
    torch.set_num_threads(args.threads)
    batches = (1,) if args.quick else BATCHES
    repeats = 1 if args.quick else args.repeats
    levels = (1,) if args.quick else CONCURRENCY
    jpegs = read_jpegs(args.jpegs, JPEG_COUNT)
    with tempfile.TemporaryDirectory() as tmp:
        weights, description = _network_checkpoint(args, Path(tmp))
        report: dict = {"machine": machine.describe(), "model": description}
        report["command"] = "python -m bench " + " ".join(sys.argv[1:])
        report["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        report["torchvision"] = torchvision_rates(jpegs, len(CLASS_NAMES) + 1, batches, repeats)
        onnx = onnx_files(weights, Path(tmp))
        report["detector"], report["onnxruntime"], choice = detector_rates(
            weights, onnx, jpegs, batches, repeats, args.threads
        )
        report["auto_choice"] = choice.summary() if choice else "nothing to choose"
        requests = 4 if args.quick else MIN_REQUESTS
        report["service"] = service_rates(
            weights, jpegs, levels, max(batches), args.threads, requests
        )
        onnx_levels = (1,) if args.quick else ONNX_CONCURRENCY
        report["onnxruntime_service"] = {
            precision: service_rates(
                path, jpegs, onnx_levels, max(batches), args.threads, requests, "onnxruntime"
            )
            for precision, path in onnx.items()
        }
    report["ratios"] = ratios(report)
    print_table(report)
    out = args.out or RESULTS / f"{_machine_name()}-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def _machine_name() -> str:
    """The host name, reduced to characters safe in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", machine.describe()["hostname"] or "machine")


if __name__ == "__main__":
    main()
