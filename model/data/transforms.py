"""SSD's training augmentation and the matching eval transform (SSD paper, sec. 2.2 and 3.6).

The steps and their defaults follow the authors' Caffe configuration (``ssd_pascal.py``:
``distort_param``, ``expand_param``, ``batch_sampler``, ``emit_constraint``) and run in the
order of their data layer: photometric distortion, zoom-out ("expand"), IoU-constrained crop
("batch sampler"), then horizontal flip and the resize to the network size. Before them,
``Shrink`` brings a photo larger than any crop can use (a phone's 12 megapixels) down to what
the smallest crop needs, so that no step works on, or zooms out, pixels the network never
sees.

Zoom-out and flip are torchvision's v2 ``RandomZoomOut`` and ``RandomHorizontalFlip``, which
do what the authors do. ``PhotometricDistort`` (here) and ``IoUCrop`` (``model.data.crop``)
are written in this project because the authors' behaviour differs from torchvision's on
purpose (their docstrings say how). The resize and mean subtraction are
``model.network.preprocessing.preprocess``, the very function inference uses, so training,
evaluation and the service see the same pixels.

Sample format, in and out of every step: ``(image, boxes, labels)`` with

* ``image``: uint8 Tensor[3, H, W], RGB, values 0..255;
* ``boxes``: float32 Tensor[G, 4], xyxy, absolute 0-based pixels of that image;
* ``labels``: int64 Tensor[G], one per box, kept aligned whenever boxes are dropped.

:class:`TrainTransform` and :class:`EvalTransform` end with :class:`Normalize`, which turns
that into ``(float32 Tensor[3, S, S] = pixels - PIXEL_MEAN, boxes xyxy relative 0..1, labels)``.

Randomness: every step draws from torch's global RNG, as torchvision's transforms do. A
transform called with ``seed`` runs under ``torch.random.fork_rng`` seeded with it, so a
sample's draws depend on that seed only (``model.data.loader`` derives it from the seed, the
epoch and the index with ``model.data.seeding``) and the caller's RNG is left as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from model.data.crop import CAFFE_MIN_IOUS, IoUCrop, Sample, crop_sample
from model.network.boxes import clip_and_sanitize
from model.network.preprocessing import PIXEL_MEAN, preprocess

__all__ = [
    "CAFFE_MIN_IOUS",
    "EvalTransform",
    "IoUCrop",
    "Normalize",
    "PhotometricDistort",
    "Step",
    "TrainTransform",
    "ZoomOut",
    "check_sample",
    "crop_sample",
]


class Step(Protocol):
    """One hand-written step: a sample in, a sample out (formats in the module docstring)."""

    def __call__(self, image: Tensor, boxes: Tensor, labels: Tensor) -> Sample: ...


# Caffe's ApplyDistort (im_transforms.cpp) hard-codes a fair coin for the contrast position.
_CONTRAST_FIRST_PROB = 0.5


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _happens(prob: float) -> bool:
    return torch.rand(()).item() < prob


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
    because it shuffles channels with p = 0.5 and scales brightness instead of shifting it.

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

    def __call__(self, image: Tensor, boxes: Tensor, labels: Tensor) -> Sample:
        """Distort the uint8 RGB image; boxes and labels are returned as they came."""
        contrast_first = _happens(_CONTRAST_FIRST_PROB)
        image = self._brightness(image)
        if contrast_first:
            image = self._contrast(image)
        image = self._saturation(image)
        image = self._hue(image)
        if not contrast_first:
            image = self._contrast(image)
        return image, boxes, labels

    def _brightness(self, image: Tensor) -> Tensor:
        if not _happens(self.brightness_prob):
            return image
        # Caffe's AdjustBrightness adds a delta (cv::Mat::convertTo(out, -1, 1, delta)).
        delta = _uniform(-self.brightness_delta, self.brightness_delta)
        return (image.float() + delta).round().clamp(0, 255).to(torch.uint8)

    def _contrast(self, image: Tensor) -> Tensor:
        if not _happens(self.contrast_prob):
            return image
        # Caffe's AdjustContrast is a plain gain (convertTo(out, -1, alpha, 0)); torchvision's
        # adjust_contrast would blend with the mean grey instead.
        alpha = _uniform(*self.contrast_range)
        return (image.float() * alpha).round().clamp(0, 255).to(torch.uint8)

    def _saturation(self, image: Tensor) -> Tensor:
        if not _happens(self.saturation_prob):
            return image
        # Caffe scales the HSV saturation channel; torchvision blends with the greyscale
        # image. Both scale colourfulness by the factor and leave grey pixels unchanged.
        factor = _uniform(*self.saturation_range)
        return _in_unit_float(image, lambda unit: TF.adjust_saturation(unit, factor))

    def _hue(self, image: Tensor) -> Tensor:
        if not _happens(self.hue_prob):
            return image
        # OpenCV 8-bit hue runs over 0..180 for a full turn; torchvision's factor is in turns.
        delta = _uniform(-self.hue_delta, self.hue_delta)
        return _in_unit_float(image, lambda unit: TF.adjust_hue(unit, delta / 180.0))


class ZoomOut(v2.RandomZoomOut):
    """torchvision's ``RandomZoomOut`` with the authors' ``expand_param`` as defaults.

    With probability ``prob`` the image is placed at a random spot of a canvas filled with
    the mean pixel, ``int(ratio * H)`` x ``int(ratio * W)`` for one ratio drawn from
    U[1, max_ratio] (paper sec. 3.6: up to 4), so the zoom never exceeds ``max_ratio``.
    Boxes move by the placement offset and keep their size. Unlike the authors' ExpandImage
    it does not skip ratios within 0.01 of 1, which changes the image by under a pixel.
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
        super().__init__(fill=list(fill), side_range=(1.0, max_ratio), p=prob)


