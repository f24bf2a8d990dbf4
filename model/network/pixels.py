"""Images to network input without torch: the colour-mode handling that both backends share,
and the resize and normalisation that the ONNX Runtime backend (``OnnxDetector``) runs.

``model.network.preprocessing`` holds the torch path (torchvision's resize, on CPU or GPU
tensors, used in training, evaluation and the torch ``Detector``) and takes its constants and
its colour conversion from here. The two resizes compute the same filter:

* ``"antialias"`` (networks trained here): Pillow's bilinear resize on uint8 pixels, which
  widens the filter when shrinking, as torchvision's antialiased uint8 resize does (its CPU
  kernel is a port of Pillow-SIMD's). Their integer arithmetic differs (torchvision's AVX2
  kernel rounds the filter weights to at most 15 bits, Pillow to 22), so a pixel may differ
  by 1 or 2 levels of 255: on coco128 photos about 2% of pixels differ, by 1
  (tests/model/network/test_pixels.py bounds it).
* ``"bilinear"`` (published weights): bilinear without antialiasing on float pixels, the
  formula of torch's ``F.interpolate(mode="bilinear", align_corners=False)`` in float32,
  equal to it up to float rounding.

The mean is subtracted from the 0-255 values in float32, as in the torch path.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# The authors' mean_value in RGB order (ssd_pascal.py: [104, 117, 123] for BGR). No std.
PIXEL_MEAN = (123.0, 117.0, 104.0)
# Transparent pixels are shown on white, as a browser or image viewer would show them.
BACKGROUND = (255, 255, 255)
RESIZES = ("antialias", "bilinear")  # see model.network.preprocessing's docstring


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as an RGB one: greyscale replicated, alpha composited on white, CMYK and
    palette images converted by Pillow, 16/32-bit greyscale scaled down to 8 bits (Pillow's
    own conversion would clip it instead).

    Raises:
        ValueError: the image has no pixels (names its size).
    """
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image has no pixels: size {image.size}")
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        # I;16 is 16-bit by definition; Pillow also opens 16-bit greyscale PNGs as "I", so an
        # "I" image with values above 8 bits is taken as 16-bit. "F" is read as 0..255.
        sixteen_bit = image.mode.startswith("I;16") or (
            image.mode == "I" and pixels.max(initial=0) > 255
        )
        full_scale = 65535.0 if sixteen_bit else 255.0
        grey = np.clip(pixels / full_scale * 255.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(grey)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def prepare_image(
    image: Image.Image,
    size: int,
    mean: tuple[float, ...] = PIXEL_MEAN,
    resize: str = "antialias",
) -> tuple[np.ndarray, tuple[int, int]]:
    """One PIL image (any mode) to the network input: float32 array [3, size, size], RGB
    0-255 resized to ``size`` x ``size`` (``resize`` as in the module docstring) minus
    ``mean``; and the image's (width, height) in pixels.

    Raises:
        ValueError: an unknown ``resize``, or an image with no pixels.
    """
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
    rgb = pil_to_rgb(image)
    if resize == "antialias":
        resized = np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR), np.float32)
    else:
        resized = _bilinear(np.asarray(rgb), size)
    # (S, S, 3) -> (3, S, S)
    chw = resized.transpose(2, 0, 1) - np.asarray(mean, np.float32)[:, None, None]
    return np.ascontiguousarray(chw, dtype=np.float32), rgb.size


def _bilinear(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] to float32 [size, size, 3], bilinear without antialiasing, as torch's
    CPU kernel computes it: horizontal blend inside, vertical outside, in float32."""
    x0, x1, wx = _taps(pixels.shape[1], size)
    y0, y1, wy = _taps(pixels.shape[0], size)

    # Weights per value of a row of (S, 3) pixels flattened to S*3, so numpy's inner loops
    # run over contiguous memory.
    right_w = np.repeat(wx, 3)[None, :]
    left_w = np.repeat(1 - wx, 3)[None, :]

    def across(rows: np.ndarray) -> np.ndarray:  # (S, W, 3) uint8 -> (S, S*3) float32
        left = rows[:, x0].reshape(size, -1).astype(np.float32)
        right = rows[:, x1].reshape(size, -1).astype(np.float32)
        return left * left_w + right * right_w

    # Only the rows that are read: (H, W, 3) -> (S, W, 3) twice.
    out = across(pixels[y0]) * (1 - wy)[:, None] + across(pixels[y1]) * wy[:, None]
    return out.reshape(size, size, 3)


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``n_out`` output pixels: the two source pixels and the second one's weight
    (float32), by torch's half-pixel rule (``area_pixel_compute_source_index``): source
    ``scale * (i + 0.5) - 0.5``, clamped at 0, with ``scale = n_in / n_out`` in float32."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + 0.5) - 0.5, 0)
    src = src.astype(np.float32)
    first = src.astype(np.int64)  # floor, src >= 0
    second = np.minimum(first + 1, n_in - 1)
    return first, second, (src - first).astype(np.float32)
