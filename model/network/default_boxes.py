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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor


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
    aspect_ratios: tuple[tuple[float, ...], ...]
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

    def shapes(self, k: int) -> list[tuple[float, float]]:
        """The (w, h) of map ``k``'s boxes relative to the input, in a cell's order (module
        docstring), before any clipping."""
        s_k = self.min_sizes[k] / self.size
        s_prime = math.sqrt(self.min_sizes[k] * self.max_sizes[k]) / self.size
        wh = [(s_k, s_k), (s_prime, s_prime)]
        for ratio in self.aspect_ratios[k]:
            root = math.sqrt(ratio)
            wh += [(s_k * root, s_k / root), (s_k / root, s_k * root)]
        return wh

    def centres(self, k: int, side: int) -> np.ndarray:
        """The cell centres of map ``k`` (``side`` cells a row) along one axis, relative to the
        input, float64, as clipped by ``clip``."""
        centres = (np.arange(side, dtype=np.float64) + 0.5) * self.steps[k] / self.size
        return centres.clip(0.0, 1.0) if self.clip == "cxcywh" else centres

    def sizes(self) -> dict[str, Any]:
        """Min and max sizes and aspect ratios, JSON-ready: what a checkpoint records of
        fitted boxes (``Architecture.box_sizes``; ``box_spec`` reads it back)."""
        return {
            "min_sizes": list(self.min_sizes),
            "max_sizes": list(self.max_sizes),
            "aspect_ratios": [list(r) for r in self.aspect_ratios],
        }


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
# Boxes fitted to a dataset (model.network.box_fitting): the authors' tiling (steps, maps,
# boxes per cell) with sizes and aspect ratios of their own, recorded in the checkpoint.
FITTED = "fitted"
# The IoU at which a default box counts as covering a box: the matching threshold of the
# paper (sec. 2.2), so a covered box gets positives from the per-prediction pass.
COVER_IOU = 0.5
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


def box_spec(
    size: int, preset: str, box_sizes: dict[str, Any] | None = None, clip: str = "none"
) -> DefaultBoxSpec:
    """The default boxes a network records as ``preset`` (and, for ``FITTED``, ``box_sizes``:
    ``DefaultBoxSpec.sizes()``), clipped as ``clip`` says.

    Fitted sizes keep the authors' tiling at ``size``: their steps, and as many aspect ratios
    per map, so the prediction heads have the shapes of any preset's.
    """
    if preset != FITTED:
        if box_sizes is not None:
            raise ValueError(f"box sizes are for the {FITTED!r} preset, not {preset!r}")
        return replace(preset_spec(size, preset), clip=clip)
    if box_sizes is None or size not in _STEPS:
        raise ValueError(f"the {FITTED!r} preset needs its box sizes and a size of 300 or 512")
    spec = DefaultBoxSpec(
        size=size,
        min_sizes=tuple(float(v) for v in box_sizes["min_sizes"]),
        max_sizes=tuple(float(v) for v in box_sizes["max_sizes"]),
        steps=_STEPS[size],
        aspect_ratios=tuple(tuple(float(r) for r in rs) for rs in box_sizes["aspect_ratios"]),
        clip=clip,
    )
    tiling = [len(r) for r in _ASPECT_RATIOS[size]]
    if [len(r) for r in spec.aspect_ratios] != tiling:
        raise ValueError(
            f"fitted boxes must keep SSD{size}'s aspect ratios per map {tiling}, got "
            f"{[len(r) for r in spec.aspect_ratios]}"
        )
    if min(spec.min_sizes + spec.max_sizes) <= 0 or min(sum(spec.aspect_ratios, ())) < 1:
        raise ValueError("fitted box sizes must be positive and aspect ratios at least 1")
    return spec


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
        wh = torch.tensor(spec.shapes(k), dtype=torch.float64)  # (A, 2)
        if spec.clip != "none":
            wh = wh.clamp(min=0.0, max=1.0)
        centres = torch.from_numpy(spec.centres(k, side))
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        cxcy = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)  # (H*W, 2)

        # (H*W, 1, 2) and (1, A, 2) -> (H*W, A, 4) -> (H*W*A, 4)
        boxes = torch.cat(
            [
                cxcy[:, None, :].expand(-1, len(wh), 2),
                wh[None, :, :].expand(cxcy.shape[0], -1, 2),
            ],
            dim=2,
        )
        per_map.append(boxes.reshape(-1, 4))
    return torch.cat(per_map).to(torch.float32)