class Shrink:
    """Downscale (bilinear, antialiased, aspect ratio kept) an image whose shorter side
    exceeds ``short_side`` pixels to that side, boxes with it; other images pass unchanged.

    ``TrainTransform`` sets ``short_side`` so that the smallest patch its crop can take still
    spans the network's size in both directions, so shrinking changes the cost and not what
    the network is shown: without it a 4000 x 3000 photo would be distorted at full size and
    zoomed out onto a canvas of up to 192 megapixels (576 MB) in every data-loader worker.
    """

    def __init__(self, short_side: int) -> None:
        if short_side < 1:
            raise ValueError(f"short_side must be a positive number of pixels, got {short_side}")
        self.short_side = short_side

    def __call__(self, image: Tensor, boxes: Tensor, labels: Tensor) -> Sample:
        height, width = image.shape[-2:]
        if min(height, width) <= self.short_side:
            return image, boxes, labels
        factor = self.short_side / min(height, width)
        size = [round(height * factor), round(width * factor)]
        image = TF.resize(image, size, antialias=True)
        scale = torch.tensor([size[1] / width, size[0] / height] * 2, dtype=torch.float32)
        return image, boxes * scale, labels


class Normalize:
    """The network input: ``preprocess``'s resize and mean subtraction; boxes made relative.

    The image goes through :func:`model.network.preprocessing.preprocess` (``size`` x ``size``,
    bilinear, antialiased, minus ``mean``; paper sec. 3: 300 or 512), the function inference
    uses. Boxes are divided by (W, H, W, H) of the input image, which is where a resize to
    any size would leave them in relative coordinates.
    """

    def __init__(self, size: int, mean: tuple[float, float, float] = PIXEL_MEAN) -> None:
        if size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        self.size = size
        self.mean = mean

    def __call__(self, image: Tensor, boxes: Tensor, labels: Tensor) -> Sample:
        """Returns float32 image Tensor[3, size, size] and xyxy boxes relative 0..1."""
        height, width = image.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        # [image] -> (1, 3, size, size) -> (3, size, size)
        return preprocess([image], self.size, self.mean)[0], boxes / scale, labels


class _Pipeline:
    """Checks and clips the input, then runs its steps in order, seeded when asked."""

    def __init__(self, steps: list[Step | v2.Transform]) -> None:
        self.steps = steps

    def __call__(
        self, image: Tensor, boxes: Tensor, labels: Tensor, seed: int | None = None
    ) -> Sample:
        """uint8 RGB image, xyxy pixel boxes, labels -> network-ready sample (module doc).

        ``seed`` (an integer in [0, 2**64)) fixes every random draw of this call and leaves
        torch's global RNG as it was; None draws from the global RNG as it stands.
        """
        check_sample(image, boxes, labels)
        boxes, keep = clip_and_sanitize(boxes, (image.shape[-2], image.shape[-1]))
        labels = labels[keep]
        if seed is None:
            return self._run(image, boxes, labels)
        with torch.random.fork_rng(devices=[]):  # the CPU RNG only: no step draws on a GPU
            torch.manual_seed(seed)
            return self._run(image, boxes, labels)

    def _run(self, image: Tensor, boxes: Tensor, labels: Tensor) -> Sample:
        for step in self.steps:
            if isinstance(step, v2.Transform):
                # torchvision finds the image and the boxes by their tv_tensors types.
                out = step(tv_tensors.Image(image), _wrap_boxes(boxes, image), labels)
                image, boxes, labels = (_plain(t) for t in out)
            else:
                image, boxes, labels = step(image, boxes, labels)
        return image, boxes, labels


class TrainTransform(_Pipeline):
    """The full SSD training augmentation, ending in the network's input format.

    Output: float32 image Tensor[3, size, size] (pixels - mean), float32 boxes Tensor[G', 4]
    xyxy relative 0..1, int64 labels Tensor[G']. Boxes outside the input image are clipped to
    it first. Each step is disabled through its own arguments (a probability of 0, or
    ``IoUCrop(min_ious=())``); None means the paper's default step. The default flip is
    torchvision's ``RandomHorizontalFlip`` with the paper's probability (sec. 2.2: 0.5).
    """

    def __init__(
        self,
        size: int = 300,
        distort: PhotometricDistort | None = None,
        zoom_out: ZoomOut | None = None,
        crop: IoUCrop | None = None,
        flip: v2.RandomHorizontalFlip | None = None,
        mean: tuple[float, float, float] = PIXEL_MEAN,
    ) -> None:
        crop = crop or IoUCrop()
        super().__init__(
            [
                Shrink(math.ceil(size / crop.smallest_side)),
                distort or PhotometricDistort(),
                zoom_out or ZoomOut(fill=mean),
                crop,
                flip or v2.RandomHorizontalFlip(p=0.5),
                Normalize(size, mean),
            ]
        )


class EvalTransform(_Pipeline):
    """``preprocess`` (resize and mean subtraction) with boxes made relative; same output.

    No randomness; ``seed`` is accepted and has no effect. Boxes outside the input image are
    clipped to it, and dropped if nothing is left.
    """

    def __init__(self, size: int = 300, mean: tuple[float, float, float] = PIXEL_MEAN) -> None:
        super().__init__([Normalize(size, mean)])
