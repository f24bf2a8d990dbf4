"""Where the service is in its life: loading, ready, draining."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from app.errors import DrainingError, NotReadyError


@dataclass
class Lifecycle:
    """``ready`` turns True once every model is loaded and warmed up; ``draining`` turns True
    on SIGTERM; ``cut_uploads`` is set when uploads still arriving must stop."""

    ready: bool = False
    draining: bool = False
    cut_uploads: asyncio.Event = field(default_factory=asyncio.Event)

    def check_accepting(self) -> None:
        """Raise the 503 that applies if the service takes no new work now."""
        if self.draining:
            raise DrainingError("the server is shutting down; retry on another instance")
        if not self.ready:
            raise NotReadyError("the model is still loading")
