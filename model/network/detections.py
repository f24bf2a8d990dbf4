"""What a caller asks of a detector and what it gets back, without torch: the ``Cut`` (score
threshold, cap, classes, NMS IoU) for one image, the ``Detections`` of one image, a batch's
``BatchResult``, and ``ServedDetector``, the interface the service uses. The torch
``Detector`` and the ONNX Runtime ``OnnxDetector`` both speak these, so the service serves
either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

# The authors' test-time settings (ssd_pascal.py: nms_threshold 0.45, top_k 400, keep_top_k 200).
NMS_IOU = 0.45
TOP_K = 400
MAX_DETECTIONS = 200


@dataclass(frozen=True)
class Cut:
    """How one image's detections are cut from the network's outputs.

    ``score_threshold``: keep scores strictly above it (0..1). ``max_detections``: at most this
    many (>= 1), the best. ``classes``: the class ids (1..C-1) to keep, None for all; the others
    are dropped before the cap, so the cap counts only these. ``nms_iou``: the per-class NMS
    overlap (0..1) above which the lower-scoring box goes.
    """

    score_threshold: float = 0.3
    max_detections: int = MAX_DETECTIONS
    classes: frozenset[int] | None = None
    nms_iou: float = NMS_IOU

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {self.max_detections}")
        if not 0.0 <= self.nms_iou <= 1.0:
            raise ValueError(f"the NMS IoU must be in [0, 1], got {self.nms_iou}")
        if self.classes is not None and (not self.classes or min(self.classes) < 1):
            raise ValueError(f"classes must be ids from 1 (0 is background), got {self.classes}")


def class_ids_of(class_names: Sequence[str], names: Sequence[str]) -> frozenset[int]:
    """The ids (1..C-1) of ``names`` among a model's ``class_names`` (id k is name k-1).

    Raises:
        ValueError: none given, or a name this model lacks; the message lists the valid ones.
    """
    unknown = [name for name in names if name not in class_names]
    if unknown or not names:
        raise ValueError(
            f"unknown classes {unknown or list(names)}; this model has {', '.join(class_names)}"
        )
    return frozenset(list(class_names).index(name) + 1 for name in names)


def make_cut(
    class_names: Sequence[str],
    default_nms_iou: float,
    score_threshold: float,
    max_detections: int,
    classes: Sequence[str] | None = None,
    nms_iou: float | None = None,
) -> Cut:
    """The ``Cut`` for these settings on a model of ``class_names``: class names turned into ids
    (``class_ids_of``), ``nms_iou`` None meaning the model's ``default_nms_iou``. What both
    detectors' ``cut`` give.

    Raises:
        ValueError: a value out of range, or a class name this model lacks (the message lists
            the valid ones).
    """
    return Cut(
        score_threshold=score_threshold,
        max_detections=max_detections,
        classes=None if classes is None else class_ids_of(class_names, classes),
        nms_iou=default_nms_iou if nms_iou is None else nms_iou,
    )


def class_mask(cuts: Sequence[Cut], num_classes: int) -> np.ndarray | None:
    """bool array [len(cuts), C-1]: the classes (ids 1..C-1) each cut keeps, for a model of
    ``num_classes`` classes (background included); None when every cut keeps all.

    Raises:
        ValueError: a cut names a class id past the model's (the message gives the range).
    """
    for cut in cuts:
        if cut.classes is not None and max(cut.classes) >= num_classes:
            raise ValueError(
                f"class ids run from 1 to {num_classes - 1}, got {sorted(cut.classes)}"
            )
    if all(cut.classes is None for cut in cuts):
        return None
    mask = np.ones((len(cuts), num_classes - 1), dtype=bool)
    for row, cut in enumerate(cuts):
        if cut.classes is not None:
            mask[row] = False
            mask[row, [c - 1 for c in cut.classes]] = True
    return mask


@dataclass
class Detections:
    """Detections for one image, sorted by score (descending).

    ``boxes`` is [K, 4] xyxy in pixels of that image; ``scores`` [K] in (0, 1]; ``class_ids``
    [K] int64 in 1..C-1; ``labels`` the class names of ``class_ids``. The arrays are torch
    Tensors from the torch ``Detector`` and numpy arrays from the ``OnnxDetector``; both give
    ``shape`` and ``tolist()``, which is all the service reads.
    """

    boxes: Any
    scores: Any
    class_ids: Any
    labels: list[str]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def rows(self) -> list[tuple[list[float], float, int, str]]:
        """One plain-Python row per detection, in score order: (box [x0, y0, x1, y1] in
        pixels, score, class id, label), for callers that serialise them."""
        return list(
            zip(
                self.boxes.tolist(),
                self.scores.tolist(),
                self.class_ids.tolist(),
                self.labels,
                strict=True,
            )
        )


@dataclass(frozen=True)
class BatchResult:
    """What a detector's ``run_batch`` gives: one ``Detections`` per input, in order, and the
    wall-clock seconds of the batch's forward pass (with its stacking and copy to the device)
    and of its post-processing."""

    detections: list[Detections]
    forward_s: float
    postprocess_s: float


class ServedDetector(Protocol):
    """What the service uses of a detector: the torch ``Detector``
    (``model.inference.detector``) and the ``OnnxDetector``
    (``model.inference.onnx_detector``) both have it. ``prepare``'s input is opaque to the
    service: it queues it and hands it back to ``run_batch``."""

    class_names: list[str]
    input_size: int

    @property
    def device(self) -> Any: ...  # torch.device or "cpu"; the service prints it

    @property
    def precision(self) -> str: ...

    def cut(
        self,
        score_threshold: float,
        max_detections: int,
        classes: Sequence[str] | None = None,
        nms_iou: float | None = None,
    ) -> Cut: ...

    def prepare(self, image: Any) -> tuple[Any, tuple[int, int]]: ...

    def run_batch(
        self, inputs: Sequence[Any], sizes: Sequence[tuple[int, int]], cuts: Sequence[Cut]
    ) -> BatchResult: ...

    def warm_up(self) -> None: ...
