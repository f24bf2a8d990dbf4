"""``python -m bench.gpu``: issue #27's GPU figures in one run, one table, one JSON.

(network) the full-width SSD300 (random weights, the shipped model's architecture otherwise)
at batch 1, 8, 32, 64 and 128 in fp32, bf16 and fp16, placed and run as ``Detector.run_batch``
runs it (``Detector.runtime``: the device, channels_last for fp16/bf16, autocast), beside
torchvision's ``ssd300_vgg16`` (weights=None) network (backbone and head, no transform or
post-processing) in each precision; inputs already on the GPU.
(service) ``python -m app`` on the GPU (SSD_PRECISION=auto) under 64 and 256 concurrent
clients posting 640x480 JPEGs over loopback, spread over a few client processes
(``bench.load``): images/s and p50/p95/p99 latency.
(training) ``Trainer.train_step`` (the MultiBox loss, backward, SGD step) at batch 32 in
fp32 and with AMP (bf16, fp16 with a loss scaler), batches from the CPU as a loader gives them.

Each part that fails is recorded under ``errors`` and the others still run. Prints a table
with issue #27's targets beside the figures (never a verdict) and writes the JSON.

    python -m bench.gpu [--out PATH] [--dry-run]

``--dry-run`` runs every part on the CPU at tiny sizes (width 0.125, batch 1 and 2, a few
clients, two steps): a check of the plumbing (tests/bench/test_gpu.py), not of speed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import json
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import torch
import torchvision

from app.settings import DEFAULT_WEIGHTS
from bench import gpu_profile, machine
from bench.__main__ import RESULTS, _machine_name, random_checkpoint
from bench.service import metric, start_server
from bench.timing import load_figures, median_seconds
from model import Detector
from model.data.loader import AugmentedDataset, collate
from model.data.synthetic import CLASS_NAMES, SyntheticShapes
from model.data.transforms import EvalTransform
from model.inference.autotune import NOISE_STD
from model.inference.runtime import Runtime
from model.network.loss import MultiBoxLoss
from model.network.ssd import SSD
from model.train import MOMENTUM, WEIGHT_DECAY
from model.training.distributed import Processes
from model.training.trainer import Optimisation, StepPlan, Trainer, TrainingData
from model.weights.checkpoint import RunFiles
from tests.support.server_process import REPO

# Issue #27's targets, printed beside the figures.
TARGETS = {
    "network_images_per_s": 5000.0,  # the model path at its best batch size
    "service_images_per_s": 2000.0,
    "service_p99_ms": 100.0,
    "training_images_per_s": 800.0,  # with AMP
}
LEARNING_RATE = 1e-3  # model.train's default --lr from trained weights (the paper's)


@dataclass(frozen=True)
class Sizes:
    """What one run measures, and how much."""

    device: str
    width: float
    batches: tuple[int, ...]
    precisions: tuple[str, ...]
    repeats: int  # timed runs per figure (median kept)
    warmup: int  # untimed runs before them (cuDNN's first-call set-up among them)
    clients: tuple[int, ...]  # concurrency levels of the service
    requests_per_client: int
    client_processes: int  # the clients of a level are spread over this many processes
    image_size: tuple[int, int]  # (width, height) of the posted JPEGs
    service_precision: str
    service_max_batch: int
    train_batch: int
    train_steps: int


FULL = Sizes(
    device="cuda",
    width=1.0,
    batches=(1, 8, 32, 64, 128),  # issue #27
    precisions=("fp32", "bf16", "fp16"),
    repeats=10,
    warmup=3,
    clients=(64, 256),  # issue #27
    # 16 per client: 4,096 requests at 256 clients, about 2 s at the 2,000 images/s target.
    requests_per_client=16,
    client_processes=4,
    image_size=(640, 480),  # issue #27
    service_precision="auto",
    # The largest batch the service forms here; kept at the 64 of earlier runs (then the
    # largest CUDA-graph bucket, since removed: docs/gpu-path.md) so their figures compare.
    service_max_batch=64,
    train_batch=32,  # issue #27
    train_steps=10,
)
DRY_RUN = Sizes(
    device="cpu",
    width=0.125,
    batches=(1, 2),
    precisions=("fp32", "bf16"),  # fp16 autocast on a CPU is slow and no serving path
    repeats=1,
    warmup=1,
    clients=(2, 4),
    requests_per_client=2,
    client_processes=2,
    image_size=(64, 48),
    service_precision="fp32",  # auto would spend its 2 s measuring
    service_max_batch=2,
    train_batch=2,
    train_steps=2,
)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_rate(run: Callable[[], object], images: int, sizes: Sizes) -> float:
    """Images/s of ``run`` (``images`` per call), device work included: the median of
    ``sizes.repeats`` calls after ``sizes.warmup`` more."""
    device = torch.device(sizes.device)

    def synced() -> None:
        run()
        _synchronize(device)

    return images / median_seconds(synced, repeats=sizes.repeats, warmup=sizes.warmup)


def network_rates(network: SSD, sizes: Sizes) -> dict[str, dict[str, dict[int, float]]]:
    """Images/s of our network per precision and batch size, and of torchvision's per
    precision: ``{"ours": {...}, "torchvision": {...}}``."""
    ours: dict[str, dict[int, float]] = {}
    for precision in sizes.precisions:
        detector = Detector(
            copy.deepcopy(network), CLASS_NAMES, device=sizes.device, precision=precision
        )

        @torch.inference_mode()
        def forward(x: torch.Tensor, detector: Detector = detector) -> object:
            with detector.runtime.autocast():
                return detector.network(x)

        ours[precision] = _batch_rates(forward, detector.runtime, sizes)
        del detector, forward
        _free(sizes.device)
    theirs = torchvision.models.detection.ssd300_vgg16(
        weights=None, weights_backbone=None, num_classes=len(CLASS_NAMES) + 1
    ).eval()
    torchvision_rates: dict[str, dict[int, float]] = {}
    for precision in sizes.precisions:
        runtime = Runtime.resolve(sizes.device, precision)
        runtime.place(theirs)

        @torch.inference_mode()
        def forward(x: torch.Tensor, runtime: Runtime = runtime) -> object:
            with runtime.autocast():
                features = list(theirs.backbone(x).values())  # OrderedDict of 6 maps -> list
                return theirs.head(features)

        torchvision_rates[precision] = _batch_rates(forward, runtime, sizes)
    return {"ours": ours, "torchvision": torchvision_rates}


def _batch_rates(
    forward: Callable[[torch.Tensor], object], runtime: Runtime, sizes: Sizes
) -> dict[int, float]:
    """Images/s of ``forward`` on noise images per batch size of ``sizes.batches``."""
    return {
        size: _timed_rate(functools.partial(forward, _noise(runtime, size)), size, sizes)
        for size in sizes.batches
    }


def _noise(runtime: Runtime, size: int) -> torch.Tensor:
    """A batch of ``size`` noise images on the runtime's device and layout."""
    generator = torch.Generator().manual_seed(0)
    return runtime.inputs(NOISE_STD * torch.randn(size, 3, 300, 300, generator=generator))


