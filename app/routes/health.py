"""GET /healthz (liveness) and GET /readyz (readiness)."""

from __future__ import annotations

from fastapi import APIRouter

from app.routes.docs import error_responses
from app.schemas import Status
from app.service import ServiceDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> Status:
    """Liveness: the process answers. Cheap, touches nothing."""
    return Status(status="ok")


@router.get("/readyz", responses=error_responses(503))
async def readyz(service: ServiceDep) -> Status:
    """Readiness: 200 once the model is loaded and warmed up; 503 before, and while draining."""
    service.lifecycle.check_accepting()
    return Status(status="ready")
