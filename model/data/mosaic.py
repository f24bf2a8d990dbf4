"""Mosaic: four training images on one canvas (YOLOv4, Bochkovskiy et al. 2020, sec. 3.3).

Not part of SSD: an augmentation for small datasets, measured against the paper's alone in
the README ("Your own data"). Each mosaic shows four scenes at once, at about half their usual
size, so a batch holds more objects, more scales and more backgrounds than the same number of
photos; the paper's augmentation then runs on the mosaic as on any photo.

Sample format as in ``model.data.transforms``: uint8 image Tensor[3, H, W], float32 boxes
Tensor[G, 4] xyxy in absolute pixels, int64 labels Tensor[G].
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

from model.data.crop import Sample
from model.network.boxes import clip_and_sanitize
from model.network.preprocessing import PIXEL_MEAN

__all__ = ["Mosaic"]

PIECES = 4  # a 2 x 2 grid around the centre


class Mosaic:
    """Places four samples around a random centre of a ``2 * size`` square canvas.

    Each image is resized (bilinear, antialiased, aspect ratio kept) so that its longer side is
    ``size`` pixels, then put in its quadrant with one corner at the centre: the first sample
    to the top left of the centre, then top right, bottom left, bottom right (YOLOv4's
    layout). The centre is drawn uniformly from the middle half of the canvas on each axis,
    so every image shows at least half its width and half its height; what lies off the
    canvas is cut, and boxes are clipped to what is left (and dropped if nothing is). The rest
    of the canvas is ``fill``.
    """

    def __init__(
        self, prob: float, size: int = 300, fill: tuple[float, float, float] = PIXEL_MEAN
    ) -> None:
        """``prob``: the share of training samples made as mosaics (the caller draws);
        ``size``: the network's input side in pixels; ``fill``: RGB canvas colour, 0..255."""
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        if size < 2:
            raise ValueError(f"size must be at least 2 pixels, got {size}")
        self.prob = prob
        self.size = size
        self.fill = fill

    def draw_centre(self, generator: torch.Generator) -> tuple[int, int]:
        """A centre (x, y) in canvas pixels, each uniform in [size / 2, 3 * size / 2): the
        middle half of the canvas. Two draws from ``generator``."""
        x, y = (
            int(self.size / 2 + self.size * torch.rand((), generator=generator).item())
            for _ in range(2)
        )
        return x, y

    def __call__(self, samples: list[Sample], centre: tuple[int, int]) -> Sample:
        """The mosaic of four samples around ``centre`` (x, y in canvas pixels)."""
        if len(samples) != PIECES:
            raise ValueError(f"a mosaic takes {PIECES} samples, got {len(samples)}")
        side = 2 * self.size
        cx, cy = centre
        if not (0 <= cx <= side and 0 <= cy <= side):
            raise ValueError(f"centre must lie on the {side} x {side} canvas, got {centre}")
        canvas = torch.tensor(self.fill).round().to(torch.uint8)[:, None, None]
        canvas = canvas.expand(3, side, side).clone()
        all_boxes, all_labels = [], []
        for k, (image, boxes, labels) in enumerate(samples):
            height, width = image.shape[-2:]
            scale = self.size / max(height, width)
            h, w = max(1, round(height * scale)), max(1, round(width * scale))
            image = TF.resize(image, [h, w], antialias=True)
            # (left, top) of the piece: to the left of the centre for k = 0, 2, above for 0, 1
            left = cx - w if k % 2 == 0 else cx
            top = cy - h if k < 2 else cy
            # the part of the piece on the canvas, in canvas and in piece pixels
            x0, y0 = max(left, 0), max(top, 0)
            x1, y1 = min(left + w, side), min(top + h, side)
            canvas[:, y0:y1, x0:x1] = image[:, y0 - top : y1 - top, x0 - left : x1 - left]
            shift = torch.tensor([left, top, left, top], dtype=torch.float32)
            placed = boxes * torch.tensor([w / width, h / height] * 2) + shift
            # clipped to the piece's visible part, which no other piece overlaps
            origin = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
            kept, keep = clip_and_sanitize(placed - origin, (y1 - y0, x1 - x0))
            all_boxes.append(kept + origin)
            all_labels.append(labels[keep])
        return canvas, torch.cat(all_boxes), torch.cat(all_labels)
