"""``python -m model.data check SPEC``: what a dataset looks like to the network, before training.

It reads annotations only (no image is decoded, but for the synthetic data, which is drawn):
the images, boxes and classes; the bad data the reader repaired or skipped; the boxes' sizes
at the network input (a plain resize of the whole image to S x S, as
``model.network.preprocessing`` does); and, for each default-box preset and for boxes fitted
to this data (``model.network.box_fitting``, what ``model.train --preset fitted`` does) at both
input sizes, the share of boxes that some default box overlaps at IoU >= 0.5. It ends with a
suggestion when the fit is poor.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from model.data import SPEC_FORMS, SPLITS, load_dataset
from model.network.box_fitting import fit_default_boxes
from model.network.default_boxes import COVER_IOU, FITTED, PRESETS
from model.network.ssd import feature_map_sides

SIZES = (300, 512)  # the network input sizes (model.train --size)
PERCENTILES = (5, 25, 50, 75, 95)
# Below this coverage, more than one box in ten has no default box at IoU >= 0.5: it gets a
# positive only from the matcher's bipartite pass (model.network.matching), one default box of
# poor overlap, so training sees it far less than the others. A judgment call, stated here.
COVERAGE_FLOOR = 0.9
# 30 px is the smallest default box of the train default (SSD300, "voc": 10 % of 300,
# ssd_pascal.py); a square box inside it has IoU (a/30)^2, under 0.5 below 21 px.
SMALL_SIDE = 30.0
# More than one box in five that small: small objects are where SSD is weakest (SSD paper,
# sec. 3.6), enough of the data to act on. A judgment call, stated here.
SMALL_SHARE = 0.2
_DEFAULT_PRESET = "voc"  # model.train's preset from a random start
CANDIDATES = (*PRESETS, FITTED)  # the --preset values; on a tie the earlier one is named


def box_table(dataset: Any, size: int) -> tuple[Counter[int], np.ndarray, np.ndarray]:
    """Box counts per label, the boxes' (width, height) at a ``size`` x ``size`` input as a
    float64 array [G, 2] in input pixels, and the boxes as xyxy relative to their images
    (float64 [G, 4]), from ``dataset.annotations()`` (no image decoded)."""
    per_label: Counter[int] = Counter()
    sizes, relative = [], []
    for annotation in dataset.annotations():
        per_label.update(annotation.labels.tolist())
        relative.append(annotation.relative())
        pixels = annotation.boxes.numpy().astype(np.float64).reshape(-1, 4)
        # Sides in pixels first, then scaled: a 30 px side at a 300 px image stays 30.0.
        scale = size / np.array([annotation.width, annotation.height])
        sizes.append((pixels[:, 2:] - pixels[:, :2]) * scale)
    return (
        per_label,
        np.concatenate(sizes or [np.zeros((0, 2))]),
        np.concatenate(relative or [np.zeros((0, 4))]),
    )


def figures(
    dataset: Any, spec: str, split: str, size: int = 300
) -> tuple[dict[str, Any], np.ndarray]:
    """Everything the check reports on ``dataset`` (read from ``spec``'s ``split``), JSON-ready
    (see the module docstring), and the boxes' (width, height) at the input (``box_table``)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size}")
    per_label, wh, boxes = box_table(dataset, size)
    sides = {"width": wh[:, 0], "height": wh[:, 1], "sqrt_area": np.sqrt(wh.prod(axis=1))}
    result: dict[str, Any] = {
        "data": spec,
        "split": split,
        "size": size,
        "images": len(dataset),
        "boxes": len(wh),
        "classes": len(dataset.class_names),
        "per_class": {name: per_label[k] for k, name in enumerate(dataset.class_names, start=1)},
        "bad_data": dataset.report(),
        "percentiles": list(PERCENTILES),
        "box_sizes_px": {
            key: np.percentile(values, PERCENTILES).tolist() if len(values) else []
            for key, values in sides.items()
        },
        "small_side_px": SMALL_SIDE,
        "small_share": float((sides["sqrt_area"] < SMALL_SIDE).mean()) if len(wh) else 0.0,
        "coverage_iou": COVER_IOU,
        "coverage": {},
        "fitted": {},
    }
    for s in SIZES:
        fit = fit_default_boxes(boxes, s, feature_map_sides(s))
        result["coverage"][str(s)] = fit.coverage
        result["fitted"][str(s)] = fit.spec.sizes()
    result["suggestions"] = suggestions(result)
    return result, wh


def suggestions(result: dict[str, Any]) -> list[str]:
    """Plain advice when the default boxes or the input size fit the data poorly."""
    size, tips = result["size"], []
    if not result["boxes"]:
        return ["No boxes: nothing to train on."]
    here = result["coverage"][str(size)]
    best = max(CANDIDATES, key=here.get)
    best_512 = max(CANDIDATES, key=result["coverage"]["512"].get)
    share_512 = result["coverage"]["512"][best_512]
    if here[best] < COVERAGE_FLOOR:
        poor = (
            f"Only {here[best]:.0%} of the boxes have a default box at IoU >= {COVER_IOU} at "
            f"{size} px (best: --preset {best}; under {COVERAGE_FLOOR:.0%} is poor)."
        )
        if size == 300 and share_512 > here[best]:
            tips.append(f"{poor} Try --size 512 --preset {best_512} ({share_512:.0%}).")
        else:
            tips.append(
                f"{poor} No tiling fits: training on crops of the images, where the objects "
                "are larger, would."
            )
    elif here[_DEFAULT_PRESET] < COVERAGE_FLOOR:
        tips.append(
            f"--preset {best} covers {here[best]:.0%} of the boxes at {size} px, the default "
            f"{_DEFAULT_PRESET!r} {here[_DEFAULT_PRESET]:.0%}: train with --preset {best}."
        )
    if result["small_share"] > SMALL_SHARE:
        small = (
            f"{result['small_share']:.0%} of the boxes are under {SMALL_SIDE:.0f} px "
            f"(sqrt of the area) at the {size} px input; SSD is weakest on small objects."
        )
        tips.append(
            f"{small} Try a larger input: --size 512."
            if size == 300
            else f"{small} 512 is the largest input: try training on crops of the images."
        )
    return tips


def table(result: dict[str, Any]) -> str:
    """The report as plain text."""
    size = result["size"]
    lines = [
        f"{result['data']} ({result['split']}): {result['images']} images, "
        f"{result['boxes']} boxes, {result['classes']} classes",
        "",
        f"{'class':<24}{'boxes':>8}",
        *(f"{name:<24}{n:>8}" for name, n in result["per_class"].items()),
        "",
        "bad data repaired or skipped: "
        + (", ".join(f"{k} {n}" for k, n in result["bad_data"].items() if n) or "none"),
        "",
        f"{f'box size at the {size}x{size} input, px':<38}"
        + "".join(f"{f'p{p}':>8}" for p in result["percentiles"]),
    ]
    for key, values in result["box_sizes_px"].items():
        lines.append(f"{key:<38}" + "".join(f"{v:>8.1f}" for v in values))
    lines += [
        f"boxes under {SMALL_SIDE:.0f} px (sqrt area): {result['small_share']:.1%}",
        "",
        f"{'boxes with a default box at IoU >= ' + str(result['coverage_iou']):<46}"
        + "".join(f"{p:>8}" for p in CANDIDATES),
    ]
    for s, shares in result["coverage"].items():
        mark = "  <- --size" if int(s) == size else ""
        row = "".join(f"{shares[p]:>8.1%}" for p in CANDIDATES)
        lines.append(f"{f'SSD{s}':<46}{row}{mark}")
    lines += ["", *(result["suggestions"] or ["The default boxes fit this data: no change."])]
    return "\n".join(lines)


def plot(result: dict[str, Any], wh: np.ndarray, out: Path) -> Path:
    """Histograms of the boxes' width, height and sqrt(area) at the input, as a PNG."""
    from matplotlib.figure import Figure  # imported here: ``import model`` stays light

    size = result["size"]
    figure = Figure(figsize=(10, 3.5), dpi=110, layout="constrained")
    values = {"width": wh[:, 0], "height": wh[:, 1], "sqrt(area)": np.sqrt(wh.prod(axis=1))}
    bins = np.linspace(0, size, 31)  # 10 px bins at 300, ~17 at 512
    for axes, (name, v) in zip(figure.subplots(1, 3, sharey=True), values.items(), strict=True):
        axes.hist(v, bins=bins, color="tab:blue")
        axes.axvline(SMALL_SIDE, color="tab:red", linestyle="--", label=f"{SMALL_SIDE:.0f} px")
        axes.set_xlabel(f"{name}, px at the {size} px input")
        axes.grid(alpha=0.3)
    figure.axes[0].set_ylabel("boxes")
    figure.axes[0].legend()
    figure.suptitle(f"{result['data']}: {result['boxes']} boxes")
    figure.savefig(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="report a dataset's fit before training")
    check.add_argument("spec", metavar="SPEC", help=SPEC_FORMS)
    check.add_argument("--split", default="all", choices=SPLITS)
    check.add_argument(
        "--classes", help="comma-separated class names to keep, as model.train's --classes"
    )
    check.add_argument("--size", type=int, default=300, choices=SIZES, help="network input")
    check.add_argument("--plot", type=Path, help="write histograms of box sizes (PNG)")
    check.add_argument("--json", type=Path, help="write the figures (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    classes = args.classes.split(",") if args.classes else None
    dataset = load_dataset(args.spec, split=args.split, classes=classes)
    result, wh = figures(dataset, args.spec, args.split, args.size)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, wh, args.plot)
    return 0
