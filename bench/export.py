"""ONNX export on this machine: export time and file sizes, ONNX Runtime against torch (largest
raw-output and detection differences), and per-image fp32 latency of each runtime, for the
shipped model and a full-width SSD300 (COCO layout, 81 classes, seeded random weights: the
published weights cannot be downloaded here, and latency does not depend on the values).

Prints a table; never fails on a time.

    .venv/bin/python -m bench.export [--photos 8] [--repeats 5]

Everything runs in one process: both runtimes see the same images, the same prepared inputs
and the same machine load. Latency is one image per ``run_batch`` (preparation excluded), the
median of ``--repeats`` runs after two warm-ups, with each runtime's default threads.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from model import Detector, ssd300_vgg16
from model.data.synthetic import SyntheticShapes
from model.export import export_onnx
from model.inference.onnx_detector import OnnxDetector
from model.weights.checkpoint import save_checkpoint
from tests.support.matching import assert_same_detections

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights" / "ssd300_shapes.safetensors"
COCO128 = ROOT.parent / "shared" / "datasets" / "coco128" / "images"
LOW_THRESHOLD = 0.05  # many detections per image, so many boxes are compared
BOX_PX, TIE = 0.5, 1e-4  # as tests/model/test_export.py compares


def _images(photos: int) -> list[Image.Image]:
    """coco128 photos (where present) and four synthetic test images."""
    found = [Image.open(p).convert("RGB") for p in sorted(COCO128.glob("*.jpg"))[:photos]]
    samples = SyntheticShapes(4, split="test")
    return found + [Image.fromarray(samples[i][0].permute(1, 2, 0).numpy()) for i in range(4)]


def _full_width(folder: Path) -> Path:
    """A full-width SSD300 checkpoint in COCO's layout with seeded random weights."""
    torch.manual_seed(0)
    network = ssd300_vgg16(81, preset="coco").eval()
    path = folder / "ssd300_full_width.safetensors"
    save_checkpoint(path, network, [f"class{k}" for k in range(1, 81)])
    return path


def measure(
    name: str, checkpoint: Path, folder: Path, images: list, repeats: int, threads: int | None
) -> dict:
    """Every figure for one model (module docstring)."""
    detector = Detector.load(checkpoint, device="cpu", precision="fp32")
    figures: dict[str, object] = {"model": name}
    paths = {}
    for graph in ("full", "raw"):
        start = time.perf_counter()
        paths[graph] = export_onnx(detector, folder / f"{name}.{graph}.onnx", graph=graph)
        figures[f"export_{graph}_s"] = time.perf_counter() - start
        figures[f"size_{graph}_mib"] = paths[graph].stat().st_size / 2**20
    figures["checkpoint_mib"] = checkpoint.stat().st_size / 2**20

    prepared = [detector.prepare(image) for image in images]
    batch = torch.stack([x for x, _ in prepared])
    raw = ort.InferenceSession(str(paths["raw"]), providers=["CPUExecutionProvider"])
    offsets_diff = logits_diff = 0.0
    for i in range(len(images)):  # one at a time: the full-width network's memory stays small
        with torch.inference_mode():
            loc, conf = detector.network(batch[i : i + 1])
        offsets, logits = raw.run(None, {"images": batch[i : i + 1].numpy()})
        offsets_diff = max(offsets_diff, float(np.abs(offsets - loc.numpy()).max()))
        logits_diff = max(logits_diff, float(np.abs(logits - conf.numpy()).max()))
    figures["raw_offsets_max_diff"] = offsets_diff
    figures["raw_logits_max_diff"] = logits_diff

    served = OnnxDetector(paths["full"], threads=threads)
    cut = detector.cut(LOW_THRESHOLD, 200)
    compared = mismatched = 0
    box_diff = score_diff = 0.0
    for x, size in prepared:
        [theirs] = detector.run_batch([x], [size], [cut]).detections
        [ours] = served.run_batch([x.numpy()], [size], [cut]).detections
        try:
            worst = assert_same_detections(
                (ours.labels, ours.boxes, ours.scores),
                (theirs.labels, theirs.boxes.numpy(), theirs.scores.numpy()),
                box_px=BOX_PX,
                tie=TIE,
            )
        except AssertionError:
            mismatched += 1
            continue
        compared += len(ours)
        box_diff = max(box_diff, worst)
        score_diff = max(score_diff, float(np.abs(ours.scores - theirs.scores.numpy()).max()))
    figures.update(
        detections_compared=compared,
        images_not_matching=mismatched,
        box_max_diff_px=box_diff,
        score_max_diff=score_diff,
    )

    x, size = prepared[0]
    array = x.numpy()
    runs = {
        "torch_ms": lambda: detector.run_batch([x], [size], [cut]),
        "ort_ms": lambda: served.run_batch([array], [size], [cut]),
    }
    for run in runs.values():  # warm-up
        run(), run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so a busy spell of the machine hits both
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(1000 * (time.perf_counter() - start))
    figures.update({name: statistics.median(values) for name, values in times.items()})
    return figures


def main() -> None:
    """Measure both models and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="threads of both runtimes (default: theirs)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    images = _images(args.photos)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        models = {"shipped (SSD300 width 0.25)": SHIPPED, "SSD300 full width": _full_width(folder)}
        for name, checkpoint in models.items():
            rows.append(measure(name, checkpoint, folder, images, args.repeats, args.threads))
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {ort.__version__} "
        f"({args.threads or 'default'} threads), "
        f"{len(images)} images ({len(images) - 4} coco128 photos, 4 synthetic)"
    )
    for row in rows:
        print(f"\n{row.pop('model')}")
        for key, value in row.items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            print(f"  {key:28s} {shown}")


if __name__ == "__main__":
    main()
