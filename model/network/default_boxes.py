"""Default boxes (priors), as the SSD authors' released Caffe configuration builds them.

The sizes are not restated by hand: ``authors_sizes`` reproduces the arithmetic of
``examples/ssd/ssd_pascal.py`` (and its COCO and 512 siblings) in weiliu89/caffe, and the box
layout follows that repository's ``PriorBoxLayer``:

* per feature-map cell, boxes are ordered s_k, s'_k = sqrt(s_k * s_{k+1}), then for each aspect
  ratio a in the map's list the pair (s_k*sqrt(a), s_k/sqrt(a)), (s_k/sqrt(a), s_k*sqrt(a));
* cells are row-major; the centre of cell (i, j) is ((j + 0.5) * step, (i + 0.5) * step) / size;
* boxes are not clipped (the authors' ``clip: false``), unless the spec's ``clip`` says so,
  for weights trained with another code's boxes (``model.weights.published``): ``"wh"`` clips each w
  and h to [0, 1], as torchvision's ``DefaultBoxGenerator`` does (``clip=True``, its
  default); ``"cxcywh"`` clips all four numbers, as ssd.pytorch's ``PriorBox`` does
  (``output.clamp_(max=1, min=0)``), which also moves the centres of SSD300's 10x10 map that
  lie past the input (step 32: 9.5 * 32 = 304 px) to its edge.

All boxes are (cx, cy, w, h) relative to the network input size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from model.network.boxes import box_iou, cxcywh_to_xyxy


@dataclass(frozen=True)
class DefaultBoxSpec:
    """Sizes in input pixels for each source feature map, from the shallowest to the deepest.

    ``min_sizes[k]`` is s_k; ``max_sizes[k]`` defines s'_k = sqrt(min_sizes[k] * max_sizes[k]).
    ``steps[k]`` is the pixel distance between neighbouring cell centres on map k.
    ``clip`` is one of ``CLIPS`` (module docstring).
    """

    size: int
    min_sizes: tuple[float, ...]
    max_sizes: tuple[float, ...]
    steps: tuple[int, ...]
    aspect_ratios: tuple[tuple[int, ...], ...]
    clip: str = "none"

    def __post_init__(self) -> None:
        if self.clip not in CLIPS:
            raise ValueError(f"clip must be one of {CLIPS}, got {self.clip!r}")
        lengths = {len(self.min_sizes), len(self.max_sizes), len(self.steps)}
        if lengths != {len(self.aspect_ratios)}:
            raise ValueError(
                "min_sizes, max_sizes, steps and aspect_ratios must have one entry per feature "
                f"map, got lengths {len(self.min_sizes)}, {len(self.max_sizes)}, "
                f"{len(self.steps)}, {len(self.aspect_ratios)}"
            )

    @property
    def boxes_per_location(self) -> list[int]:
        """Boxes per cell on each map: two squares plus a pair per aspect ratio."""
        return [2 + 2 * len(ratios) for ratios in self.aspect_ratios]


def authors_sizes(
    size: int, num_maps: int, min_ratio: int, max_ratio: int, first: tuple[int, int]
) -> tuple[list[float], list[float]]:
    """Min and max box sizes in pixels, computed as the authors' training scripts do.

    The scripts space the ratios (in percent of ``size``) of maps 2..K linearly from
    ``min_ratio`` to ``max_ratio`` with an integer step, and give the first map (conv4_3) the
    hand-picked ``first = (min_percent, max_percent)``.
    """
    step = (max_ratio - min_ratio) // (num_maps - 2)
    ratios = range(min_ratio, max_ratio + 1, step)
    min_sizes = [size * first[0] / 100.0] + [size * r / 100.0 for r in ratios]
    max_sizes = [size * first[1] / 100.0] + [size * (r + step) / 100.0 for r in ratios]
    if len(min_sizes) != num_maps:
        raise ValueError(f"ratios {min_ratio}..{max_ratio} do not give {num_maps} maps")
    return min_sizes, max_sizes


# (min_ratio, max_ratio, first-map percentages) per (input size, preset). "voc" and "coco"
# are the authors' ssd_pascal.py, ssd_coco.py, ssd_pascal_512.py and COCO SSD512 scripts.
# "fine" is not a script of theirs: it is their finest tiling, the COCO SSD512 percentages
# (conv4_3 at 4 %), on either input size. The paper leaves the tiling to the data (section
# 2.2); on SSD300 it suits data with many objects under 16 px, which the 7 % (21 px) of
# "coco" cannot match at IoU 0.5.
_PRESET_RATIOS: dict[tuple[int, str], tuple[int, int, tuple[int, int]]] = {
    (300, "voc"): (20, 90, (10, 20)),
    (300, "coco"): (15, 90, (7, 15)),
    (300, "fine"): (10, 90, (4, 10)),
    (512, "voc"): (15, 90, (7, 15)),
    (512, "coco"): (10, 90, (4, 10)),
    (512, "fine"): (10, 90, (4, 10)),
}
# Steps and aspect ratios of the authors' scripts; conv4_3 and the last two maps use [2] only.
_STEPS = {300: (8, 16, 32, 64, 100, 300), 512: (8, 16, 32, 64, 128, 256, 512)}
_ASPECT_RATIOS = {
    300: ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    512: ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
}
PRESETS = ("voc", "coco", "fine")
# The IoU at which a default box counts as covering a box: the matching threshold of the
# paper (sec. 2.2), so a covered box gets positives from the per-prediction pass.
COVER_IOU = 0.5
# Ground-truth boxes per IoU block in best_iou: 1,024 x 24,564 (SSD512) float32 is ~100 MB.
_IOU_CHUNK = 1024
CLIPS = ("none", "wh", "cxcywh")  # see the module docstring


def preset_spec(size: int, preset: str) -> DefaultBoxSpec:
    """The authors' default-box configuration for SSD300/SSD512 trained on VOC or COCO.

    ``preset`` is "voc", "coco" or "fine" (the COCO SSD512 percentages, at either size).
    """
    if (size, preset) not in _PRESET_RATIOS:
        raise ValueError(
            f"no default-box preset for size={size!r}, preset={preset!r}; "
            f"known: {sorted(_PRESET_RATIOS)}"
        )
    min_ratio, max_ratio, first = _PRESET_RATIOS[(size, preset)]
    steps = _STEPS[size]
    min_sizes, max_sizes = authors_sizes(size, len(steps), min_ratio, max_ratio, first)
    return DefaultBoxSpec(
        size=size,
        min_sizes=tuple(min_sizes),
        max_sizes=tuple(max_sizes),
        steps=steps,
        aspect_ratios=_ASPECT_RATIOS[size],
    )


def make_default_boxes(spec: DefaultBoxSpec, feature_map_sizes: list[int]) -> Tensor:
    """Default boxes for square feature maps of the given sides, as a float32 Tensor[P, 4].

    Rows are (cx, cy, w, h) relative to ``spec.size``, ordered map by map, then cell by cell
    (row-major), then box by box within a cell in the order given in the module docstring.
    """
    if len(feature_map_sizes) != len(spec.steps):
        raise ValueError(
            f"expected {len(spec.steps)} feature-map sizes, got {len(feature_map_sizes)}"
        )
    per_map = []
    for k, side in enumerate(feature_map_sizes):
        s_k = spec.min_sizes[k] / spec.size
        s_prime = math.sqrt(spec.min_sizes[k] * spec.max_sizes[k]) / spec.size
        wh = [(s_k, s_k), (s_prime, s_prime)]
        for ratio in spec.aspect_ratios[k]:
            root = math.sqrt(ratio)
            wh += [(s_k * root, s_k / root), (s_k / root, s_k * root)]
        wh_t = torch.tensor(wh, dtype=torch.float64)  # (A, 2)
        if spec.clip != "none":
            wh_t = wh_t.clamp(min=0.0, max=1.0)

        centres = (torch.arange(side, dtype=torch.float64) + 0.5) * spec.steps[k] / spec.size
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        cxcy = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)  # (H*W, 2)
        if spec.clip == "cxcywh":
            cxcy = cxcy.clamp(min=0.0, max=1.0)

        # (H*W, 1, 2) and (1, A, 2) -> (H*W, A, 4) -> (H*W*A, 4)
        boxes = torch.cat(
            [
                cxcy[:, None, :].expand(-1, len(wh), 2),
                wh_t[None, :, :].expand(cxcy.shape[0], -1, 2),
            ],
            dim=2,
        )
        per_map.append(boxes.reshape(-1, 4))
    return torch.cat(per_map).to(torch.float32)


def best_iou(boxes: Tensor, default_boxes: Tensor) -> Tensor:
    """Each box's highest IoU with any default box, as a float32 Tensor[G].

    Args:
        boxes: Tensor[G, 4], xyxy, relative to the image (0-1 of its width and height,
            which is the network input after a plain resize).
        default_boxes: Tensor[P, 4], (cx, cy, w, h) relative to the input, as
            ``make_default_boxes`` gives them.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"expected boxes of shape [G, 4], got {tuple(boxes.shape)}")
    priors = cxcywh_to_xyxy(default_boxes.to(torch.float32))
    boxes = boxes.to(torch.float32)
    # (G, P) in blocks of rows -> (G,)
    best = [box_iou(block, priors).amax(dim=1) for block in boxes.split(_IOU_CHUNK)]
    return torch.cat(best) if best else torch.zeros(0)


def coverage(boxes: Tensor, default_boxes: Tensor, iou: float = COVER_IOU) -> float:
    """The share of ``boxes`` (xyxy, relative) that some default box ((cx, cy, w, h),
    relative) overlaps at IoU >= ``iou``; 1.0 when there are no boxes. See ``best_iou``."""
    if len(boxes) == 0:
        return 1.0
    return (best_iou(boxes, default_boxes) >= iou).double().mean().item()
