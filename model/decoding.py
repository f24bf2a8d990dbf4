"""Encoded image bytes to RGB pixels on the network's device, for ``Detector.prepare_encoded``.

JPEGs in RGB or greyscale are decoded as one batch by torchvision's ``decode_jpeg``: on a GPU
with nvJPEG (one call for the list is what its documentation recommends), on the CPU with
libjpeg-turbo. Anything else (PNG, WebP, BMP, CMYK JPEGs, a JPEG the batch decoder refuses)
goes through Pillow. Either way the EXIF orientation is then applied by ``orient``, so the
pixels are in the frame a viewer displays, as ``app.intake.decode`` gives them.

No size or bomb check is made here: callers that take bytes from strangers check them first
(the service's ``app.intake.open_image``).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import ExifTags, Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from model.preprocessing import to_rgb_tensor

log = logging.getLogger("model.decoding")

# Pillow modes of the JPEGs decode_jpeg converts to RGB as Pillow does: YCbCr colour and
# greyscale. CMYK/YCCK JPEGs (Adobe's inverted ink values) are left to Pillow.
_DECODER_MODES = ("RGB", "L")


@dataclass(frozen=True)
class Header:
    """What an image's header says before any pixel is decoded: whether the batched JPEG
    decoder takes it, and its EXIF orientation (1 to 8, CIPA DC-008 tag 0x0112; 1 upright)."""

    batch_decodable: bool
    orientation: int


def read_header(data: bytes) -> Header | None:
    """The ``Header`` of ``data`` (Pillow reads the header only), or None if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            decodable = image.format == "JPEG" and image.mode in _DECODER_MODES
    except Exception:  # Pillow raises many exception types for malformed headers
        return None
    return Header(decodable, orientation if orientation in range(1, 9) else 1)


def orient(image: Tensor, orientation: int) -> Tensor:
    """Turn ``image`` Tensor[C, H, W] stored with EXIF ``orientation`` (1 to 8) into the frame
    a viewer displays, as Pillow's ``ImageOps.exif_transpose`` does."""
    rows, cols = -2, -1
    if orientation == 2:  # mirrored left-right
        return image.flip(cols)
    if orientation == 3:  # turned 180 degrees
        return image.flip(rows, cols)
    if orientation == 4:  # mirrored top-bottom
        return image.flip(rows)
    if orientation == 5:  # transposed: (C, H, W) -> (C, W, H)
        return image.transpose(rows, cols)
    if orientation == 6:  # stored turned 90 degrees anticlockwise: turn it clockwise
        return image.rot90(-1, (rows, cols))
    if orientation == 7:  # transversed: transposed, then turned 180 degrees
        return image.transpose(rows, cols).flip(rows, cols)
    if orientation == 8:  # stored turned 90 degrees clockwise: turn it anticlockwise
        return image.rot90(1, (rows, cols))
    return image


def decode_images(encoded: Sequence[bytes], device: torch.device) -> list[Tensor]:
    """Each of ``encoded`` as a uint8 RGB Tensor[3, H, W] on ``device``, EXIF orientation
    applied; the JPEGs decoded together (see the module's docstring).

    Raises:
        ValueError: an image neither decoder can read; the message names its index.
    """
    headers = [read_header(data) for data in encoded]
    batch = [i for i, header in enumerate(headers) if header and header.batch_decodable]
    decoded: dict[int, Tensor] = dict(
        zip(batch, _decode_jpegs(encoded, batch, device), strict=True)
    )
    images = []
    for index, data in enumerate(encoded):
        image = decoded.get(index)
        if image is None:
            image = _decode_with_pillow(data, index).to(device, non_blocking=True)
        header = headers[index]
        images.append(orient(image, header.orientation if header else 1))
    return images


def _decode_jpegs(
    encoded: Sequence[bytes], indices: list[int], device: torch.device
) -> list[Tensor | None]:
    """``encoded[i]`` for each of ``indices`` through ``decode_jpeg`` on ``device``, in one
    call; if the call fails (it gives no partial results), one by one, None for each that
    fails on its own (those go to Pillow)."""
    if not indices:
        return []
    # bytes -> Tensor[L] of uint8 on the CPU, as decode_jpeg takes (bytearray: writable).
    data = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in indices]
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError) as exc:
        log.info("batched JPEG decode failed (%r); decoding the %d one by one", exc, len(data))
    singles: list[Tensor | None] = []
    for one in data:
        try:
            singles.append(decode_jpeg([one], mode=ImageReadMode.RGB, device=device)[0])
        except (RuntimeError, ValueError):
            singles.append(None)
    return singles


def _decode_with_pillow(data: bytes, index: int) -> Tensor:
    """``data`` decoded by Pillow to a uint8 RGB Tensor[3, H, W] on the CPU, colour handled
    by ``to_rgb_tensor`` as ``Detector.prepare`` handles it (orientation not applied).

    Raises:
        ValueError: Pillow cannot read it; the message names ``index``.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb_tensor(image)
    except Exception as exc:  # Pillow raises many exception types for corrupt data
        raise ValueError(f"encoded[{index}]: cannot decode the image: {exc}") from None
