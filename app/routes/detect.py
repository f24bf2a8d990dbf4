"""POST /detect and POST /detect/batch: image bytes in, detections out."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.batcher import Job, Reservation
from app.errors import (
    ClientDisconnectedError,
    InvalidImageError,
    ServiceError,
    UnsupportedTypeError,
)
from app.intake import OpenedImage, decode, open_image
from app.routes.docs import error_responses, image_body
from app.schemas import BatchResponse, Box, Detection, DetectResponse, ImageSize, ModelRef
from app.service import Service, ServiceDep
from app.settings import Settings
from app.uploads import form_images, is_multipart, read_body
from model import Detections

router = APIRouter(tags=["detection"])
# The defaults the API text names, read from where they are defined.
_DEFAULT_THRESHOLD = Settings.model_fields["score_threshold"].default
_DEFAULT_MAX_DETECTIONS = Settings.model_fields["max_detections"].default

ScoreThreshold = Annotated[
    float | None,
    Query(
        ge=0,
        le=1,
        description="Keep detections scoring above this "
        f"(default: SSD_SCORE_THRESHOLD, {_DEFAULT_THRESHOLD}).",
    ),
]
MaxDetections = Annotated[
    int | None,
    Query(
        ge=1,
        le=1000,
        description="At most this many detections per image "
        f"(default: SSD_MAX_DETECTIONS, {_DEFAULT_MAX_DETECTIONS}).",
    ),
]
ERRORS = error_responses(400, 408, 413, 415, 422, 500, 503, 504)


@router.post("/detect", responses=ERRORS, openapi_extra=image_body("image", many=False))
async def detect(
    request: Request,
    service: ServiceDep,
    score_threshold: ScoreThreshold = None,
    max_detections: MaxDetections = None,
) -> DetectResponse:
    """Detect objects in one image: multipart field `image`, or the raw body as image/*."""
    arrived = time.monotonic()
    service.check_accepting()
    with service.batcher.reserve() as reservation:  # from now on a batch may wait for it
        service.batcher.check_capacity(1)
        body = await read_body(request, service.body_limits, service.cut_uploads)
        multipart = is_multipart(request)
        images = await form_images(request, body, "image", 1) if multipart else [body]
        [result] = await _detect(
            service, request, reservation, images, arrived, score_threshold, max_detections
        )
    return result


@router.post("/detect/batch", responses=ERRORS, openapi_extra=image_body("images", many=True))
async def detect_batch(
    request: Request,
    service: ServiceDep,
    score_threshold: ScoreThreshold = None,
    max_detections: MaxDetections = None,
) -> BatchResponse:
    """Detect objects in several images (multipart fields `images`); results in that order."""
    arrived = time.monotonic()
    service.check_accepting()
    with service.batcher.reserve() as reservation:  # from now on a batch may wait for it
        service.batcher.check_capacity(1)
        body = await read_body(request, service.body_limits, service.cut_uploads)
        if not is_multipart(request):
            raise UnsupportedTypeError(
                "send multipart/form-data with one or more files in `images`"
            )
        cap = service.settings.max_images_per_request
        images = await form_images(request, body, "images", cap)
        results = await _detect(
            service, request, reservation, images, arrived, score_threshold, max_detections,
            numbered=True,
        )  # fmt: skip
    return BatchResponse(results=results)


async def _detect(
    service: Service,
    request: Request,
    reservation: Reservation,
    images: list[bytes],
    arrived: float,
    score_threshold: float | None,
    max_detections: int | None,
    *,
    numbered: bool = False,
) -> list[DetectResponse]:
    """Hold queue places for the images in the request's ``reservation``, decode them on
    the decode pool, run them as queued jobs, build the responses; all by the request's
    deadline."""
    settings = service.settings
    threshold = settings.score_threshold if score_threshold is None else score_threshold
    cap = settings.max_detections if max_detections is None else max_detections
    deadline = arrived + settings.request_timeout_s

    async def prepare(index: int, data: bytes) -> Job:
        try:
            # Cheap, but not free (the scan count reads the whole file: about 10 ms for
            # 10 MiB), so off the event loop.
            opened = await asyncio.to_thread(
                open_image,
                data,
                settings.max_image_pixels,
                settings.max_jpeg_scans,
                service.detector.input_size,
            )
            work = functools.partial(_prepare, service, opened, threshold, cap)
            return await service.decoder.run(opened.pixels, deadline, work)
        except ServiceError as exc:
            if not numbered:
                raise
            raise type(exc)(f"images[{index}]: {exc.message}") from None

    reservation.hold(len(images))
    jobs = await asyncio.gather(*(prepare(i, data) for i, data in enumerate(images)))
    request.state.image_sizes = [job.size for job in jobs]  # for the access log
    batch_sizes: list[int] = []
    request.state.batch_sizes = batch_sizes
    detections = await service.batcher.submit(
        jobs, deadline, request.is_disconnected, reservation, batch_sizes
    )
    if await request.is_disconnected():
        raise ClientDisconnectedError("the client went away before its answer was sent")
    return [
        _response(result, job.size, service.model)
        for result, job in zip(detections, jobs, strict=True)
    ]


def _prepare(
    service: Service, opened: OpenedImage, score_threshold: float, max_detections: int
) -> Job:
    """A checked image to a queued job (runs on a decoding thread): decode, colour, resize."""
    start = time.perf_counter()
    decoded = decode(opened)
    try:
        # The pixels may be a reduced-scale decode; the job keeps the full size, since the
        # network sees the whole image resized anyway and boxes come back relative to it.
        inputs, _ = service.detector.prepare(decoded.image)
    except (ValueError, TypeError) as exc:  # the model's word for an image it cannot use
        raise InvalidImageError(f"cannot use the image: {exc}") from None
    service.metrics.stage_duration.labels(stage="decode").observe(time.perf_counter() - start)
    return Job(inputs, decoded.size, score_threshold, max_detections)


def _response(result: Detections, size: tuple[int, int], model: ModelRef) -> DetectResponse:
    """Detections (xyxy pixels, sorted by score) as the response body; pixels to 0.01."""
    detections = [
        Detection(
            label=label,
            class_id=class_id,
            score=round(score, 4),
            box=Box(
                x_min=round(box[0], 2),
                y_min=round(box[1], 2),
                x_max=round(box[2], 2),
                y_max=round(box[3], 2),
            ),
        )
        for box, score, class_id, label in result.rows()
    ]
    return DetectResponse(
        detections=detections, image=ImageSize(width=size[0], height=size[1]), model=model
    )
