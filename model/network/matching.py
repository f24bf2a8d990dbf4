"""Assigning ground-truth boxes to default boxes (SSD paper, sec. 2.2, "Matching strategy").

The authors' ``MatchBBox`` (``bbox_util.cpp``, ``match_type: PER_PREDICTION``) works in two
passes, reproduced here:

1. Bipartite: repeatedly take the (ground truth, default box) pair with the highest IoU among
   those not yet used, and match them. Every ground truth thus gets its own best still-free
   default box, even when that IoU is below the threshold, and two ground truths never fight
   over one default box (the popular PyTorch port lets the later one silently win).
   Pairs with no overlap at all are never matched, so a degenerate (zero-area) ground truth,
   whose IoU with everything is 0, is simply left out.
2. Per prediction: every default box not matched in pass 1 takes the ground truth it overlaps
   most, if that IoU is >= the threshold (0.5 in the paper).

Ties are broken towards the lower index (the first ground truth, then the first default box).
The whole batch is matched at once, with no host synchronisation, so it is cheap on a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.network.boxes import box_iou, cxcywh_to_xyxy

# The authors' MatchBBox ignores overlaps at or below this value (bbox_util.cpp: 1e-6).
_MIN_OVERLAP = 1e-6


def match(gt_boxes: Tensor, default_boxes: Tensor, iou_threshold: float = 0.5) -> Tensor:
    """Index of the matched ground truth for every default box, or -1 for background.

    Args:
        gt_boxes: Tensor[N, G, 4], xyxy in the default boxes' relative frame. Images with
            fewer than G objects are padded with zero boxes, which never match.
        default_boxes: Tensor[P, 4], (cx, cy, w, h) relative to the input size.
        iou_threshold: minimum IoU for the per-prediction pass.

    Returns:
        Tensor[N, P] of int64 in [-1, G).
    """
    if gt_boxes.ndim != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"expected gt_boxes of shape [N, G, 4], got {tuple(gt_boxes.shape)}")
    num_images, num_gt, _ = gt_boxes.shape
    num_priors = default_boxes.shape[0]
    device = default_boxes.device
    matched = torch.full((num_images, num_priors), -1, dtype=torch.int64, device=device)
    if num_gt == 0:
        return matched

    priors_xyxy = cxcywh_to_xyxy(default_boxes)
    # (N*G, 4) x (P, 4) -> (N, G, P)
    iou = box_iou(gt_boxes.reshape(-1, 4), priors_xyxy).reshape(num_images, num_gt, num_priors)

    # Pass 2 first, so that pass 1 overwrites it where they disagree.
    best_iou, best_gt = iou.max(dim=1)  # (N, P)
    above = best_iou >= iou_threshold
    matched = torch.where(above, best_gt, matched)

    # Pass 1: greedy bipartite matching; each round matches one ground truth per image.
    free = iou.clone()
    images = torch.arange(num_images, device=device)
    for _ in range(num_gt):
        best, flat = free.reshape(num_images, -1).max(dim=1)  # (N,)
        gt, prior = flat // num_priors, flat % num_priors
        ok = best > _MIN_OVERLAP
        matched[images, prior] = torch.where(ok, gt, matched[images, prior])
        free[images, gt, :] = -1.0
        free[images, :, prior] = -1.0
    return matched
