"""Image bytes to pixels: the one place the service decodes images, and the bounds on it.

Decoding is the one step whose cost the client chooses, so it is bounded three ways:

- ``open_image`` judges the format by the leading bytes (magic numbers), never by the declared
  type (only JPEG, PNG, WebP and BMP pass), and reads the pixel count from the header, so what
  would cost too much is refused before a pixel is decoded; large JPEGs decode at reduced scale;
- ``PixelBudget`` bounds the pixels decoded and held at once across all requests and models
  (memory), whatever the number of requests;
- ``DecodePool`` awaits a decode only until the request's deadline: then the request gets 504
  and leaves, while the thread, which cannot be stopped, finishes on its own and only then
  gives its pixels back to the budget.

``decode`` applies the EXIF orientation, so the image (and every box) is in the frame a viewer
displays.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from PIL import ExifTags, Image, ImageOps

from app.errors import (
    DeadlineExceededError,
    InvalidImageError,
    TooLargeError,
    UnsupportedTypeError,
)
from model.inference.drawing import draw_detections
from model.network.detections import Detections

log = logging.getLogger(__name__)

T = TypeVar("T")

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


@dataclass(frozen=True)
class OpenedImage:
    """An image whose header has been read and checked, not yet decoded.

    ``image`` is Pillow's lazy image, set to decode at a reduced scale where that applies;
    ``size`` is the (width, height) stored in the header; ``pixels`` is the width x height it
    will decode to (what decoding it holds in memory).
    """

    image: Image.Image
    image_format: str
    size: tuple[int, int]
    pixels: int


@dataclass(frozen=True)
class DecodedImage:
    """Decoded pixels, EXIF orientation applied (mode as stored: L, RGB, P, I;16 ...), and
    ``size``, the (width, height) of the full image as displayed, which the pixels may be a
    reduced-scale copy of."""

    image: Image.Image
    size: tuple[int, int]


def open_image(data: bytes, max_pixels: int, max_jpeg_scans: int, min_side: int) -> OpenedImage:
    """Check an uploaded image before any pixel is decoded; cheap whatever the file holds.

    A JPEG at least twice ``min_side`` on both sides is set to decode at 1/2, 1/4 or 1/8 scale
    (the DCT's own scaling, Pillow's ``draft``), still ``min_side`` or more on both sides:
    the network sees the image at ``min_side`` pixels anyway, and the decode costs and holds a
    quarter to a sixty-fourth as much.

    Raises:
        InvalidImageError: empty data, or a header that cannot be read.
        UnsupportedTypeError: the bytes are not JPEG, PNG, WebP or BMP.
        TooLargeError: the header declares more than ``max_pixels`` pixels (width x height), or
            a JPEG holds more than ``max_jpeg_scans`` scans.
    """
    if not data:
        raise InvalidImageError("the image is empty (0 bytes)")
    image_format = sniff_format(data)
    if image_format is None:
        raise UnsupportedTypeError(f"the data is {_describe(data)}; send {ALLOWED}")
    if image_format == "JPEG":
        # Every scan starts with an SOS marker, FF DA. Entropy-coded data never holds FF DA
        # (an FF there is followed by 00 or a restart marker, T.81 sec. B.1.1.5), so the count
        # is the scans plus any FF DA in metadata: an upper bound, and cheap (memchr speed).
        # A progressive scan revisits every block, so the decode costs scans x pixels.
        scans = data.count(b"\xff\xda")
        if scans > max_jpeg_scans:
            raise TooLargeError(
                f"the JPEG holds {scans} scans; this server accepts at most {max_jpeg_scans} "
                "(progressive files have about 10)"
            )
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
    if image_format == "JPEG" and min_side > 0:
        image.draft(image.mode, (min_side, min_side))  # a no-op below 2 x min_side
    return OpenedImage(image, image_format, (width, height), image.width * image.height)


def decode(opened: OpenedImage) -> DecodedImage:
    """Decode the pixels and apply the EXIF orientation (this is where the time goes).

    Raises:
        InvalidImageError: truncated or corrupt data, or bad EXIF.
    """
    image = opened.image
    full_width, full_height = opened.size
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        image.load()
        oriented = ImageOps.exif_transpose(image)
    except Exception as exc:  # truncated data, corrupt chunks, bad EXIF: all the client's
        raise InvalidImageError(f"cannot decode the {opened.image_format} image: {exc}") from None
    # EXIF orientations 5 to 8 turn the image a quarter (CIPA DC-008, tag 0x0112).
    size = (full_height, full_width) if orientation in (5, 6, 7, 8) else (full_width, full_height)
    return DecodedImage(oriented if oriented is not None else image, size)


def _describe(data: bytes) -> str:
    for magic, name in _KNOWN_OTHERS.items():
        if data.startswith(magic):
            return f"{name}, which is not accepted"
    return f"not a recognised image (it starts with {data[:8]!r})"


class PixelBudget:
    """A semaphore counted in pixels: ``acquire(n)`` waits until ``n`` fit, first come first
    served (a large image is not starved by a stream of small ones). Event-loop only."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 pixel, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, pixels: int) -> None:
        """Wait until ``pixels`` fit; cancellable (then nothing is taken)."""
        if pixels > self.capacity:
            raise ValueError(f"{pixels} pixels can never fit a budget of {self.capacity}")
        if not self._waiters and self.in_use + pixels <= self.capacity:
            self.in_use += pixels
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (pixels, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # granted just as it was cancelled
                self.release(pixels)
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, pixels: int) -> None:
        """Give ``pixels`` back and let waiters in, in order."""
        self.in_use -= pixels
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            pixels, waiter = self._waiters[0]
            if self.in_use + pixels > self.capacity:
                return
            self._waiters.popleft()
            self.in_use += pixels
            waiter.set_result(None)


