"""Two runtimes' detections of one image compared: the same detections in the same score order,
labels equal and boxes within a bound. Detections whose scores differ by less than ``tie`` may
come in either order: float rounding between runtimes (~1e-7 on a score) can swap two boxes
of near-equal score, which changes no detection."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def assert_same_detections(
    ours: tuple[Sequence[str], np.ndarray, np.ndarray],
    theirs: tuple[Sequence[str], np.ndarray, np.ndarray],
    *,
    box_px: float,
    tie: float,
) -> float:
    """Each side is (labels, boxes [K, 4] xyxy pixels, scores [K] descending). Raises an
    AssertionError naming the first difference; returns the largest box difference (px)."""
    our_labels, our_boxes, our_scores = (list(ours[0]), np.asarray(ours[1]), np.asarray(ours[2]))
    labels, boxes, scores = list(theirs[0]), np.asarray(theirs[1]), np.asarray(theirs[2])
    assert len(our_labels) == len(labels), f"{len(our_labels)} detections against {len(labels)}"
    worst = 0.0
    start = 0
    while start < len(labels):
        # A run of near-equal scores: theirs[start:end], compared as a set.
        end = start + 1
        while end < len(labels) and scores[end - 1] - scores[end] < tie:
            end += 1
        free = list(range(start, end))
        for i in range(start, end):
            assert abs(our_scores[i] - scores[i]) < tie, (
                f"score {i}: {our_scores[i]} vs {scores[i]}"
            )
            gaps = {
                j: float(np.abs(our_boxes[i] - boxes[j]).max())
                for j in free
                if labels[j] == our_labels[i]
            }
            best = min(gaps, key=gaps.__getitem__, default=None)
            assert best is not None and gaps[best] <= box_px, (
                f"detection {i} ({our_labels[i]} {our_boxes[i].tolist()}) has no match among "
                f"{[(labels[j], boxes[j].tolist()) for j in free]}"
            )
            worst = max(worst, gaps[best])
            free.remove(best)
        start = end
    return worst
