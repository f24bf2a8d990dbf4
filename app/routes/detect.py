"""POST /detect and POST /detect/batch: image bytes in, detections out."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response

from app.auth import ClientKey
from app.images import annotated_jpeg
from app.pipeline import Outcome
from app.routes.docs import error_responses, image_body
from app.schemas import BatchResponse, Box, Detection, DetectResponse, ImageSize, ModelRef
from app.service import Service, ServiceDep
from app.settings import Settings
from app.uploads import Upload, read_images
from model.network.detections import Detections

router = APIRouter(tags=["detection"], dependencies=[ClientKey])
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
Classes = Annotated[
    str | None,
    Query(
        description="Comma-separated class names to keep (GET /models lists each model's); "
        "the others are dropped before max_detections, so `classes=car&max_detections=5` "
        "gives the five best cars. An unknown name gets 422 listing the valid ones.",
    ),
]
IouThreshold = Annotated[
    float | None,
    Query(
        ge=0,
        le=1,
        description="Per-class NMS: of two boxes of one class overlapping more than this, the "
        "lower-scoring one goes (default: the model's, 0.45).",
    ),
]
ModelName = Annotated[
    str | None,
    Query(description="the model to use, by name (GET /models lists them; default: SSD_WEIGHTS)"),
]
Format = Annotated[
    Literal["json", "jpeg"] | None,
    Query(
        alias="format",
        description="`jpeg`: answer with the image as displayed, boxes and labels drawn on it, "
        "and the JSON answer in the `X-Detections` header (default: `json`, or `jpeg` when "
        "the Accept header asks for image/jpeg and not JSON).",
    ),
]
ERRORS = error_responses(400, 401, 404, 408, 413, 415, 422, 500, 503, 504)
DETECTIONS_HEADER = "X-Detections"
_ANNOTATED = {
    200: {
        "content": {"image/jpeg": {}},
        "description": f"with `format=jpeg`: the annotated image; the JSON in {DETECTIONS_HEADER}",
    }
}


@router.post(
    "/detect",
    responses={**ERRORS, **_ANNOTATED},
    openapi_extra=image_body("image", many=False),
)
async def detect(
    request: Request,
    service: ServiceDep,
    model: ModelName = None,
    score_threshold: ScoreThreshold = None,
    max_detections: MaxDetections = None,
    classes: Classes = None,
    iou_threshold: IouThreshold = None,
    answer_format: Format = None,
) -> DetectResponse:
    """Detect objects in one image: multipart field `image`, or the raw body as image/*."""
    read = functools.partial(
        read_images, request, service.body_limits, service.lifecycle.cut_uploads, "image", 1,
        raw=True,
    )  # fmt: skip
    drawn = (answer_format or _accepted(request)) == "jpeg"
    outcome = await run_pipeline(
        request, service, read, model=model, score_threshold=score_threshold,
        max_detections=max_detections, classes=class_list(classes), iou_threshold=iou_threshold,
        keep_images=drawn,
    )  # fmt: skip
    [answer] = _responses(outcome)
    if not drawn or outcome.images is None:
        return answer
    jpeg = await asyncio.to_thread(annotated_jpeg, outcome.images[0], outcome.detections[0])
    headers = {DETECTIONS_HEADER: answer.model_dump_json()}
    return Response(jpeg, media_type="image/jpeg", headers=headers)  # type: ignore[return-value]


def _accepted(request: Request) -> str:
    """``jpeg`` when the Accept header prefers image/jpeg to JSON, else ``json``."""
    accept = request.headers.get("accept", "")
    wants = [part.split(";")[0].strip() for part in accept.split(",")]
    if "image/jpeg" in wants and "application/json" not in wants[: wants.index("image/jpeg")]:
        return "jpeg"
    return "json"


@router.post("/detect/batch", responses=ERRORS, openapi_extra=image_body("images", many=True))
async def detect_batch(
    request: Request,
    service: ServiceDep,
    model: ModelName = None,
    score_threshold: ScoreThreshold = None,
    max_detections: MaxDetections = None,
    classes: Classes = None,
    iou_threshold: IouThreshold = None,
) -> BatchResponse:
    """Detect objects in several images (multipart fields `images`); results in that order."""
    cap = service.settings.max_images_per_request
    read = functools.partial(
        read_images, request, service.body_limits, service.lifecycle.cut_uploads, "images", cap,
        raw=False,
    )  # fmt: skip
    outcome = await run_pipeline(
        request, service, read, model=model, score_threshold=score_threshold,
        max_detections=max_detections, classes=class_list(classes), iou_threshold=iou_threshold,
        numbered=True,
    )  # fmt: skip
    return BatchResponse(results=_responses(outcome))


async def run_pipeline(
    request: Request,
    service: Service,
    read: Callable[[], Awaitable[Upload]],
    **options: Any,
) -> Outcome:
    """``Pipeline.detect`` for this request (``options`` are its keywords); the image and batch
    sizes go to the access log. Every detection route answers through it."""
    outcome = await service.pipeline.detect(read, request.is_disconnected, **options)
    request.state.image_sizes = outcome.sizes
    request.state.batch_sizes = outcome.batch_sizes
    return outcome


def class_list(classes: str | None) -> list[str] | None:
    """``classes=a,b`` as a list of names (None when not given)."""
    if classes is None:
        return None
    return [name.strip() for name in classes.split(",") if name.strip()]


def _responses(outcome: Outcome) -> list[DetectResponse]:
    """One response body per image."""
    return [
        _response(detections, size, outcome.model)
        for detections, size in zip(outcome.detections, outcome.sizes, strict=True)
    ]


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
