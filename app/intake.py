"""Image bytes to a decoded PIL image: the only place the service decodes images.

The format is judged by the leading bytes (magic numbers), never by the declared type, and
only JPEG, PNG, WebP and BMP pass. The pixel count is read from the header, before any pixel
is decoded, so a small file claiming a huge image costs nothing. The EXIF orientation is
applied, so the returned image (and every box) is in the frame a viewer displays.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

from app.errors import InvalidImageError, TooLargeError, UnsupportedTypeError

# Pillow format name -> (offset, signature) pairs that must all match.
# JPEG: SOI marker + the first marker's FF; PNG: its 8-byte signature (RFC 2083, sec. 3.1);
# WebP: a RIFF container of form type "WEBP"; BMP: the "BM" file-header magic.
SIGNATURES: dict[str, tuple[tuple[int, bytes], ...]] = {
    "JPEG": ((0, b"\xff\xd8\xff"),),
    "PNG": ((0, b"\x89PNG\r\n\x1a\n"),),
    "WEBP": ((0, b"RIFF"), (8, b"WEBP")),
    "BMP": ((0, b"BM"),),
}
ALLOWED = "JPEG, PNG, WebP or BMP"
# Names for common formats that are refused, so the error says what was sent.
_KNOWN_OTHERS = {b"GIF87a": "GIF", b"GIF89a": "GIF", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name of ``data`` judged by its leading bytes, or None if not allowed."""
    for name, parts in SIGNATURES.items():
        if all(data[offset : offset + len(magic)] == magic for offset, magic in parts):
            return name
    return None


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an uploaded image, EXIF orientation applied; mode as stored (L, RGB, P, I;16...).

    Raises:
        InvalidImageError: empty, undecodable or truncated data.
        UnsupportedTypeError: the bytes are not JPEG, PNG, WebP or BMP.
        TooLargeError: the header declares more than ``max_pixels`` pixels (width x height).
    """
    if not data:
        raise InvalidImageError("the image is empty (0 bytes)")
    image_format = sniff_format(data)
    if image_format is None:
        raise UnsupportedTypeError(f"the data is {_describe(data)}; send {ALLOWED}")
    try:
        # Lazy: reads the header only.
        image = Image.open(io.BytesIO(data), formats=[image_format])
    except Image.DecompressionBombError as exc:  # Pillow's own cap, far above ours
        raise TooLargeError(f"{exc}; this server accepts at most {max_pixels} pixels") from None
    except Exception as exc:  # Pillow raises many exception types for malformed headers
        raise InvalidImageError(f"cannot read the {image_format} header: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise TooLargeError(
            f"the image is {width}x{height} = {width * height} pixels; "
            f"this server accepts at most {max_pixels}"
        )
    if width == 0 or height == 0:
        raise InvalidImageError(f"the image has no pixels ({width}x{height})")
    try:
        image.load()
        oriented = ImageOps.exif_transpose(image)
    except Exception as exc:  # truncated data, corrupt chunks, bad EXIF: all the client's
        raise InvalidImageError(f"cannot decode the {image_format} image: {exc}") from None
    return oriented if oriented is not None else image


def _describe(data: bytes) -> str:
    for magic, name in _KNOWN_OTHERS.items():
        if data.startswith(magic):
            return f"{name}, which is not accepted"
    return f"not a recognised image (it starts with {data[:8]!r})"
