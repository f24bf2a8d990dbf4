"""Training and precision-recall pictures: real PNG files with the curves' colours in them."""

import json

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from model.evaluation.average_precision import PRCurve
from model.evaluation.curves import plot_precision_recall, plot_training, read_log


def _colour_share(path, colour: str) -> float:
    """Share of the PNG's pixels within a few levels of a matplotlib colour."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    target = np.array([round(255 * c) for c in to_rgb(colour)])
    return float((np.abs(pixels - target).max(axis=2) <= 8).mean())


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "run.jsonl"
    lines = [
        json.dumps({"step": s, "epoch": 1, "loss": 10 / s, "loc": 4 / s, "conf": 6 / s,
                    "lr": 0.01 * min(1, s / 5), "images_per_s": 12.0})
        for s in range(1, 41)
    ]  # fmt: skip
    lines.insert(20, json.dumps({"step": 20, "epoch": 1, "val_map50": 0.4, "val_coco_ap": 0.2}))
    lines.append(json.dumps({"step": 40, "epoch": 2, "val_map50": 0.7, "val_coco_ap": 0.3}))
    lines.append('{"step": 41, "loss": 0.2')  # cut short by a crash
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_log_splits_steps_from_evaluations_and_skips_a_cut_line(log):
    steps, evaluations = read_log(log)
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert [(r["step"], r["val_map50"]) for r in evaluations] == [(20, 0.4), (40, 0.7)]


def test_training_curves_are_drawn_beside_the_log(log):
    out = plot_training(log)
    assert out == log.with_suffix(".png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (990, 880)
    # the loss (tab:blue), learning-rate (tab:purple) and mAP (tab:red) lines are there
    for colour in ("tab:blue", "tab:purple", "tab:red"):
        assert _colour_share(out, colour) > 0.0005, colour


def test_precision_recall_curves_leave_out_classes_without_ground_truth(tmp_path):
    found = PRCurve(np.array([0.5, 1.0, 1.0]), np.array([1.0, 1.0, 2 / 3]), positives=2)
    absent = PRCurve(np.zeros(0), np.zeros(0), positives=0)
    out = plot_precision_recall({"cat": found, "ghost": absent}, tmp_path / "pr.png")
    assert _colour_share(out, "tab:blue") > 0.0005  # the first (only) drawn class
    assert _colour_share(out, "tab:orange") == 0.0  # the second colour was never used