class DecodePool:
    """Threads that decode (one per core: the work is CPU-bound and Pillow's decoders release
    the GIL), admitted by a ``PixelBudget``.

    Args:
        pixel_budget: most pixels decoded and held at once (``SSD_DECODE_PIXEL_BUDGET``).
        threads: decoding threads; default one per core.
    """

    def __init__(self, pixel_budget: int, threads: int | None = None) -> None:
        self.budget = PixelBudget(pixel_budget)
        self._executor = ThreadPoolExecutor(
            max_workers=threads or os.cpu_count() or 1, thread_name_prefix="ssd-decode"
        )

    async def run(self, pixels: int, deadline: float, work: Callable[[], T]) -> T:
        """Run ``work`` (which decodes ``pixels`` pixels) on a decoding thread, by ``deadline``
        (a ``time.monotonic()`` value).

        Raises:
            DeadlineExceededError: the deadline passed while waiting for room or for ``work``.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                await self.budget.acquire(pixels)
        except TimeoutError:
            raise DeadlineExceededError(
                "no room to decode the image within the request deadline"
            ) from None
        try:
            future = self._executor.submit(work)
        except BaseException:
            self.budget.release(pixels)
            raise
        # The pixels go back when the thread is done (or the work is cancelled before it
        # started), not when the request stops waiting: a running thread cannot be stopped,
        # and cancelling the wrapper below leaves it running.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self.budget.release, pixels))
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            log.warning("a decode of %d pixels ran past its request's deadline", pixels)
            raise DeadlineExceededError(
                "decoding the image did not finish within the request deadline"
            ) from None

    def shutdown(self) -> None:
        """Wait for the decodes running, then stop the threads."""
        self._executor.shutdown(wait=True)


def annotated_jpeg(decoded: DecodedImage, detections: Detections) -> bytes:
    """The image as displayed, full size, with its detections drawn
    (``model.inference.drawing``), as a JPEG (4:4:4, so thin coloured lines stay sharp)."""
    buffer = io.BytesIO()
    draw_detections(decoded.image, detections).save(buffer, "JPEG", quality=90, subsampling=0)
    return buffer.getvalue()