@dataclass(frozen=True)
class BoxOffsets:
    """Boxes as ``best_iou`` needs them on one tiling: each box's width and height, and on
    each map its distances along x and y to the nearest cell centre (float64, relative to the
    input). They depend on the steps, sides and ``clip``, not on the box sizes, so
    ``model.network.box_fitting`` makes them once and tries many sizes on them.
    """

    w: np.ndarray  # (G,)
    h: np.ndarray  # (G,)
    dx: tuple[np.ndarray, ...]  # per map, (G,)
    dy: tuple[np.ndarray, ...]

    @classmethod
    def of(
        cls, boxes: np.ndarray | Tensor, spec: DefaultBoxSpec, feature_map_sizes: Sequence[int]
    ) -> BoxOffsets:
        """``boxes``: [G, 4], xyxy relative to the image (0-1 of its width and height, which
        is the network input after a plain resize)."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        dx, dy = [], []
        for k, side in enumerate(feature_map_sizes):
            centres = spec.centres(k, side)
            dx.append(np.abs(cx[:, None] - centres[None, :]).min(axis=1))
            dy.append(np.abs(cy[:, None] - centres[None, :]).min(axis=1))
        return cls(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1], tuple(dx), tuple(dy))


def best_iou(
    boxes: np.ndarray | Tensor | BoxOffsets,
    spec: DefaultBoxSpec,
    feature_map_sizes: Sequence[int],
) -> np.ndarray:
    """Each box's highest IoU with any of ``make_default_boxes(spec, feature_map_sizes)``, as
    a float64 array [G], without making them.

    ``boxes``: [G, 4], xyxy relative to the image, or their ``BoxOffsets`` on this tiling.

    Intersection over union is the product of the overlaps along x and along y over a sum of
    areas, and each overlap only shrinks as the centres move apart. So among the boxes of one
    shape on a grid, the best is the one at the cell centre nearest the box's centre in x and
    in y: one candidate per shape and map, not one per default box (8,732 at SSD300).
    """
    if not isinstance(boxes, BoxOffsets):
        boxes = BoxOffsets.of(boxes, spec, feature_map_sizes)
    w, h = boxes.w[:, None], boxes.h[:, None]  # (G, 1)
    best = np.zeros(len(boxes.w))
    for k in range(len(feature_map_sizes)):
        shapes = np.asarray(spec.shapes(k))  # (A, 2)
        if spec.clip != "none":
            shapes = shapes.clip(0.0, 1.0)
        pw, ph = shapes[None, :, 0], shapes[None, :, 1]  # (1, A)
        # The overlap of intervals of lengths a and b whose centres are d apart:
        # min(a, b, (a + b) / 2 - d), or nothing.
        dx, dy = boxes.dx[k][:, None], boxes.dy[k][:, None]
        ix = np.minimum(np.minimum((w + pw) / 2 - dx, w), pw).clip(min=0)
        iy = np.minimum(np.minimum((h + ph) / 2 - dy, h), ph).clip(min=0)
        inter = ix * iy
        union = w * h + pw * ph - inter
        best = np.maximum(best, (inter / np.maximum(union, 1e-12)).max(axis=1))
    return best


def coverage(
    boxes: np.ndarray | Tensor | BoxOffsets,
    spec: DefaultBoxSpec,
    feature_map_sizes: Sequence[int],
    iou: float = COVER_IOU,
) -> float:
    """The share of ``boxes`` (xyxy, relative) that some default box overlaps at IoU >=
    ``iou``; 1.0 when there are no boxes. See ``best_iou``."""
    best = best_iou(boxes, spec, feature_map_sizes)
    return float((best >= iou).mean()) if len(best) else 1.0
