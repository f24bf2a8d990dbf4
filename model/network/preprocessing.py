"""Images in, network input out: colour-mode handling, resizing and SSD's normalisation.

The authors' Caffe models take BGR pixel values 0-255 minus the ImageNet mean (104, 117, 123),
with no scaling. Images here are RGB, so the mean is (123, 117, 104). The image is resized to
the network size ignoring its aspect ratio, as the paper does (sec. 3): antialiased, on the
uint8 pixels, for networks trained here; or, for weights trained elsewhere
(``model.weights.published``), as their training resized: ``"bilinear"``, without antialiasing, on
float pixels, as torchvision's detection transform (``F.interpolate``) and ssd.pytorch's
``cv2.resize`` do. A checkpoint names its resize in ``normalization["resize"]``.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from model.network.pixels import BACKGROUND, PIXEL_MEAN, RESIZES, pil_to_rgb

__all__ = ["PIXEL_MEAN", "RESIZES", "ImageLike", "preprocess", "to_rgb_tensor"]

ImageLike = Image.Image | Tensor


def to_rgb_tensor(image: ImageLike) -> Tensor:
    """Any PIL image or uint8 Tensor[C, H, W] (C in 1, 3, 4) as a uint8 RGB Tensor[3, H, W].

    Greyscale is replicated, alpha is composited on white, CMYK and palette images are
    converted by Pillow, and 16/32-bit greyscale is scaled down to 8 bits (Pillow's own
    conversion would clip it instead).
    """
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(pil_to_rgb(image))
    if not isinstance(image, Tensor):
        raise TypeError(f"expected a PIL image or a uint8 Tensor[C, H, W], got {type(image)}")
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(
            "expected a uint8 Tensor[C, H, W] with C in (1, 3, 4), "
            f"got dtype {image.dtype} and shape {tuple(image.shape)}"
        )
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"image has no pixels: shape {tuple(image.shape)}")
    if image.shape[0] == 1:
        return image.expand(3, -1, -1).contiguous()
    if image.shape[0] == 4:
        rgb, alpha = image[:3].float(), image[3:].float() / 255.0
        background = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None]
        return (rgb * alpha + background * (1.0 - alpha)).round().to(torch.uint8)
    return image


def preprocess(
    images: list[Tensor],
    size: int,
    mean: tuple[float, ...] = PIXEL_MEAN,
    resize: str = "antialias",
) -> Tensor:
    """uint8 RGB Tensors[3, H, W] to the network input: float32 Tensor[N, 3, size, size].

    Each image is resized to ``size`` x ``size`` (bilinear; ``resize`` as in the module
    docstring), and ``mean`` (RGB) is subtracted from the 0-255 values. The work runs where
    the images are (CPU or GPU; all on one device).
    """
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images[0].device)[:, None, None]
    antialias = resize == "antialias"
    resized = [
        TF.resize(
            img if antialias else img.float(),
            [size, size],
            interpolation=TF.InterpolationMode.BILINEAR,
            antialias=antialias,
        )
        for img in images
    ]
    return torch.stack(resized).float() - mean_t
