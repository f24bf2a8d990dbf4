"""Default boxes fitted to a dataset's boxes (``model.train --preset fitted``).

The paper leaves the default boxes' scales to the data (sec. 2.2); this chooses them, and
their aspect ratios, to maximise the share of the training boxes that some default box
overlaps at IoU >= 0.5 (``coverage``), the boxes that get positives from the matcher's
per-prediction pass. It is the idea of YOLOv5's autoanchor (mutate, keep what scores better),
applied within SSD's tiling: the same feature maps, steps and boxes per cell, so only sizes
and ratios change and the network keeps its shape.

The sizes are the paper's K + 1 scales s_1 < ... < s_{K+1}: map k's boxes are s_k and
sqrt(s_k s_{k+1}) square, and s_k stretched by each of its aspect ratios (as every preset's
are). The search starts from the preset that covers the most of these boxes at this input
size, in log space: every generation multiplies a random part of the scales and ratios by
exp(N(0, 0.1)) and keeps the result when it covers more boxes, or as many with a higher mean
best IoU (so among fits of equal coverage the closer one wins). The boxes are the ones the
network sees at test time: the images resized to the input, no augmentation. The result is
never worse than the start on the boxes given: a fit that covers fewer of them is dropped for
the start preset's sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.network.default_boxes import (
    PRESETS,
    BoxOffsets,
    DefaultBoxSpec,
    best_iou,
    box_spec,
    preset_spec,
)

GENERATIONS = 1000
# Mutations are multiplicative: each chosen size or ratio times exp(N(0, SIGMA)), ~10 %.
SIGMA = 0.1
MUTATE_SHARE = 0.9  # the chance that each number is mutated in a generation
# Limits that keep the fit within the authors' design: each size within a factor of 2 of the
# start preset's for its map (so a map's boxes stay near what its receptive field sees), and
# aspect ratios (each used as r and 1/r) from 1 to 4.
SIZE_FACTOR = 2.0
MAX_RATIO = 4.0
# The search scores at most this many boxes, a seeded sample of larger sets; the result is
# checked against the start on all of them.
MAX_BOXES = 10_000


@dataclass(frozen=True)
class BoxFit:
    """Fitted boxes and how well each candidate covers the boxes they were fitted to.

    ``start``: the preset the search began from; ``coverage``: each preset's share and the
    fit's (key ``"fitted"``); ``mean_iou``: the same for the mean best IoU.
    """

    spec: DefaultBoxSpec
    start: str
    boxes: int
    coverage: dict[str, float]
    mean_iou: dict[str, float]

    def summary(self) -> str:
        """One line for the log."""
        presets = ", ".join(f"{p} {self.coverage[p]:.1%}" for p in PRESETS)
        return (
            f"default boxes fitted to {self.boxes} boxes at {self.spec.size} px: "
            f"{self.coverage['fitted']:.1%} have one at IoU >= 0.5 (presets: {presets}; "
            f"started from {self.start!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "size": self.spec.size,
            "start": self.start,
            "boxes": self.boxes,
            "coverage": self.coverage,
            "mean_iou": self.mean_iou,
            "box_sizes": self.spec.sizes(),
        }


def fit_default_boxes(
    boxes: np.ndarray,
    size: int,
    feature_map_sizes: tuple[int, ...],
    *,
    seed: int = 0,
    generations: int = GENERATIONS,
) -> BoxFit:
    """Default boxes for an SSD``size`` fitted to ``boxes`` ([G, 4], xyxy relative to their
    images; module docstring). The same ``boxes`` and ``seed`` give the same fit."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    rng = np.random.default_rng(seed)
    every = BoxOffsets.of(boxes, preset_spec(size, PRESETS[0]), feature_map_sizes)
    scored = {p: _score(every, preset_spec(size, p), feature_map_sizes) for p in PRESETS}
    start = max(PRESETS, key=lambda p: scored[p])
    sample = boxes
    if len(boxes) > MAX_BOXES:
        sample = boxes[np.sort(rng.choice(len(boxes), MAX_BOXES, replace=False))]
    offsets = BoxOffsets.of(sample, preset_spec(size, start), feature_map_sizes)

    origin = preset_spec(size, start)
    layout = [len(r) for r in origin.aspect_ratios]
    low, high = _bounds(origin)
    best = _encode(origin)
    best_score = _score(offsets, _decode(best, size, layout), feature_map_sizes)
    for _ in range(generations):
        mask = rng.random(len(best)) < MUTATE_SHARE
        if not mask.any():
            continue
        candidate = np.clip(best + mask * rng.normal(0.0, SIGMA, len(best)), low, high)
        score = _score(offsets, _decode(candidate, size, layout), feature_map_sizes)
        if score > best_score:
            best, best_score = candidate, score

    fitted = _decode(best, size, layout)
    fitted_score = _score(every, fitted, feature_map_sizes)
    if fitted_score < scored[start]:  # only possible when the search saw a sample
        fitted, fitted_score = box_spec(size, "fitted", origin.sizes()), scored[start]
    scored["fitted"] = fitted_score
    return BoxFit(
        spec=fitted,
        start=start,
        boxes=len(boxes),
        coverage={name: share for name, (share, _) in scored.items()},
        mean_iou={name: mean for name, (_, mean) in scored.items()},
    )


def _score(
    boxes: BoxOffsets, spec: DefaultBoxSpec, feature_map_sizes: tuple[int, ...]
) -> tuple[float, float]:
    """(coverage, mean best IoU): compared as a tuple, coverage first."""
    best = best_iou(boxes, spec, feature_map_sizes)
    if not len(best):
        return 1.0, 1.0
    return float((best >= 0.5).mean()), float(best.mean())


def _encode(spec: DefaultBoxSpec) -> np.ndarray:
    """The K + 1 scales (the min sizes, then the last max size) and the aspect ratios, as
    logs. Every preset's max size on a map is the next map's min size (the paper's s_k and
    s_{k+1}), so the scales say both."""
    if list(spec.max_sizes[:-1]) != list(spec.min_sizes[1:]):
        raise ValueError("expected each map's max size to be the next map's min size")
    ratios = [r for per_map in spec.aspect_ratios for r in per_map]
    scales = [*spec.min_sizes, spec.max_sizes[-1]]
    return np.log(np.array([*scales, *ratios], dtype=np.float64))


def _decode(values: np.ndarray, size: int, layout: list[int]) -> DefaultBoxSpec:
    """The spec whose ``_encode`` is ``values`` (scales sorted, so that deeper maps keep the
    larger boxes), with ``layout[k]`` aspect ratios on map k."""
    maps = len(layout)
    scales = np.sort(np.exp(values[: maps + 1])).tolist()
    numbers = np.exp(values[maps + 1 :]).tolist()
    ratios, at = [], 0
    for count in layout:
        ratios.append(numbers[at : at + count])
        at += count
    sizes = {"min_sizes": scales[:-1], "max_sizes": scales[1:], "aspect_ratios": ratios}
    return box_spec(size, "fitted", sizes)


def _bounds(origin: DefaultBoxSpec) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper limits of the encoded values (``SIZE_FACTOR``, ``MAX_RATIO``)."""
    centre = _encode(origin)
    scales = len(origin.min_sizes) + 1
    spread = math.log(SIZE_FACTOR)
    ratios = len(centre) - scales
    low = np.concatenate([centre[:scales] - spread, np.zeros(ratios)])
    high = np.concatenate([centre[:scales] + spread, np.full(ratios, math.log(MAX_RATIO))])
    return low, high
