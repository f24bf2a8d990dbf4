"""Issue #23's small-object comparison: default-box candidates trained from scratch under
``--recipe small-scratch --minutes M``, each scored on its set's validation images (AP50 of the
best and of the last checkpoint).

    python -m bench.small_objects [--minutes 20] [--seed 0] [--only SET ...]

Sets, all built from ``../shared/datasets``:

* ``coco128-person``: coco128 with only its people (half of them under 30 px at 300), the
  deterministic 10 % holdout as validation;
* ``raccoon``: raccoon's own train and val lists (large objects: must not get worse);
* ``raccoon+person``: a two-class YOLO set written here, raccoon's train/val lists plus
  coco128's people (every tenth image by name to val): large and small objects together.

Each training run is its own ``python -m model.train`` process, as a user would start it.
Writes ``bench/results/small-objects-<machine>-<date>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.machine import cpu_model
from model.data import load_dataset
from model.evaluation.evaluate import evaluate
from model.inference.detector import Detector
from model.network.default_boxes import PRESETS, box_spec, coverage, preset_spec
from model.network.ssd import feature_map_sides
from model.weights.checkpoint import load_checkpoint

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
RESULTS = Path(__file__).resolve().parent / "results"
COCO128 = SHARED / "coco128"
RACCOON = SHARED / "raccoon"
COCO_SPEC = f"coco:{COCO128}/images:{COCO128}/annotations/instances.json"
# (set, --size, --preset): the train default (SSD300, "voc"), the fitted boxes at 300 on every
# set, and SSD512 on the set of small objects.
CANDIDATES = [
    ("coco128-person", 300, "voc"),
    ("coco128-person", 300, "fitted"),
    ("coco128-person", 512, "voc"),
    ("raccoon", 300, "voc"),
    ("raccoon", 300, "fitted"),
    ("raccoon+person", 300, "voc"),
    ("raccoon+person", 300, "fitted"),
]


def two_class_yaml(folder: Path) -> Path:
    """Write the ``raccoon+person`` YOLO set under ``folder`` (images linked, labels written);
    gives its data.yaml."""
    yaml = folder / "data.yaml"
    if yaml.is_file():  # written for an earlier candidate of this run
        return yaml
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    lists: dict[str, list[str]] = {"train": [], "val": []}

    def add(dataset, label: int, split_of) -> None:  # type: ignore[no-untyped-def]
        for record, annotation in zip(dataset.records, dataset.annotations(), strict=True):
            name = f"{label}-{record.path.name}"
            (folder / "images" / name).symlink_to(record.path.resolve())
            rows = [
                f"{label} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}"
                for x0, y0, x1, y1 in annotation.relative().tolist()
            ]
            (folder / "labels" / name).with_suffix(".txt").write_text("\n".join(rows))
            lists[split_of(record)].append(str(folder / "images" / name))

    for split in ("train", "val"):
        add(load_dataset(f"voc:{RACCOON}", split=split), 0, lambda _record, s=split: s)
    people = load_dataset(COCO_SPEC, split="all", classes=["person"])
    ordered = sorted(r.path.name for r in people.records)
    held = set(ordered[::10])
    add(people, 1, lambda record: "val" if record.path.name in held else "train")
    for split, paths in lists.items():
        (folder / f"{split}.txt").write_text("\n".join(paths) + "\n")
    yaml.write_text(f"path: {folder}\ntrain: train.txt\nval: val.txt\nnames: [raccoon, person]\n")
    return yaml


def data_of(name: str, scratch: Path) -> tuple[str, list[str], list[str] | None]:
    """The set's --data spec, extra train flags, and the classes to score."""
    if name == "coco128-person":
        return COCO_SPEC, ["--classes", "person"], ["person"]
    if name == "raccoon":
        return f"voc:{RACCOON}", [], None
    return f"yolo:{two_class_yaml(scratch / 'two-class')}", [], None


def run(name: str, size: int, preset: str, args: argparse.Namespace, scratch: Path) -> dict:
    """Train one candidate and score its best and last checkpoints."""
    spec, flags, classes = data_of(name, scratch)
    out = scratch / f"{name}-{size}-{preset}.safetensors"
    command = [
        sys.executable, "-m", "model.train", "--data", spec, "--out", str(out),
        "--recipe", "small-scratch", "--minutes", str(args.minutes), "--seed", str(args.seed),
        "--size", str(size), "--preset", preset, *flags,
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    steps = max(entry.get("step", 0) for entry in log)
    scores = {}
    for which, path in (("last", out), ("best", out.with_suffix(".best.safetensors"))):
        if path.is_file():
            detector = Detector.load(path, device="cpu", precision="fp32")
            report, _ = evaluate(detector, spec, split="val", classes=classes)
            scores[which] = round(report.map50, 4)
    return {
        "set": name, "size": size, "preset": preset, "seed": args.seed,
        "minutes": args.minutes, "steps": steps, "wall_s": round(wall, 1),
        "ap50_last": scores.get("last"), "ap50_best": scores.get("best"),
        "coverage": covered(out, spec, classes),
    }  # fmt: skip


def covered(checkpoint: Path, spec: str, classes: list[str] | None) -> dict[str, float]:
    """The share of the training boxes with a default box at IoU >= 0.5: the checkpoint's own
    boxes, and each preset's at its size."""
    network = load_checkpoint(checkpoint).network
    size = network.architecture.size
    train = load_dataset(spec, split="train", classes=classes)
    boxes = np.concatenate([a.relative() for a in train.annotations()])
    sides = feature_map_sides(size)
    shares = {p: coverage(boxes, preset_spec(size, p), sides) for p in PRESETS}
    spec_used = box_spec(size, network.architecture.preset, network.architecture.box_sizes)
    return {**shares, "used": coverage(boxes, spec_used, sides)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="sets to run (default: all)")
    parser.add_argument("--presets", nargs="*", help="presets to run (default: all)")
    args = parser.parse_args()
    stamp = datetime.date.today().isoformat()
    target = RESULTS / f"small-objects-{stamp}.json"
    # Runs of the same day are kept, a candidate run again replacing its earlier row.
    rows = json.loads(target.read_text())["runs"] if target.is_file() else []
    with tempfile.TemporaryDirectory(prefix="small-objects-") as scratch:
        for name, size, preset in CANDIDATES:
            if (args.only and name not in args.only) or (
                args.presets and preset not in args.presets
            ):
                continue
            row = run(name, size, preset, args, Path(scratch))
            rows = [r for r in rows if (r["set"], r["size"], r["preset"]) != (name, size, preset)]
            rows.append(row)
            print(json.dumps(row), flush=True)
            target.write_text(json.dumps({"cpu": cpu_model(), "runs": rows}, indent=2) + "\n")
    print(f"\n{'set':<16}{'size':>6}{'preset':>8}{'steps':>7}{'AP50 best':>11}{'last':>7}")
    for row in rows:
        print(
            f"{row['set']:<16}{row['size']:>6}{row['preset']:>8}{row['steps']:>7}"
            f"{row['ap50_best'] or 0:>11.3f}{row['ap50_last'] or 0:>7.3f}"
        )
    print(f"written: {target}")


if __name__ == "__main__":
    main()
