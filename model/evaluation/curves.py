"""Pictures of a run: training curves from a ``model.train`` log, precision-recall curves from an
evaluation. PNG files, drawn with matplotlib's object API (no pyplot state, no display).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.evaluation.average_precision import PRCurve

_LOSS_TERMS = (("loss", "total"), ("loc", "localisation"), ("conf", "confidence"))
_DPI = 110  # about 1,000 x 900 pixels for the default figure sizes below


def read_log(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The step records (with ``loss``) and the evaluation records (with ``val_map50``) of a
    ``model.train`` JSONL log; lines that are not JSON objects are skipped."""
    steps, evaluations = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if not isinstance(record, dict):
            continue
        if "loss" in record:
            steps.append(record)
        elif "val_map50" in record:
            evaluations.append(record)
    return steps, evaluations


def plot_training(log: Path, out: Path | None = None) -> Path:
    """Loss terms, learning rate and validation mAP@0.5 against the optimiser step, from the
    JSONL ``log``, written as a PNG to ``out`` (default: the log's path with ``.png``)."""
    from matplotlib.figure import Figure  # imported here: ``import model`` stays light

    steps, evaluations = read_log(log)
    out = out or log.with_suffix(".png")
    figure = Figure(figsize=(9, 8), dpi=_DPI, layout="constrained")
    loss_axes, lr_axes, map_axes = figure.subplots(3, 1, sharex=True)
    x = [r["step"] for r in steps]
    for key, name in _LOSS_TERMS:
        loss_axes.plot(x, [r[key] for r in steps], label=name)
    loss_axes.set_ylabel("loss")
    loss_axes.set_yscale("log" if _positive([r["loss"] for r in steps]) else "linear")
    loss_axes.legend(loc="upper right")
    lr_axes.plot(x, [r["lr"] for r in steps], color="tab:purple")
    lr_axes.set_ylabel("learning rate")
    map_axes.plot(
        [r["step"] for r in evaluations],
        [r["val_map50"] for r in evaluations],
        marker="o",
        color="tab:red",
    )
    map_axes.set_ylabel("validation mAP@0.5")
    map_axes.set_ylim(0.0, 1.0)
    map_axes.set_xlabel("optimiser step")
    for axes in (loss_axes, lr_axes, map_axes):
        axes.grid(alpha=0.3)
    figure.suptitle(log.stem)
    figure.savefig(out)
    return out


def plot_precision_recall(curves: Mapping[str, PRCurve], out: Path, title: str = "") -> Path:
    """Each class's precision-recall curve, with its AP in the legend, as a PNG at ``out``.
    Classes with no ground truth are left out."""
    from matplotlib.figure import Figure  # imported here: ``import model`` stays light

    figure = Figure(figsize=(8, 7), dpi=_DPI, layout="constrained")
    axes = figure.subplots()
    for name, curve in curves.items():
        ap, _ = curve.ap()
        if math.isnan(ap):
            continue
        # A curve starts at recall 0 with the first detection's precision.
        recall = [0.0, *curve.recall.tolist()]
        precision = [curve.precision[0] if len(curve.precision) else 0.0]
        axes.plot(recall, [*precision, *curve.precision.tolist()], label=f"{name} (AP {ap:.3f})")
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left")
    axes.set_title(title or "precision-recall at IoU 0.5")
    figure.savefig(out)
    return out


def _positive(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) and v > 0 for v in values)
