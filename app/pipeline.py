"""One request's way through the service, top to bottom.

``Pipeline.detect`` takes a request from the route (which only parses HTTP) to its results:

1. admit it to the model's batcher (``app.batcher``): refused with 503 when the queue is full,
   before the upload is read, and from then on a batch may wait for it;
2. read the images it uploads (``app.uploads``) and hold a queue place for each;
3. decode each on the decode pool, under the pixel budget (``app.images``), and prepare it for
   the network there (``Detector.prepare``: colour, resize, mean);
4. submit them to the batcher, which runs them through ``Detector.run_batch`` with others';
5. hand back the detections, with what the access log reports.

All of it by the request's deadline, ``request_timeout_s`` from its arrival.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.batcher import DisconnectCheck, Job
from app.errors import BadRequestError, ClientDisconnectedError, InvalidImageError, ServiceError
from app.images import DecodedImage, DecodePool, decode, open_image
from app.lifecycle import Lifecycle
from app.registry import Copy, Registry
from app.schemas import ModelRef
from app.uploads import Upload
from model.network.detections import Cut, Detections


@dataclass(frozen=True)
class ImageLimits:
    """What an uploaded image may cost: width x height, and scans of a JPEG."""

    max_pixels: int
    max_jpeg_scans: int


@dataclass(frozen=True)
class Outcome:
    """What a request's images gave: the model that answered, and per image, in upload order,
    its detections (xyxy pixels), its (width, height) as displayed and its batch's size; and,
    when asked for (``keep_images``), the images as displayed, at full size."""

    model: ModelRef
    detections: list[Detections]
    sizes: list[tuple[int, int]]
    batch_sizes: list[int]
    images: list[DecodedImage] | None = None


class Pipeline:
    """Admits, reads, decodes and batches requests for the models of ``registry``.

    Args:
        registry: the models; a request names one, or gets the default.
        pool: the decode threads and pixel budget, shared by all models.
        lifecycle: whether the service takes work now.
        limits: what an image may cost to decode.
        request_timeout_s: a request's deadline, from its arrival.
        score_threshold, max_detections: the cut for requests that give none.
    """

    def __init__(
        self,
        registry: Registry,
        pool: DecodePool,
        lifecycle: Lifecycle,
        limits: ImageLimits,
        *,
        request_timeout_s: float,
        score_threshold: float,
        max_detections: int,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.lifecycle = lifecycle
        self.limits = limits
        self.request_timeout_s = request_timeout_s
        self.score_threshold = score_threshold
        self.max_detections = max_detections

    async def detect(
        self,
        read: Callable[[], Awaitable[Upload]],
        is_disconnected: DisconnectCheck,
        *,
        model: str | None = None,
        score_threshold: float | None = None,
        max_detections: int | None = None,
        classes: list[str] | None = None,
        iou_threshold: float | None = None,
        numbered: bool = False,
        score_field: str | None = None,
        keep_images: bool = False,
    ) -> Outcome:
        """Detect objects in the images ``read`` gives, with model ``model`` (None: the
        default), keeping the ``classes`` named (None: all) before ``max_detections``, with
        per-class NMS at ``iou_threshold`` (None: the model's). ``numbered`` prefixes an
        image's error with its place (``images[2]: ...``). ``score_field`` names a form field
        that may carry the score threshold instead (DeepStack's ``min_confidence``).
        ``keep_images`` decodes JPEGs at full size and hands the images back, to draw on.

        Raises:
            ServiceError: the answer to give instead (503 not ready, draining or full; 404
                unknown model; 4xx bad upload or image; 504 past the deadline; 499 gone).
        """
        deadline = time.monotonic() + self.request_timeout_s
        self.lifecycle.check_accepting()
        # No await between picking the copy and being admitted to it: a swap, which runs on
        # this event loop, cannot come between, so the copy's batcher is still running.
        copy = self.registry.get(model)
        try:
            cut = copy.detector.cut(
                self.score_threshold if score_threshold is None else score_threshold,
                self.max_detections if max_detections is None else max_detections,
                classes,
                iou_threshold,
            )
        except ValueError as exc:
            # A class name the model lacks (the message lists its own), or more detections
            # than an exported model keeps (the message says how many it does).
            raise BadRequestError(str(exc)) from None
        with copy.batcher.admit() as ticket:
            upload = await read()
            images = upload.images
            if score_field is not None and score_field in upload.fields:
                threshold = _unit_number(score_field, upload.fields[score_field])
                cut = dataclasses.replace(cut, score_threshold=threshold)
            copy.batcher.hold(ticket, len(images))
            prepared = await asyncio.gather(
                *(
                    self._prepare(
                        copy, data, deadline, cut, f"images[{i}]: " * numbered, keep_images
                    )
                    for i, data in enumerate(images)
                )
            )
            jobs = [job for job, _ in prepared]
            answers = await copy.batcher.submit(ticket, jobs, deadline, is_disconnected)
        if await is_disconnected():
            raise ClientDisconnectedError("the client went away before its answer was sent")
        return Outcome(
            copy.ref,
            [answer.detections for answer in answers],
            [job.size for job in jobs],
            [answer.batch_size for answer in answers],
            [image for _, image in prepared if image is not None] if keep_images else None,
        )

    async def _prepare(
        self, copy: Copy, data: bytes, deadline: float, cut: Cut, where: str, keep: bool
    ) -> tuple[Job, DecodedImage | None]:
        """One image's bytes to a job for ``copy``'s batcher, on the decode pool, and the
        image as displayed when ``keep`` (decoded at full size)."""
        try:
            # Cheap, but not free (the scan count reads the whole file), so off the event loop.
            opened = await asyncio.to_thread(
                open_image,
                data,
                self.limits.max_pixels,
                self.limits.max_jpeg_scans,
                0 if keep else copy.detector.input_size,  # 0: no reduced-scale decode
            )

            def work() -> tuple[Job, DecodedImage | None]:
                started = time.perf_counter()
                decoded = decode(opened)
                try:
                    # The pixels may be a reduced-scale decode; the job keeps the full size,
                    # since the network sees the whole image resized anyway and boxes come back
                    # relative to it.
                    inputs, _ = copy.detector.prepare(decoded.image)
                except (ValueError, TypeError) as exc:  # the model's word for an unusable image
                    raise InvalidImageError(f"cannot use the image: {exc}") from None
                copy.batcher.metrics.stage("decode", time.perf_counter() - started)
                return Job(inputs, decoded.size, cut), decoded if keep else None

            return await self.pool.run(opened.pixels, deadline, work)
        except ServiceError as exc:
            if not where:
                raise
            raise type(exc)(where + exc.message) from None


def _unit_number(name: str, text: str) -> float:
    """A form field's number from 0 to 1; ``BadRequestError`` naming it otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise BadRequestError(f"{name} must be a number from 0 to 1, got {text[:40]!r}")
    return value