def _free(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def service_rates(weights: Path, sizes: Sizes) -> dict[int, dict[str, float]]:
    """Images/s and latency percentiles (ms) of ``python -m app`` per number of clients."""
    server = start_server(
        weights,
        precision=sizes.service_precision,
        max_batch_size=sizes.service_max_batch,
        clients=max(sizes.clients),
        threads=torch.get_num_threads(),
        device=sizes.device,
    )
    results = {}
    try:
        for clients in sizes.clients:
            total = clients * sizes.requests_per_client
            before = httpx.get(f"{server.url}/metrics").text
            results[clients] = load_figures(total, *_load(server.url, clients, total, sizes))
            after = httpx.get(f"{server.url}/metrics").text
            results[clients]["stages_ms"] = stage_means(before, after)
    finally:
        server.stop()
    return results


def stage_means(before: str, after: str) -> dict[str, float]:
    """Per image, the mean milliseconds of each service stage (``ssd_stage_duration_seconds``:
    decode, queue, inference, postprocess) between two scrapes of /metrics, and the mean batch
    size."""
    means = {}
    for stage in ("decode", "queue", "inference", "postprocess"):
        label = f'stage="{stage}"'
        seconds = metric(after, "ssd_stage_duration_seconds_sum", label) - metric(
            before, "ssd_stage_duration_seconds_sum", label
        )
        count = metric(after, "ssd_stage_duration_seconds_count", label) - metric(
            before, "ssd_stage_duration_seconds_count", label
        )
        means[stage] = 1000 * seconds / count if count else float("nan")
    batches = metric(after, "ssd_batch_size_count") - metric(before, "ssd_batch_size_count")
    images = metric(after, "ssd_batch_size_sum") - metric(before, "ssd_batch_size_sum")
    means["mean_batch"] = images / batches if batches else float("nan")
    return means


def _load(url: str, clients: int, total: int, sizes: Sizes) -> tuple[float, list[float]]:
    """``clients`` clients posting ``total`` requests from ``sizes.client_processes``
    processes (``python -m bench.load``) started together: the slowest process's seconds and
    every request's latency."""
    count = min(sizes.client_processes, clients)
    width, height = sizes.image_size
    processes = []
    for index in range(count):
        share_clients = clients // count + (index < clients % count)
        share_requests = total // count + (index < total % count)
        command = [
            sys.executable, "-m", "bench.load", "--url", url, "--clients", str(share_clients),
            "--requests", str(share_requests), "--size", f"{width}x{height}",
        ]  # fmt: skip
        processes.append(
            subprocess.Popen(
                command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        )
    try:
        for process in processes:  # each has made its images and imported httpx
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a load process exited early: {process.wait()}")
        for process in processes:  # the start signal
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        reports = []
        for process in processes:
            out, _ = process.communicate(timeout=600)
            if process.returncode != 0:
                raise RuntimeError(f"a load process failed with exit status {process.returncode}")
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    latencies = [latency for report in reports for latency in report["latencies_s"]]
    return max(report["elapsed_s"] for report in reports), latencies


def _trainer(
    network: SSD, sizes: Sizes, folder: Path, precision: str
) -> tuple[Trainer, Callable[[], object]]:
    """A ``Trainer`` of a copy of ``network`` at ``precision`` on one fixed batch of
    ``sizes.train_batch`` synthetic shapes (on the CPU, as the loader gives it), and its step."""
    samples = AugmentedDataset(
        SyntheticShapes(sizes.train_batch, split="train"), EvalTransform(network.input_size), 0
    )
    images, boxes, labels = collate([samples[0, i] for i in range(sizes.train_batch)])
    processes = Processes(0, 1, Runtime.resolve(sizes.device, precision))
    trainee = processes.runtime.place(copy.deepcopy(network)).train()
    assert isinstance(trainee, SSD)
    optimizer = torch.optim.SGD(
        trainee.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    trainer = Trainer(
        trainee,
        loss=MultiBoxLoss(trainee.default_boxes).to(processes.runtime.device),
        optimisation=Optimisation(
            optimizer,
            torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
            processes.runtime.grad_scaler(),
        ),
        data=TrainingData(samples, sizes.train_batch, seed=0, workers=0),
        plan=StepPlan(total=sizes.train_steps, per_epoch=sizes.train_steps),
        files=RunFiles(folder / f"train-{precision}.safetensors"),
        class_names=list(CLASS_NAMES),
        processes=processes,
    )
    # train_step ends by reading its loss terms, which waits for the device.
    return trainer, lambda: trainer.train_step(images, boxes, labels)


def training_rates(network: SSD, sizes: Sizes, folder: Path) -> dict[str, float]:
    """Images/s of ``Trainer.train_step`` (loss, backward, SGD step) per precision at
    ``sizes.train_batch``."""
    rates = {}
    for precision in sizes.precisions:
        trainer, step = _trainer(network, sizes, folder, precision)
        rates[precision] = sizes.train_batch / median_seconds(
            step, repeats=sizes.train_steps, warmup=sizes.warmup
        )
        del trainer, step
        _free(sizes.device)
    return rates


def reduced_precision(sizes: Sizes) -> str:
    """The precision the detail parts run in: bf16 (what ``auto`` chose on the GPU in the
    service part, recorded in its log), fp32 in a dry run."""
    return "bf16" if "bf16" in sizes.precisions else sizes.precisions[0]


def cudnn_benchmark_rates(network: SSD, sizes: Sizes, folder: Path) -> dict[str, dict]:
    """The network's and a training step's images/s in the reduced precisions with
    ``torch.backends.cudnn.benchmark`` on (cuDNN times its algorithms per input shape and
    keeps the fastest), beside the default figures of ``network_rates`` and
    ``training_rates``."""
    reduced = tuple(p for p in sizes.precisions if p != "fp32") or sizes.precisions
    only = dataclasses.replace(sizes, precisions=reduced)
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        return {
            "network": network_rates(network, only)["ours"],
            "training": training_rates(network, only, folder),
        }
    finally:
        torch.backends.cudnn.benchmark = before


def run(sizes: Sizes, command: str, only: set[str] | None = None) -> dict:
    """Every part (or those named in ``only``), each failure recorded under ``errors``; the
    report as the JSON holds it."""
    report: dict = {
        "machine": machine.describe(),
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sizes": asdict(sizes),
        "targets": TARGETS,
        "errors": {},
    }
    if torch.device(sizes.device).type == "cuda":
        properties = torch.cuda.get_device_properties(0)
        report["gpu"] = {
            "name": properties.name,
            "memory_gib": properties.total_memory / 2**30,
            "multiprocessors": properties.multi_processor_count,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    with tempfile.TemporaryDirectory() as tmp:
        weights, network, description = random_checkpoint(sizes.width, Path(tmp))
        report["model"] = description
        parts: dict[str, Callable[[], object]] = {
            "network": lambda: network_rates(network, sizes),
            "service": lambda: service_rates(weights, sizes),
            "training": lambda: training_rates(network, sizes, Path(tmp)),
            "batch": lambda: gpu_profile.batch_split(
                network, sizes.device, reduced_precision(sizes), sizes.batches, sizes.repeats
            ),
            "profile": lambda: gpu_profile.profile_tables(
                network,
                sizes.device,
                reduced_precision(sizes),
                max(sizes.batches[:4]),
                _trainer(network, sizes, Path(tmp), reduced_precision(sizes))[1],
            ),
        }
        if torch.device(sizes.device).type == "cuda":
            parts["graphs"] = lambda: gpu_profile.graph_rates(
                network,
                sizes.precisions,
                sizes.batches,
                lambda run, images: _timed_rate(run, images, sizes),
            )
            # The shipped model (trained, width 0.25) finds the bench's shapes: post-processing
            # as light as a trained model's, where random weights give 100 boxes per image.
            parts["service_trained"] = lambda: service_rates(DEFAULT_WEIGHTS, sizes)
            parts["cudnn_benchmark"] = lambda: cudnn_benchmark_rates(network, sizes, Path(tmp))
        for name, part in parts.items():
            if only is not None and name not in only:
                continue
            try:
                report[name] = part()
            except Exception as exc:  # any failure: record it, run the next part
                traceback.print_exc()
                report["errors"][name] = f"{type(exc).__name__}: {exc}"
    report["best"] = best_figures(report)
    return report


def best_figures(report: dict) -> dict[str, float | str]:
    """The figures issue #27's targets are about, from what ran."""
    best: dict[str, float | str] = {}
    if "network" in report:
        rate, where = max(
            (rate, f"{name} batch {size}")
            for name, rates in report["network"]["ours"].items()
            for size, rate in rates.items()
        )
        best["network_images_per_s"], best["network_at"] = rate, where
    if "service" in report:
        clients, row = max(report["service"].items(), key=lambda item: item[1]["images_per_s"])
        best["service_images_per_s"] = row["images_per_s"]
        best["service_p99_ms"] = row["p99_ms"]
        best["service_at"] = f"{clients} clients"
    if "training" in report:
        amp = {name: rate for name, rate in report["training"].items() if name != "fp32"}
        if amp:
            name = max(amp, key=amp.__getitem__)
            best["training_images_per_s"], best["training_at"] = amp[name], f"{name} AMP"
    return best


def print_table(report: dict) -> None:
    """The figures as a table, then the best of each part beside issue #27's target."""
    gpu = report.get("gpu", {}).get("name") or report["machine"]["cpu_model"]
    print(f"{gpu}; torch {report['machine']['torch']}; {report.get('model', '')}")
    network = report.get("network", {})
    batches = report["sizes"]["batches"]
    if network:
        print(f"{'network images/s':<28}" + "".join(f"{'batch ' + str(b):>12}" for b in batches))
        rows = {
            **network["ours"],
            **{f"torchvision {k}": v for k, v in network["torchvision"].items()},
        }
        for name, rates in rows.items():
            print(f"{name:<28}" + "".join(f"{rates[b]:12.1f}" for b in batches))
    for name, rates in report.get("graphs", {}).items():
        print(f"{'graph replay ' + name:<28}" + "".join(f"{rates[b]:12.1f}" for b in batches))
    for size, row in report.get("batch", {}).items():
        print(
            f"run_batch {size:>3}: forward {row['forward_s'] * 1000:.1f} ms, post-processing "
            f"{row['postprocess_s'] * 1000:.1f} ms, {row['images_per_s']:.1f} images/s, "
            f"{row['detections_per_image']:.0f} detections/image"
        )
    services = {
        "service": report.get("service", {}),
        "service (trained model)": report.get("service_trained", {}),
    }
    for service, rows in services.items():
        for clients, row in rows.items():
            _print_service(service, clients, row)
    cudnn = report.get("cudnn_benchmark", {})
    for name, rates in cudnn.get("network", {}).items():
        print(f"{'cudnn.benchmark ' + name:<28}" + "".join(f"{rates[b]:12.1f}" for b in batches))
    for name, rate in cudnn.get("training", {}).items():
        print(f"training step, {name}, cudnn.benchmark: {rate:.1f} images/s")
    for precision, rate in report.get("training", {}).items():
        print(f"training step, {precision}: {rate:.1f} images/s")
    for name, target in report["targets"].items():
        figure = report["best"].get(name)
        shown = "not measured" if figure is None else f"{figure:.1f}"
        where = report["best"].get(name.split("_")[0] + "_at", "")
        print(f"  {name:<24} {shown:>14} (target {target:g}) {where}")
    for part, error in report["errors"].items():
        print(f"  {part} failed: {error}")


def _print_service(name: str, clients: int | str, row: dict) -> None:
    print(
        f"{name}, {clients} clients: {row['images_per_s']:.1f} images/s, p50 "
        f"{row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms"
    )
    stages = row.get("stages_ms", {})
    print("  ms per image: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))


def main() -> None:
    """Run the parts at the sizes asked for, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU, tiny sizes")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file to write")
    parser.add_argument(
        "--parts", default="", help="comma-separated parts to run (default: all), e.g. service"
    )
    args = parser.parse_args()
    sizes = DRY_RUN if args.dry_run else FULL
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or use --dry-run on the CPU")
    only = set(args.parts.split(",")) if args.parts else None
    report = run(sizes, "python -m bench.gpu " + " ".join(sys.argv[1:]), only)
    print_table(report)
    stamp = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"gpu-{_machine_name()}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    profiles = out.with_suffix(".profile.txt")
    profiles.write_text("\n\n".join(report.get("profile", {}).values()) + "\n")
    print(f"wrote {out} and {profiles}")


if __name__ == "__main__":
    main()
