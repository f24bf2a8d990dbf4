"""The running service's parts, built in the lifespan and reached through a dependency."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from app.batcher import Batcher
from app.decoding import DecodePool
from app.errors import DrainingError, NotReadyError
from app.metrics import Metrics
from app.schemas import ModelRef
from app.settings import Settings
from app.uploads import BodyLimits
from model import Detector
from model.weights.published import is_published, source_file
from model.weights.torch_cache import file_sha256

# Hex digits of the checkpoint's sha256 used as the model version.
VERSION_DIGITS = 12


@dataclass
class Service:
    """Everything a request needs. ``ready`` turns True after the warm-up batch; ``draining``
    turns True on SIGTERM; ``cut_uploads`` is set when uploads still arriving must stop."""

    settings: Settings
    detector: Detector
    batcher: Batcher
    metrics: Metrics
    model: ModelRef
    decoder: DecodePool
    ready: bool = False
    draining: bool = False
    cut_uploads: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def body_limits(self) -> BodyLimits:
        """How request bodies must arrive (size, time, rate), from the settings."""
        return BodyLimits(
            max_bytes=self.settings.max_upload_bytes,
            timeout_s=self.settings.body_timeout_s,
            min_rate=self.settings.min_body_rate,
        )

    def check_accepting(self) -> None:
        """Raise the 503 that applies if the service takes no new work now."""
        if self.draining:
            raise DrainingError("the server is shutting down; retry on another instance")
        if not self.ready:
            raise NotReadyError("the model is still loading")


def model_ref(weights: Path) -> ModelRef:
    """Name (file stem, or the published source's name) and version (sha256 prefix of the
    checkpoint file, or of the published file it was converted from)."""
    published = is_published(weights)
    digest = file_sha256(source_file(weights) if published else weights)
    name = str(weights) if published else weights.stem
    return ModelRef(name=name, version=digest[:VERSION_DIGITS])


def get_service(request: Request) -> Service:
    """The app's Service (set by the lifespan)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
