"""The DeepStack / CodeProject.AI detection API: what NVR and home-automation tools (Frigate,
Home Assistant, Blue Iris, Agent DVR) call.

``POST /v1/vision/detection`` serves the default model and ``POST /v1/vision/custom/{model}``
a named one, through the same pipeline, batcher, limits and metrics as ``/detect``. The body is
multipart: the image in ``image``, and optionally ``min_confidence`` (0 to 1; default
SSD_SCORE_THRESHOLD) and ``api_key``. Errors keep their HTTP status with DeepStack's body,
``{"success": false, "error": ...}`` (``app.errors``).
"""

from __future__ import annotations

import functools
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from app.auth import check_form_key, header_key_if_any
from app.errors import DEEPSTACK_PREFIX
from app.pipeline import Outcome
from app.routes.detect import Classes, IouThreshold, class_list, run_pipeline
from app.routes.docs import error_responses
from app.schemas import DeepStackPrediction, DeepStackResponse
from app.service import ServiceDep
from app.uploads import Upload, read_images

router = APIRouter(tags=["DeepStack API"])
ERRORS = error_responses(400, 401, 404, 408, 413, 415, 422, 500, 503, 504, deepstack=True)
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "min_confidence": {"type": "number", "minimum": 0, "maximum": 1},
                        "api_key": {"type": "string"},
                    },
                }
            }
        },
    }
}


HeaderKey = Annotated[str | None, Depends(header_key_if_any)]


@router.post(DEEPSTACK_PREFIX + "detection", responses=ERRORS, openapi_extra=_BODY)
async def detection(
    request: Request,
    service: ServiceDep,
    key: HeaderKey,
    classes: Classes = None,
    iou_threshold: IouThreshold = None,
) -> DeepStackResponse:
    """Detect objects with the default model (DeepStack's object detection)."""
    return await _answer(request, service, None, key, classes, iou_threshold)


@router.post(DEEPSTACK_PREFIX + "custom/{model}", responses=ERRORS, openapi_extra=_BODY)
async def custom(
    request: Request,
    service: ServiceDep,
    model: str,
    key: HeaderKey,
    classes: Classes = None,
    iou_threshold: IouThreshold = None,
) -> DeepStackResponse:
    """Detect objects with the model of that name (GET /models lists them): DeepStack's
    custom models."""
    return await _answer(request, service, model, key, classes, iou_threshold)


async def _answer(
    request: Request,
    service: ServiceDep,
    model: str | None,
    key: str | None,
    classes: str | None,
    iou_threshold: float | None,
) -> DeepStackResponse:
    read = functools.partial(
        read_images, request, service.body_limits, service.lifecycle.cut_uploads, "image", 1,
        raw=False,
    )  # fmt: skip
    if key is None and service.keys.on:
        # DeepStack's clients send the key in the form: the body is read and the key checked
        # before anything else, so a request without a valid key learns nothing (not even
        # which models exist) and takes no place in a queue.
        upload = await read()
        check_form_key(request, upload.fields)
        read = functools.partial(_given, upload)

    outcome = await run_pipeline(
        request, service, read, model=model, classes=class_list(classes),
        iou_threshold=iou_threshold, score_field="min_confidence",
    )  # fmt: skip
    return _response(outcome)


async def _given(upload: Upload) -> Upload:
    """An upload already read, as the pipeline's ``read``."""
    return upload


def _response(outcome: Outcome) -> DeepStackResponse:
    [detections] = outcome.detections
    predictions = [
        DeepStackPrediction(
            label=label,
            confidence=round(score, 4),
            x_min=round(box[0]),
            y_min=round(box[1]),
            x_max=round(box[2]),
            y_max=round(box[3]),
        )
        for box, score, _, label in detections.rows()
    ]
    return DeepStackResponse(predictions=predictions, count=len(predictions), model=outcome.model)
