"""Box formats and overlap: the single place where box conversion and IoU are defined.

Two formats are used across the project:

* ``xyxy``: (x_min, y_min, x_max, y_max)
* ``cxcywh``: (centre x, centre y, width, height)

Both may be relative (fractions of the image side) or absolute pixels; the functions here do
not care, as long as both arguments share a frame. IoU is torchvision's ``box_iou`` (xyxy),
re-exported so that the rest of the project has exactly one import for it.
"""

from __future__ import annotations

from torch import Tensor
from torchvision.ops import box_convert, box_iou

__all__ = ["box_iou", "cxcywh_to_xyxy", "has_positive_area", "xyxy_to_cxcywh"]


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) centre-size boxes to corner boxes, in the same units."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) corner boxes to centre-size boxes, in the same units."""
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def has_positive_area(boxes: Tensor) -> Tensor:
    """Bool mask (...,) of xyxy boxes whose width and height are both strictly positive."""
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
