"""SSD's training augmentation and the matching eval transform (SSD paper, sec. 2.2 and 3.6).

The steps and their defaults follow the authors' Caffe configuration (``ssd_pascal.py``:
``distort_param``, ``expand_param``, ``batch_sampler``, ``emit_constraint``) and run in the
order of their data layer: photometric distortion, zoom-out ("expand"), IoU-constrained crop
("batch sampler"), then horizontal flip and the resize to the network size.

Sample format, in and out of every step: ``(image, boxes, labels)`` with

* ``image``: uint8 Tensor[3, H, W], RGB, values 0..255;
* ``boxes``: float32 Tensor[G, 4], xyxy, absolute 0-based pixels of that image;
* ``labels``: int64 Tensor[G], one per box, kept aligned whenever boxes are dropped.

:class:`TrainTransform` and :class:`EvalTransform` end with :class:`Normalise`, which turns
that into ``(float32 Tensor[3, S, S] = pixels - PIXEL_MEAN, boxes xyxy relative 0..1, labels)``.

Randomness: every step takes an optional ``torch.Generator``; ``None`` uses torch's global
RNG, which a ``DataLoader`` seeds differently in each worker. A generator stored on a
transform would be copied into every worker and repeat the same draws there, so generators
are passed per call instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from model.boxes import box_iou, clip_and_sanitize
from model.preprocessing import PIXEL_MEAN

__all__ = [
    "CAFFE_MIN_IOUS",
    "EvalTransform",
    "HorizontalFlip",
    "IoUCrop",
    "Normalise",
    "PhotometricDistort",
    "Resize",
    "Step",
    "TrainTransform",
    "ZoomOut",
    "check_sample",
    "crop_sample",
]

Sample = tuple[Tensor, Tensor, Tensor]


class Step(Protocol):
    """One augmentation step: a sample in, a sample out (formats in the module docstring)."""

    def __call__(
        self, image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Sample: ...


# The authors' batch_sampler (ssd_pascal.py): after the always-available whole image, one
# sampler per min_jaccard_overlap, then one with no overlap requirement (written here as 0.0).
CAFFE_MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9, 0.0)
# Caffe's ApplyDistort (im_transforms.cpp) hard-codes a fair coin for the contrast position.
_CONTRAST_FIRST_PROB = 0.5
# Caffe's ExpandImage skips ratios this close to 1.
_MIN_EXPAND = 1e-2


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _happens(prob: float, generator: torch.Generator | None) -> bool:
    return torch.rand((), generator=generator).item() < prob


def _check_prob(name: str, prob: float) -> None:
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {prob}")


def _check_range(name: str, value: tuple[float, float], low: float) -> None:
    if not low <= value[0] <= value[1]:
        raise ValueError(f"{name} must be (lo, hi) with {low} <= lo <= hi, got {value}")


def check_sample(image: Tensor, boxes: Tensor, labels: Tensor) -> None:
    """Raise ValueError unless the sample matches the module's input format (see above)."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"expected a uint8 image Tensor[3, H, W], got {image.dtype} {tuple(image.shape)}"
        )
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"image has no pixels: shape {tuple(image.shape)}")
    if boxes.dtype != torch.float32 or boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"expected float32 boxes Tensor[G, 4], got {boxes.dtype} {tuple(boxes.shape)}"
        )
    if labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
        raise ValueError(
            f"expected int64 labels Tensor[{boxes.shape[0]}], "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )


def _wrap_boxes(boxes: Tensor, image: Tensor) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(
        boxes, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=tuple(image.shape[-2:])
    )


def _plain(tensor: Tensor) -> Tensor:
    return tensor.as_subclass(Tensor)


