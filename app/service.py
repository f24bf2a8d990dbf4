"""The running service's parts, built in the lifespan and reached through a dependency."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import Depends, Request

from app.batcher import Batcher
from app.errors import DrainingError, NotReadyError
from app.metrics import Metrics
from app.schemas import ModelRef
from app.settings import Settings
from model import Detector

# Hex digits of the checkpoint's sha256 used as the model version.
VERSION_DIGITS = 12


@dataclass
class Service:
    """Everything a request needs. ``ready`` turns True after the warm-up batch; ``draining``
    turns True on SIGTERM."""

    settings: Settings
    detector: Detector
    batcher: Batcher
    metrics: Metrics
    model: ModelRef
    decode_slots: anyio.CapacityLimiter
    ready: bool = False
    draining: bool = False

    def check_accepting(self) -> None:
        """Raise the 503 that applies if the service takes no new work now."""
        if self.draining:
            raise DrainingError("the server is shutting down; retry on another instance")
        if not self.ready:
            raise NotReadyError("the model is still loading")


def decode_slots() -> anyio.CapacityLimiter:
    """Threads that decode and resize at once: one per core, since the work is CPU-bound and
    more threads would only hold more decoded images in memory."""
    return anyio.CapacityLimiter(os.cpu_count() or 1)


def model_ref(weights: Path) -> ModelRef:
    """Name (file stem) and version (sha256 prefix) of a checkpoint file."""
    digest = hashlib.sha256()
    with weights.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return ModelRef(name=weights.stem, version=digest.hexdigest()[:VERSION_DIGITS])


def get_service(request: Request) -> Service:
    """The app's Service (set by the lifespan)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
