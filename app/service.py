"""The running service's parts, built in the lifespan and reached through a dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.auth import Keys
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.pipeline import Pipeline
from app.registry import Registry
from app.settings import Settings
from app.uploads import BodyLimits


@dataclass(frozen=True)
class Service:
    """Everything a request needs: the settings, the metrics, the models, the pipeline a
    detection request goes through, where the service is in its life, and the API keys."""

    settings: Settings
    metrics: Metrics
    registry: Registry
    pipeline: Pipeline
    lifecycle: Lifecycle
    keys: Keys

    @property
    def body_limits(self) -> BodyLimits:
        """How request bodies must arrive (size, time, rate), from the settings."""
        return BodyLimits(
            max_bytes=self.settings.max_upload_bytes,
            timeout_s=self.settings.body_timeout_s,
            min_rate=self.settings.min_body_rate,
        )


def get_service(request: Request) -> Service:
    """The app's Service (set by the lifespan)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