def _in_unit_float(image: Tensor, change: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``change`` to a uint8 image as float 0..1, then round back to uint8.

    torchvision's uint8 kernels truncate: a grey 128 would come out of any saturation
    change as 127.
    """
    return (change(image.float() / 255.0) * 255.0).round().clamp(0, 255).to(torch.uint8)


class PhotometricDistort:
    """Random brightness, contrast, saturation and hue, as the authors' ``DistortImage``.

    Defaults are their ``distort_param``. Each change happens with its own probability; a
    fair coin flip (hard-coded in their ``ApplyDistort``) puts contrast either right after
    brightness or last. Their ``random_order_prob`` (channel shuffle) is 0.0 in
    ``ssd_pascal.py``, so it is left out; torchvision's ``RandomPhotometricDistort`` is not used
    because it shuffles channels with p = 0.5, scales brightness instead of shifting it and
    only draws from the global RNG.

    Boxes and labels pass through unchanged; the image stays uint8 and is rounded and
    saturated to 0..255 after every change, as OpenCV does on 8-bit images.
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        brightness_prob: float = 0.5,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        contrast_prob: float = 0.5,
        saturation_range: tuple[float, float] = (0.5, 1.5),
        saturation_prob: float = 0.5,
        hue_delta: float = 18.0,
        hue_prob: float = 0.5,
    ) -> None:
        """Deltas are in 0..255 pixel units (brightness) and OpenCV 8-bit hue units (hue).

        OpenCV stores an 8-bit hue as degrees / 2 (0..180), so the default ``hue_delta`` of
        18 is +-36 degrees, a tenth of the colour circle.
        """
        if not 0.0 <= brightness_delta <= 255.0:
            raise ValueError(f"brightness_delta must be in [0, 255], got {brightness_delta}")
        if not 0.0 <= hue_delta <= 90.0:
            raise ValueError(f"hue_delta must be in [0, 90], got {hue_delta}")
        _check_range("contrast_range", contrast_range, 0.0)
        _check_range("saturation_range", saturation_range, 0.0)
        _check_prob("brightness_prob", brightness_prob)
        _check_prob("contrast_prob", contrast_prob)
        _check_prob("saturation_prob", saturation_prob)
        _check_prob("hue_prob", hue_prob)
        self.brightness_delta = brightness_delta
        self.brightness_prob = brightness_prob
        self.contrast_range = contrast_range
        self.contrast_prob = contrast_prob
        self.saturation_range = saturation_range
        self.saturation_prob = saturation_prob
        self.hue_delta = hue_delta
        self.hue_prob = hue_prob

    def __call__(
        self, image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Sample:
        """Distort the uint8 RGB image; boxes and labels are returned as they came."""
        contrast_first = _happens(_CONTRAST_FIRST_PROB, generator)
        image = self._brightness(image, generator)
        if contrast_first:
            image = self._contrast(image, generator)
        image = self._saturation(image, generator)
        image = self._hue(image, generator)
        if not contrast_first:
            image = self._contrast(image, generator)
        return image, boxes, labels

    def _brightness(self, image: Tensor, generator: torch.Generator | None) -> Tensor:
        if not _happens(self.brightness_prob, generator):
            return image
        # Caffe's AdjustBrightness adds a delta (cv::Mat::convertTo(out, -1, 1, delta)).
        delta = _uniform(-self.brightness_delta, self.brightness_delta, generator)
        return (image.float() + delta).round().clamp(0, 255).to(torch.uint8)

    def _contrast(self, image: Tensor, generator: torch.Generator | None) -> Tensor:
        if not _happens(self.contrast_prob, generator):
            return image
        # Caffe's AdjustContrast is a plain gain (convertTo(out, -1, alpha, 0)); torchvision's
        # adjust_contrast would blend with the mean grey instead.
        alpha = _uniform(*self.contrast_range, generator)
        return (image.float() * alpha).round().clamp(0, 255).to(torch.uint8)

    def _saturation(self, image: Tensor, generator: torch.Generator | None) -> Tensor:
        if not _happens(self.saturation_prob, generator):
            return image
        # Caffe scales the HSV saturation channel; torchvision blends with the greyscale
        # image. Both scale colourfulness by the factor and leave grey pixels unchanged.
        factor = _uniform(*self.saturation_range, generator)
        return _in_unit_float(image, lambda unit: TF.adjust_saturation(unit, factor))

    def _hue(self, image: Tensor, generator: torch.Generator | None) -> Tensor:
        if not _happens(self.hue_prob, generator):
            return image
        # OpenCV 8-bit hue runs over 0..180 for a full turn; torchvision's factor is in turns.
        delta = _uniform(-self.hue_delta, self.hue_delta, generator)
        return _in_unit_float(image, lambda unit: TF.adjust_hue(unit, delta / 180.0))


class ZoomOut:
    """Place the image at a random spot of a larger canvas filled with the mean pixel.

    The authors' ``ExpandImage`` (``expand_param``): with probability ``prob`` the canvas is
    ``int(ratio * H)`` x ``int(ratio * W)`` for one ratio drawn from U[1, max_ratio], so the
    zoom never exceeds ``max_ratio``. Like theirs, a ratio within 0.01 of 1 leaves the image as
    it is. Boxes move by the placement offset and keep their size. torchvision's
    ``RandomZoomOut`` does the same with the global RNG only, so its kernel (``pad``) is used
    with parameters drawn here.
    """

    def __init__(
        self,
        max_ratio: float = 4.0,
        prob: float = 0.5,
        fill: tuple[float, float, float] = PIXEL_MEAN,
    ) -> None:
        """``fill`` is the RGB canvas colour in 0..255 (the authors use their mean pixel)."""
        if max_ratio < 1.0:
            raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
        _check_prob("prob", prob)
        self.max_ratio = max_ratio
        self.prob = prob
        self.fill = fill

    def __call__(
        self, image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Sample:
        """Zoom out; boxes stay in absolute pixels of the (larger) output image."""
        if not _happens(self.prob, generator):
            return image, boxes, labels
        ratio = _uniform(1.0, self.max_ratio, generator)
        if abs(ratio - 1.0) < _MIN_EXPAND:
            return image, boxes, labels
        height, width = image.shape[-2:]
        canvas_h, canvas_w = int(height * ratio), int(width * ratio)
        top = int(torch.randint(canvas_h - height + 1, (), generator=generator))
        left = int(torch.randint(canvas_w - width + 1, (), generator=generator))
        padding = [left, top, canvas_w - width - left, canvas_h - height - top]
        out_image = TF.pad(tv_tensors.Image(image), padding, fill=list(self.fill))
        out_boxes = TF.pad(_wrap_boxes(boxes, image), padding)
        return _plain(out_image), _plain(out_boxes), labels


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
    that did, and uses only the global RNG.
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

    def __call__(
        self, image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Sample:
        """Crop; boxes come back in absolute pixels of the patch."""
        crop_box, _ = self.sample(boxes, (image.shape[-2], image.shape[-1]), generator)
        return crop_sample(image, boxes, labels, crop_box)

    def sample(
        self,
        boxes: Tensor,
        image_size: tuple[int, int],
        generator: torch.Generator | None = None,
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
            patches = self._random_patches(height, width, generator)
            if min_iou > 0.0:
                # (T, 4) x (G, 4) -> (T, G)
                meets = (box_iou(patches, boxes) >= min_iou).any(dim=1)
            else:
                meets = torch.ones(self.trials, dtype=torch.bool)
            hits = meets.nonzero()
            if hits.numel() > 0:
                candidates.append((patches[hits[0, 0]], min_iou))
        choice = int(torch.randint(len(candidates), (), generator=generator))
        return candidates[choice]

    def _random_patches(self, height: int, width: int, generator: torch.Generator | None) -> Tensor:
        """``trials`` random patches, float32 Tensor[T, 4], xyxy whole pixels in the image."""
        scale_lo, scale_hi = self.scale_range
        aspect_lo, aspect_hi = self.aspect_range
        draws = torch.rand(4, self.trials, generator=generator)
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


class HorizontalFlip:
    """Mirror image and boxes left-right with probability ``prob`` (paper sec. 2.2: 0.5)."""

    def __init__(self, prob: float = 0.5) -> None:
        _check_prob("prob", prob)
        self.prob = prob

    def __call__(
        self, image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Sample:
        """Flip; an xyxy pixel box (x0, y0, x1, y1) becomes (W - x1, y0, W - x0, y1)."""
        if not _happens(self.prob, generator):
            return image, boxes, labels
        out_boxes = TF.horizontal_flip(_wrap_boxes(boxes, image))
        return TF.horizontal_flip(image), _plain(out_boxes), labels


class Resize:
    """Resize to ``size`` x ``size`` ignoring the aspect ratio (paper sec. 3: 300 or 512).

    Bilinear with antialiasing, as :func:`model.preprocessing.preprocess`, so training, eval
    and inference see the same pixels. Boxes are scaled by (size / W, size / H).
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        self.size = size

    def __call__(
        self, image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Sample:
        """Resize; boxes stay in absolute pixels, now of the size x size image."""
        size = [self.size, self.size]
        mode = TF.InterpolationMode.BILINEAR
        out_boxes = TF.resize(_wrap_boxes(boxes, image), size)
        out_image = TF.resize(image, size, interpolation=mode, antialias=True)
        return out_image, _plain(out_boxes), labels


class Normalise:
    """uint8 image to float32 ``pixels - mean`` (no scaling); pixel boxes to relative 0..1.

    The authors' mean subtraction (``mean_value``), as :func:`model.preprocessing.preprocess`.
    """

    def __init__(self, mean: tuple[float, float, float] = PIXEL_MEAN) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]

    def __call__(
        self, image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Sample:
        """Returns float32 image Tensor[3, H, W] and xyxy boxes relative to (W, H)."""
        height, width = image.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        return image.float() - self.mean, boxes / scale, labels


class _Pipeline:
    """Checks and clips the input, then runs its steps in order."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps

    def __call__(
        self, image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Sample:
        """uint8 RGB image, xyxy pixel boxes, labels -> network-ready sample (module doc)."""
        check_sample(image, boxes, labels)
        boxes, keep = clip_and_sanitize(boxes, (image.shape[-2], image.shape[-1]))
        labels = labels[keep]
        for step in self.steps:
            image, boxes, labels = step(image, boxes, labels, generator)
        return image, boxes, labels


class TrainTransform(_Pipeline):
    """The full SSD training augmentation, ending in the network's input format.

    Output: float32 image Tensor[3, size, size] (pixels - mean), float32 boxes Tensor[G', 4]
    xyxy relative 0..1, int64 labels Tensor[G']. Boxes outside the input image are clipped to
    it first. Each step is disabled through its own arguments (a probability of 0, or
    ``IoUCrop(min_ious=())``); None means the paper's default step.
    """

    def __init__(
        self,
        size: int = 300,
        distort: PhotometricDistort | None = None,
        zoom_out: ZoomOut | None = None,
        crop: IoUCrop | None = None,
        flip: HorizontalFlip | None = None,
        mean: tuple[float, float, float] = PIXEL_MEAN,
    ) -> None:
        super().__init__(
            [
                distort or PhotometricDistort(),
                zoom_out or ZoomOut(fill=mean),
                crop or IoUCrop(),
                flip or HorizontalFlip(),
                Resize(size),
                Normalise(mean),
            ]
        )


class EvalTransform(_Pipeline):
    """Resize to ``size`` x ``size`` and normalise, with no randomness; same output format.

    Boxes outside the input image are clipped to it, and dropped if nothing is left.
    """

    def __init__(self, size: int = 300, mean: tuple[float, float, float] = PIXEL_MEAN) -> None:
        super().__init__([Resize(size), Normalise(mean)])
