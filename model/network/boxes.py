"""Box formats, overlap and clipping: the single place where box geometry is defined.

Three formats are used across the project:

* ``xyxy``: (x_min, y_min, x_max, y_max), the project's own format everywhere;
* ``cxcywh``: (centre x, centre y, width, height), for box coding;
* ``xywh``: (x_min, y_min, width, height), COCO's JSON format, at the COCO boundary only.

All may be relative (fractions of the image side) or absolute pixels; the conversions do
not care, as long as both arguments share a frame. Conversions are torchvision's
``box_convert`` and IoU is torchvision's ``box_iou`` (xyxy), re-exported so that the rest of
the project has exactly one import for each.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou, clip_boxes_to_image
from torchvision.transforms.v2.functional import sanitize_bounding_boxes

__all__ = [
    "box_iou",
    "clip_and_sanitize",
    "cxcywh_to_xyxy",
    "xywh_to_xyxy",
    "xyxy_to_cxcywh",
    "xyxy_to_xywh",
]


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) centre-size boxes to corner boxes, in the same units."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) corner boxes to centre-size boxes, in the same units."""
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) COCO corner-size boxes to corner boxes, in the same units."""
    return box_convert(boxes, in_fmt="xywh", out_fmt="xyxy")


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """(..., 4) corner boxes to COCO corner-size boxes, in the same units."""
    return box_convert(boxes, in_fmt="xyxy", out_fmt="xywh")


def clip_and_sanitize(boxes: Tensor, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Clip xyxy pixel boxes to an image and drop the ones left with no area.

    Args:
        boxes: float Tensor[G, 4], xyxy, absolute 0-based pixel-edge coordinates.
        image_size: (height, width) in pixels.

    Returns:
        ``(kept, keep)``: the clipped boxes that still have a positive width and height,
        Tensor[G', 4] in the input's dtype, and the bool Tensor[G] that picked them, for
        keeping labels and other per-box values aligned. Non-finite boxes are dropped too.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"expected boxes of shape [G, 4], got {tuple(boxes.shape)}")
    clipped = clip_boxes_to_image(boxes, image_size)
    # torchvision drops boxes under 1 px a side (or 1 px²) by default; the smallest positive
    # float lowers that to "no area at all", so thin but real boxes are kept.
    tiny = torch.finfo(boxes.dtype).tiny
    return sanitize_bounding_boxes(
        clipped, format="XYXY", canvas_size=image_size, min_size=tiny, min_area=tiny
    )
