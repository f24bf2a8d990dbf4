"""The authors' IoU-constrained random crop, the step of SSD's augmentation that makes the
network see objects at many scales (SSD paper, sec. 2.2 "Data augmentation"; ``ssd_pascal.py``
``batch_sampler`` and ``emit_constraint``). ``model.data.transforms`` puts it in the pipeline.

Sample format as in ``model.data.transforms``: uint8 image Tensor[3, H, W], float32 boxes
Tensor[G, 4] xyxy in absolute pixels, int64 labels Tensor[G].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from model.network.boxes import box_iou, clip_and_sanitize

Sample = tuple[Tensor, Tensor, Tensor]  # (image, boxes, labels)

# The authors' batch_sampler (ssd_pascal.py): after the always-available whole image, one
# sampler per min_jaccard_overlap, then one with no overlap requirement (written here as 0.0).
CAFFE_MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9, 0.0)


class IoUCrop:
    """The authors' IoU-constrained random crop (``batch_sampler`` + ``emit_constraint``).

    Candidates, one per option as in their ``GenerateBatchSamples``: the whole image (always),
    and for each ``min_iou`` the first of ``trials`` random patches that has IoU >= min_iou
    with at least one ground-truth box (``min_jaccard_overlap``). ``min_iou == 0`` accepts any
    patch, also on images without boxes. One candidate is then chosen uniformly, so the whole
    image is kept when no patch qualifies. A patch covers ``scale**2`` of the image area, for
    ``scale`` in ``scale_range``, with aspect ratio (relative to the image's, since Caffe works
    in normalised coordinates) in ``aspect_range`` clamped to [scale**2, 1/scale**2] so that it
    fits. Patches are whole pixels, and the IoU is tested on the very patch that is cut out.

    After the crop, a box is kept only if its centre lies in the patch (``emit_type: CENTER``);
    kept boxes are clipped to the patch and dropped if left with no area.

    torchvision's ``RandomIoUCrop`` does test the IoU (ssd.pytorch's ``overlap.min() < min_iou
    and max_iou < overlap.max()`` never rejects anything), but is not used here: it draws width
    and height scales separately (not Caffe's scale + aspect ratio), only counts boxes whose
    centre is in the patch, so even its 0.0 option needs one and images without boxes are
    never cropped, redraws options until one succeeds instead of choosing among the options
    that did.
    """

    def __init__(
        self,
        min_ious: tuple[float, ...] = CAFFE_MIN_IOUS,
        trials: int = 50,
        scale_range: tuple[float, float] = (0.3, 1.0),
        aspect_range: tuple[float, float] = (0.5, 2.0),
    ) -> None:
        """Defaults are ssd_pascal.py's: max_trials 50, scale 0.3-1, aspect ratio 0.5-2."""
        if any(not 0.0 <= v <= 1.0 for v in min_ious):
            raise ValueError(f"min_ious must lie in [0, 1], got {min_ious}")
        if trials < 1:
            raise ValueError(f"trials must be >= 1, got {trials}")
        if not 0.0 < scale_range[0] <= scale_range[1] <= 1.0:
            raise ValueError(
                f"scale_range must be (lo, hi) with 0 < lo <= hi <= 1, got {scale_range}"
            )
        if not 0.0 < aspect_range[0] <= aspect_range[1]:
            raise ValueError(f"aspect_range must be (lo, hi) with 0 < lo <= hi, got {aspect_range}")
        self.min_ious = tuple(min_ious)
        self.trials = trials
        self.scale_range = scale_range
        self.aspect_range = aspect_range

    @property
    def smallest_side(self) -> float:
        """The shortest side a patch can have, as a fraction of the image's side: a patch of
        ``scale`` with aspect ``a`` is ``scale * sqrt(a)`` wide and ``scale / sqrt(a)`` high,
        ``a`` clamped as ``_random_patches`` does, least at the smallest scale."""
        scale = self.scale_range[0]
        widest = min(self.aspect_range[1], 1.0 / scale**2)
        narrowest = max(self.aspect_range[0], scale**2)
        return min(scale * math.sqrt(narrowest), scale / math.sqrt(widest))

    def __call__(self, image: Tensor, boxes: Tensor, labels: Tensor) -> Sample:
        """Crop; boxes come back in absolute pixels of the patch."""
        crop_box, _ = self.sample(boxes, (image.shape[-2], image.shape[-1]))
        return crop_sample(image, boxes, labels, crop_box)

    def sample(
        self,
        boxes: Tensor,
        image_size: tuple[int, int],
    ) -> tuple[Tensor, float | None]:
        """Choose a patch for xyxy pixel ``boxes`` in an image of ``(height, width)``.

        Returns:
            ``(crop_box, min_iou)``: float32 Tensor[4], xyxy whole pixels inside the image, and
            the IoU constraint that patch met, or None when it is the whole image.
        """
        height, width = image_size
        candidates: list[tuple[Tensor, float | None]] = [
            (torch.tensor([0.0, 0.0, width, height]), None)
        ]
        for min_iou in self.min_ious:
            # All trials are drawn at once, so each option uses the same number of draws.
            patches = self._random_patches(height, width)
            if min_iou > 0.0:
                # (T, 4) x (G, 4) -> (T, G)
                meets = (box_iou(patches, boxes) >= min_iou).any(dim=1)
            else:
                meets = torch.ones(self.trials, dtype=torch.bool)
            hits = meets.nonzero()
            if hits.numel() > 0:
                candidates.append((patches[hits[0, 0]], min_iou))
        choice = int(torch.randint(len(candidates), ()))
        return candidates[choice]

    def _random_patches(self, height: int, width: int) -> Tensor:
        """``trials`` random patches, float32 Tensor[T, 4], xyxy whole pixels in the image."""
        scale_lo, scale_hi = self.scale_range
        aspect_lo, aspect_hi = self.aspect_range
        draws = torch.rand(4, self.trials)
        scale = scale_lo + (scale_hi - scale_lo) * draws[0]
        aspect = aspect_lo + (aspect_hi - aspect_lo) * draws[1]
        # Caffe's SampleBBox: keep the patch inside the image whatever the scale.
        aspect = torch.minimum(torch.maximum(aspect, scale**2), 1.0 / scale**2)
        patch_w = (scale * aspect.sqrt() * width).round().clamp(1, width)
        patch_h = (scale / aspect.sqrt() * height).round().clamp(1, height)
        left = (draws[2] * (width - patch_w + 1)).floor().clamp(max=width - patch_w)
        top = (draws[3] * (height - patch_h + 1)).floor().clamp(max=height - patch_h)
        return torch.stack([left, top, left + patch_w, top + patch_h], dim=1)


def crop_sample(image: Tensor, boxes: Tensor, labels: Tensor, crop_box: Tensor) -> Sample:
    """Cut ``crop_box`` (xyxy whole pixels) out of the sample.

    Keeps the boxes whose centre lies in the crop (edges included, as Caffe's
    ``MeetEmitConstraint``), clips them to it and drops those left with no area.
    Returned boxes are xyxy pixels of the cropped image.
    """
    left, top, right, bottom = (int(v) for v in crop_box.round().tolist())
    if not 0 <= left < right <= image.shape[-1] or not 0 <= top < bottom <= image.shape[-2]:
        raise ValueError(
            f"crop_box {crop_box.tolist()} is not a non-empty patch of an image of size "
            f"{tuple(image.shape[-2:])}"
        )
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    inside = (
        (centres[:, 0] >= left)
        & (centres[:, 0] <= right)
        & (centres[:, 1] >= top)
        & (centres[:, 1] <= bottom)
    )
    height, width = bottom - top, right - left
    out_image = TF.crop(image, top, left, height, width)
    shifted = boxes[inside] - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    out_boxes, keep = clip_and_sanitize(shifted, (height, width))
    return out_image, out_boxes, labels[inside][keep]
