"""GET /model (the default model and batching) and GET /metrics (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.auth import ClientKey
from app.routes.docs import error_responses
from app.schemas import BatchingInfo, ModelInfo
from app.service import ServiceDep

router = APIRouter(tags=["operations"])


@router.get("/model", dependencies=[ClientKey], responses=error_responses(401))
async def model_info(service: ServiceDep) -> ModelInfo:
    """The default model (name, version, classes, input size, device, precision) and batching;
    GET /models lists every model."""
    settings, copy = service.settings, service.registry.get()
    detector = copy.detector
    return ModelInfo(
        name=copy.ref.name,
        version=copy.ref.version,
        class_names=detector.class_names,
        input_size=detector.input_size,
        device=str(detector.device),
        precision=detector.precision,
        batching=BatchingInfo(
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            request_timeout_s=settings.request_timeout_s,
            max_images_per_request=settings.max_images_per_request,
        ),
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(service: ServiceDep) -> Response:
    """Prometheus metrics in the text exposition format."""
    body, content_type = service.metrics.exposition()
    return Response(body, media_type=content_type)
