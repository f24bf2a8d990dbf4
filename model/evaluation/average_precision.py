"""Detection metrics: Pascal VOC AP@0.5 (both variants) and COCO AP via pycocotools.

Inputs are per image, in the image's pixels:

* ground truth: a dict with "boxes" (Tensor[G, 4] xyxy), "labels" (Tensor[G], 1..C-1),
  "difficult" (bool Tensor[G]), the image's "width" and "height", and optionally
  "crowd_boxes" (Tensor[K, 4] xyxy) with "crowd_labels" (Tensor[K], 1..C-1; without them a
  crowd region is ignored for every class), and "areas" (Tensor[G]) / "crowd_areas"
  (Tensor[K]) in square pixels (see ``coco_metrics``);
* detections: (boxes Tensor[D, 4] xyxy, scores Tensor[D], class_ids Tensor[D]).

VOC follows the devkit's ``VOCevaldet``: detections of a class are ranked by score over the
whole set; each is a true positive if its best-overlapping ground truth of that class has
IoU > 0.5 (see VOC_IOU) and was not already taken, a false positive otherwise; detections
whose best match is ``difficult`` count as neither, and difficult objects are not counted in
the recall. AP is
the VOC2007 11-point interpolation or the VOC2010+ area under the interpolated curve.
Boxes are continuous 0-based pixel edges, so no "+1" is added to widths as the devkit did.

COCO numbers come from pycocotools' COCOeval, not a re-implementation. Difficult objects and
crowd regions are passed to it as ``iscrowd`` annotations, which it ignores. With the COCO
reader's "crowd_labels" and "areas" (``model.data.coco``) the six numbers equal COCOeval run on the
original JSON (tests/model/evaluation/test_average_precision.py checks it on coco128).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from model.network.boxes import box_iou, xyxy_to_xywh

Detection = tuple[Tensor, Tensor, Tensor]
# Everingham et al., "The PASCAL VOC Challenge" (IJCV 2010), detection evaluation: the overlap
# must *exceed* 50 %, as py-faster-rcnn's voc_eval.py tests (ovmax > 0.5). The MATLAB devkit's
# VOCevaldet.m tests ovmax >= 0.5; the two differ only at an IoU of exactly 0.5.
VOC_IOU = 0.5
COCO_KEYS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


def average_precision(recall: np.ndarray, precision: np.ndarray, *, voc07: bool) -> float:
    """AP from a ranked list's recall/precision curve (VOC devkit ``VOCap`` / 11-point)."""
    if voc07:
        # VOC2007: mean of the best precision at recall >= t, t = 0, 0.1, ..., 1.
        points = [precision[recall >= t].max(initial=0.0) for t in np.linspace(0, 1, 11)]
        return float(np.mean(points))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    changes = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


@dataclass(frozen=True)
class PRCurve:
    """One class's precision-recall curve at one IoU threshold, VOC style.

    ``recall`` and ``precision`` are float64 arrays with one point per counted detection in
    descending score order (detections of difficult objects drop out); ``positives`` is the
    number of non-difficult ground truths the recall is relative to.
    """

    recall: np.ndarray
    precision: np.ndarray
    positives: int

    def ap(self) -> tuple[float, float]:
        """(all-point AP, VOC07 11-point AP); (nan, nan) with no positives to find."""
        if self.positives == 0:
            return math.nan, math.nan
        return (
            average_precision(self.recall, self.precision, voc07=False),
            average_precision(self.recall, self.precision, voc07=True),
        )


def voc_pr_curves(
    detections: Sequence[Detection],
    ground_truths: Sequence[dict[str, Any]],
    num_classes: int,
    iou_threshold: float = VOC_IOU,
) -> dict[int, PRCurve]:
    """{class id: its precision-recall curve} for class ids 1..C-1 (the VOC devkit's
    matching: in score order, a detection is a true positive when its best-overlapping
    ground truth has IoU above the threshold and was not matched before)."""
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} detection sets for {len(ground_truths)} images")
    curves = {}
    for cls in range(1, num_classes):
        scores, hits, positives = [], [], 0
        for (boxes, det_scores, det_classes), gt in zip(detections, ground_truths, strict=True):
            mine = gt["labels"] == cls
            gt_boxes, difficult = gt["boxes"][mine], gt["difficult"][mine]
            positives += int((~difficult).sum())
            keep = det_classes == cls
            d_boxes, d_scores = boxes[keep], det_scores[keep]
            if d_scores.numel() == 0:
                continue
            order = torch.argsort(d_scores, descending=True)
            scores.append(d_scores[order])
            hits.append(_voc_hits(d_boxes[order], gt_boxes, difficult, iou_threshold))
        curves[cls] = _curve_from_hits(scores, hits, positives)
    return curves


def voc_ap_per_class(
    detections: Sequence[Detection],
    ground_truths: Sequence[dict[str, Any]],
    num_classes: int,
    iou_threshold: float = VOC_IOU,
) -> dict[int, tuple[float, float]]:
    """{class id: (all-point AP, VOC07 11-point AP)} for class ids 1..C-1.

    A class without any non-difficult ground truth gets (nan, nan).
    """
    curves = voc_pr_curves(detections, ground_truths, num_classes, iou_threshold)
    return {cls: curve.ap() for cls, curve in curves.items()}


