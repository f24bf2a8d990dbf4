"""GET /models (what is served, by name) and POST /models/{name}/reload (swap in new weights)."""

from __future__ import annotations

from fastapi import APIRouter

from app.auth import AdminKey, ClientKey
from app.errors import ReloadDisabledError
from app.registry import Copy
from app.routes.docs import error_responses
from app.schemas import ModelList, ModelSummary
from app.service import ServiceDep

router = APIRouter(tags=["models"])


@router.get("/models", dependencies=[ClientKey], responses=error_responses(401))
async def list_models(service: ServiceDep) -> ModelList:
    """Every model this server has (name, version, classes, device, precision), default first."""
    registry = service.registry
    return ModelList(
        models=[summary(registry.get(name), name == registry.default) for name in registry.names]
    )


@router.post(
    "/models/{name}/reload",
    dependencies=[AdminKey],
    responses=error_responses(401, 403, 404, 422, 503),
)
async def reload_model(name: str, service: ServiceDep) -> ModelSummary:
    """Load the model's weights again from its source and switch to them without dropping a
    request; off unless SSD_ALLOW_RELOAD is true. On failure the old weights go on serving."""
    if not service.settings.allow_reload:
        raise ReloadDisabledError(
            "reloading is off; set SSD_ALLOW_RELOAD=true to allow it (with API keys on, to admin "
            "keys), or send the process SIGHUP"
        )
    service.lifecycle.check_accepting()
    registry = service.registry
    await registry.reload(name)
    return summary(registry.get(name), name == registry.default)


def summary(copy: Copy, default: bool) -> ModelSummary:
    """What /models says of a model's copy."""
    detector = copy.detector
    return ModelSummary(
        name=copy.ref.name,
        version=copy.ref.version,
        default=default,
        class_names=detector.class_names,
        input_size=detector.input_size,
        device=str(detector.device),
        precision=detector.precision,
    )
