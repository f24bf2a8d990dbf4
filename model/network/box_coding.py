"""SSD box coding: offsets of a box relative to a default box, scaled by the "variances".

The authors' Caffe code (``bbox_util.cpp``, ``CENTER_SIZE`` coding with
``variance_encoded_in_target: false``) encodes a ground-truth box g against a default box d as

    t_x = (g_cx - d_cx) / (d_w * 0.1)      t_w = log(g_w / d_w) / 0.2
    t_y = (g_cy - d_cy) / (d_h * 0.1)      t_h = log(g_h / d_h) / 0.2

which equals torchvision's ``BoxCoder(weights=(10, 10, 5, 5))``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from model.network.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh

# The authors' prior_variance for SSD300/512 (ssd_pascal.py): 0.1 for centres, 0.2 for sizes.
VARIANCES = (0.1, 0.2)
# exp() of a size offset above this would mean a box > 62x its default box; the cap keeps a
# wild prediction from overflowing to inf. Same bound as torchvision's BoxCoder.
_MAX_LOG_SCALE = math.log(1000.0 / 16)
# Smallest width/height used in log(): a degenerate (zero-size) box must never produce log(0).
_MIN_SIZE = 1e-6


def encode_boxes(
    boxes: Tensor, default_boxes: Tensor, variances: tuple[float, float] = VARIANCES
) -> Tensor:
    """Encode xyxy ``boxes`` (..., 4) against cxcywh ``default_boxes`` (..., 4), same frame.

    Returns offsets (..., 4) in the order (t_x, t_y, t_w, t_h).
    """
    g = xyxy_to_cxcywh(boxes)
    g_wh = g[..., 2:].clamp(min=_MIN_SIZE)
    d_xy, d_wh = default_boxes[..., :2], default_boxes[..., 2:]
    t_xy = (g[..., :2] - d_xy) / (d_wh * variances[0])
    t_wh = torch.log(g_wh / d_wh) / variances[1]
    return torch.cat([t_xy, t_wh], dim=-1)


def decode_boxes(
    offsets: Tensor, default_boxes: Tensor, variances: tuple[float, float] = VARIANCES
) -> Tensor:
    """Invert :func:`encode_boxes`: offsets (..., 4) and cxcywh default boxes (..., 4) to
    xyxy boxes in their frame."""
    d_xy, d_wh = default_boxes[..., :2], default_boxes[..., 2:]
    xy = d_xy + offsets[..., :2] * variances[0] * d_wh
    log_scale = (offsets[..., 2:] * variances[1]).clamp(max=_MAX_LOG_SCALE)
    wh = d_wh * torch.exp(log_scale)
    return cxcywh_to_xyxy(torch.cat([xy, wh], dim=-1))