def _voc_hits(boxes: Tensor, gt_boxes: Tensor, difficult: Tensor, threshold: float) -> Tensor:
    """Per detection (in score order, one image): 1 true positive, 0 false, -1 ignored."""
    hits = torch.zeros(boxes.shape[0], dtype=torch.int8)
    if gt_boxes.shape[0] == 0:
        return hits
    iou = box_iou(boxes.float(), gt_boxes.float())  # (D, G)
    best_iou, best_gt = iou.max(dim=1)
    taken = torch.zeros(gt_boxes.shape[0], dtype=torch.bool)
    for i in range(boxes.shape[0]):
        if best_iou[i] <= threshold:
            continue
        g = int(best_gt[i])
        if difficult[g]:
            hits[i] = -1
        elif not taken[g]:
            hits[i], taken[g] = 1, True
    return hits


def _curve_from_hits(scores: list[Tensor], hits: list[Tensor], positives: int) -> PRCurve:
    if not scores:
        return PRCurve(np.zeros(0), np.zeros(0), positives)
    all_scores, all_hits = torch.cat(scores), torch.cat(hits)
    # Stable sort: equal scores keep image order, as the devkit's sort does in practice.
    order = torch.sort(all_scores, descending=True, stable=True).indices
    ranked_hits = all_hits[order]
    ranked = ranked_hits[ranked_hits >= 0].numpy()  # ignored (difficult) detections drop out
    tp = np.cumsum(ranked == 1)
    fp = np.cumsum(ranked == 0)
    recall = tp / max(positives, 1)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return PRCurve(recall, precision, positives)


def coco_metrics(
    detections: Sequence[Detection],
    ground_truths: Sequence[dict[str, Any]],
    num_classes: int,
) -> dict[str, float]:
    """COCO AP@[.5:.95], AP50, AP75 and AP small/medium/large from pycocotools.

    Small/medium/large go by each ground truth's area: "areas" / "crowd_areas" when given,
    else the box's width * height. COCO's own annotations carry the segmentation's area
    (often much smaller than the box's), which is what COCOeval bins by, so pass it to match.
    All zeros when there are no detections or no ground truth at all.
    """
    images, annotations = _coco_ground_truth(ground_truths, num_classes)
    results = [
        {
            "image_id": image_id,
            "category_id": int(c),
            "bbox": b,
            "score": float(s),
        }
        for image_id, (boxes, scores, classes) in enumerate(detections)
        for b, s, c in zip(
            xyxy_to_xywh(boxes.double()).tolist(), scores.tolist(), classes.tolist(), strict=True
        )
    ]
    if not results or not annotations:
        return dict.fromkeys(COCO_KEYS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        truth = COCO()
        truth.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c} for c in range(1, num_classes)],
        }
        truth.createIndex()
        evaluator = COCOeval(truth, truth.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # stats: AP, AP50, AP75, AP small, medium, large (-1 where no such objects exist).
    return {key: float(v) for key, v in zip(COCO_KEYS, evaluator.stats[:6], strict=True)}


def _coco_ground_truth(
    ground_truths: Sequence[dict[str, Any]], num_classes: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """COCO's ``images`` and ``annotations`` for ``ground_truths`` (image ids are their
    indices; difficult objects and crowd regions become ``iscrowd`` ones, which COCOeval
    ignores rather than counts as misses)."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, gt in enumerate(ground_truths):
        images.append({"id": image_id, "width": gt["width"], "height": gt["height"]})
        # COCO's JSON boxes are [x, y, width, height]; float64 so that w and h are exact.
        boxes = xyxy_to_xywh(gt["boxes"].double()).tolist()
        areas = _areas(gt.get("areas"), boxes)
        regions = [
            (b, int(c), bool(d), a)
            for b, c, d, a in zip(boxes, gt["labels"], gt["difficult"], areas, strict=True)
        ]
        crowd = xyxy_to_xywh(gt.get("crowd_boxes", torch.zeros(0, 4)).double()).tolist()
        crowd_areas = _areas(gt.get("crowd_areas"), crowd)
        if "crowd_labels" in gt:
            regions += [
                (b, int(c), True, a)
                for b, c, a in zip(crowd, gt["crowd_labels"], crowd_areas, strict=True)
            ]
        else:  # a crowd region of unknown class ignores detections of every class
            regions += [
                (b, c, True, a)
                for b, a in zip(crowd, crowd_areas, strict=True)
                for c in range(1, num_classes)
            ]
        for box, cls, ignored, area in regions:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cls,
                    "bbox": box,
                    "area": area,
                    "iscrowd": int(ignored),
                }
            )
    return images, annotations


def _areas(areas: Tensor | None, boxes: list[list[float]]) -> list[float]:
    """Given areas as floats, else each xywh box's width * height."""
    if areas is None:
        return [b[2] * b[3] for b in boxes]
    if areas.shape != (len(boxes),):
        raise ValueError(f"expected areas of shape [{len(boxes)}], got {tuple(areas.shape)}")
    return areas.tolist()
