"""Default boxes fitted to data (model.network.box_fitting): a case whose optimum is known, and
coverage that never falls below a preset's on the same boxes."""

import math

import numpy as np
import pytest
import torch

from model.data import load_dataset
from model.network import box_fitting
from model.network.box_fitting import fit_default_boxes
from model.network.default_boxes import (
    PRESETS,
    best_iou,
    box_spec,
    coverage,
    make_default_boxes,
    preset_spec,
)
from model.network.ssd import build, feature_map_sides, ssd300_vgg16
from model.weights.checkpoint import load_checkpoint, save_checkpoint

SIDES_300 = feature_map_sides(300)


def _on_conv4_3_centres(width: float, height: float, count: int = 60) -> np.ndarray:
    """``count`` boxes of ``width`` x ``height`` px centred on cells of SSD300's first map
    (step 8: centres at 4, 12, ... px), xyxy relative to a 300 px image."""
    i = np.arange(count) % 30 + 4
    cx, cy = (i + 0.5) * 8 / 300, ((i * 7) % 30 + 4 + 0.5) * 8 / 300
    w, h = width / 300, height / 300
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_finds_the_one_tiling_that_matches_every_box(seed):
    # Boxes of 8/sqrt(2) x 8*sqrt(2) px on conv4_3's cell centres: the (s/sqrt(r), s*sqrt(r))
    # box of s = 8 px, r = 2 on that map. No preset covers them at IoU 0.5: the smallest
    # preset box, "fine"'s 12 px (and its 8.5 x 17 px r = 2 pair), gives 64/144 = 0.44. Only
    # conv4_3's centres coincide with theirs, so the one tiling where every box is a default
    # box (IoU 1) has s_1 = 8 and r = 2 on conv4_3.
    boxes = _on_conv4_3_centres(8 / math.sqrt(2), 8 * math.sqrt(2))
    for preset in PRESETS:
        assert best_iou(boxes, preset_spec(300, preset), SIDES_300).max() == pytest.approx(
            {"voc": 64 / 899.9, "coco": 0.145, "fine": 64 / 144}[preset], abs=2e-3
        )
    fit = fit_default_boxes(boxes, 300, SIDES_300, seed=seed)
    assert fit.start == "fine"  # every preset covers none; "fine" has the highest mean IoU
    assert fit.coverage == {"voc": 0.0, "coco": 0.0, "fine": 0.0, "fitted": 1.0}
    assert fit.mean_iou["fitted"] > 0.99
    assert fit.spec.min_sizes[0] == pytest.approx(8.0, rel=0.01)
    assert fit.spec.aspect_ratios[0][0] == pytest.approx(2.0, rel=0.01)
    # The paper's tiling: same steps, each map's max size the next one's min size, ascending.
    assert fit.spec.steps == preset_spec(300, "fine").steps
    assert list(fit.spec.max_sizes[:-1]) == list(fit.spec.min_sizes[1:])
    assert list(fit.spec.min_sizes) == sorted(fit.spec.min_sizes)
    assert fit.spec.boxes_per_location == [4, 6, 6, 6, 4, 4]


def test_the_same_boxes_and_seed_give_the_same_fit():
    boxes = _on_conv4_3_centres(20, 50)
    first = fit_default_boxes(boxes, 300, SIDES_300, seed=3)
    assert fit_default_boxes(boxes, 300, SIDES_300, seed=3) == first
    assert fit_default_boxes(boxes, 300, SIDES_300, seed=4).spec != first.spec


def _random_boxes(count: int, seed: int) -> np.ndarray:
    """Boxes of every size from 3 to 300 px and every shape, anywhere in the image."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.05, 0.95, (count, 2))
    sides = np.exp(rng.uniform(np.log(0.01), np.log(1.0), (count, 2)))
    return np.clip(np.concatenate([centres - sides / 2, centres + sides / 2], axis=1), 0, 1)


@pytest.mark.parametrize("size", [300, 512])
def test_fitted_coverage_never_falls_below_any_presets(size):
    sides = feature_map_sides(size)
    for seed in range(3):
        boxes = _random_boxes(400, seed)
        fit = fit_default_boxes(boxes, size, sides, seed=seed, generations=200)
        for preset in PRESETS:
            share = coverage(boxes, preset_spec(size, preset), sides)
            assert fit.coverage[preset] == share
            assert fit.coverage["fitted"] >= share
        assert fit.coverage["fitted"] == coverage(boxes, fit.spec, sides)


def test_a_fit_on_a_sample_is_checked_on_every_box(monkeypatch):
    # Past MAX_BOXES the search scores a sample; on all the boxes, a fit worse than the start
    # preset gives way to it. With a sample of 5 boxes out of 300, it often is worse.
    monkeypatch.setattr(box_fitting, "MAX_BOXES", 5)
    boxes = _random_boxes(300, 7)
    shares = []
    for seed in range(6):
        fit = fit_default_boxes(boxes, 300, SIDES_300, seed=seed, generations=100)
        start = coverage(boxes, preset_spec(300, fit.start), SIDES_300)
        assert fit.coverage["fitted"] == coverage(boxes, fit.spec, SIDES_300) >= start
        shares.append(fit.coverage["fitted"] == start)
    assert any(shares)  # the fallback ran at least once


def test_fit_to_coco128_covers_more_than_every_preset(coco128):
    dataset = load_dataset(
        f"coco:{coco128}/images:{coco128}/annotations/instances.json", split="all"
    )
    boxes = np.concatenate([a.relative() for a in dataset.annotations()])
    for size in (300, 512):
        fit = fit_default_boxes(boxes, size, feature_map_sides(size))
        best = max(fit.coverage[p] for p in PRESETS)
        # Measured: 62.8 % ("fine") -> 67.2 % at 300, 73.8 % -> 78.6 % at 512.
        assert fit.coverage["fitted"] > best + 0.02, fit.coverage


def test_fitted_boxes_travel_in_the_checkpoint(tmp_path):
    fit = fit_default_boxes(_on_conv4_3_centres(20, 50), 300, SIDES_300, generations=50)
    network = ssd300_vgg16(3, width=0.125, preset="fitted", box_sizes=fit.spec.sizes())
    expected = make_default_boxes(fit.spec, list(SIDES_300))
    assert torch.equal(network.default_boxes, expected)
    assert network.architecture.box_sizes == fit.spec.sizes()
    save_checkpoint(tmp_path / "f.safetensors", network, ["a", "b"])
    loaded = load_checkpoint(tmp_path / "f.safetensors").network
    assert loaded.architecture == network.architecture
    assert torch.equal(loaded.default_boxes, expected)
    assert torch.equal(build(network.architecture).default_boxes, expected)


def test_box_sizes_must_keep_the_tiling():
    sizes = preset_spec(300, "voc").sizes()
    assert box_spec(300, "fitted", sizes).min_sizes == preset_spec(300, "voc").min_sizes
    with pytest.raises(ValueError, match="needs its box sizes"):
        box_spec(300, "fitted")
    with pytest.raises(ValueError, match=r"aspect ratios per map \[1, 2, 2, 2, 1, 1\]"):
        box_spec(300, "fitted", {**sizes, "aspect_ratios": [[2]] * 6})
    with pytest.raises(ValueError, match="at least 1"):
        box_spec(300, "fitted", {**sizes, "aspect_ratios": [[0.5], *sizes["aspect_ratios"][1:]]})
    with pytest.raises(ValueError, match="are for the 'fitted' preset"):
        box_spec(300, "voc", sizes)
