"""The HTTP server around the app: uvicorn, with connection limits it does not have by itself.

Uvicorn waits forever for a request's headers, keeps buffering a header that never ends,
keeps a connection whose client trickles a body nobody reads, and answers malformed requests
in plain text. ``app.connection_guard`` adds the limits in front of uvicorn's own httptools
protocol (header timeout, header-size cap, unread bodies, connection cap, JSON answers), using
only ``uvicorn.Config`` options and asyncio's protocol interface; its docstring lists the
limits and the little it relies on beyond uvicorn's documented options.

Body timeouts and the minimum body rate are the app's (``app/uploads.py``), where the answer
can be counted; idle keep-alive connections close after uvicorn's ``timeout_keep_alive``; the
bounded shutdown is uvicorn's ``timeout_graceful_shutdown`` plus the app's cut of slow uploads
(``app/signals.py``).
"""

from __future__ import annotations

import copy
from typing import Any

import uvicorn

from app.connection_guard import ConnectionLimits as ConnectionLimits  # re-exported
from app.connection_guard import protocol_class
from app.settings import Settings


def server_config(settings: Settings, *, host: str, port: int, log_level: str) -> uvicorn.Config:
    """The uvicorn configuration that serves ``app.main:app`` with the settings' limits (the
    app inside ``ConnectionSignals``, behind ``GuardedConnection``: ``app.connection_guard``).

    The graceful-shutdown timeout counts from the end of the drain, so the process exits at
    most ``SSD_SHUTDOWN_TIMEOUT_S`` after SIGTERM.
    """
    limits = ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        body_timeout_s=settings.body_timeout_s,
        max_connections=settings.max_connections,
    )
    return uvicorn.Config(
        "app.connection_guard:guarded_app",
        factory=True,
        host=host,
        port=port,
        http=protocol_class(limits),
        # The app has no WebSocket routes, and an upgraded connection would leave the guard.
        ws="none",
        # reset_contextvars stays False (its default): each request's task must inherit its
        # connection's context, where ConnectionSignals finds the connection.
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=settings.shutdown_timeout_s - settings.drain_s,  # type: ignore[arg-type]
        log_level=log_level,
        log_config=logging_config(log_level),
        access_log=False,  # the app writes its own, as JSON (app/access.py)
        workers=1,
    )


def logging_config(log_level: str) -> dict[str, Any]:
    """Uvicorn's logging set-up, plus the app's loggers: ``app`` like ``uvicorn.error`` at
    ``log_level``, and ``app.access`` writing its JSON lines as they are to stdout (always)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["json_line"] = {"format": "%(message)s"}
    config["handlers"]["json_lines"] = {
        "formatter": "json_line",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stdout",
    }
    config["loggers"]["app"] = {
        "handlers": ["default"],
        "level": log_level.upper(),
        "propagate": False,
    }
    config["loggers"]["app.access"] = {
        "handlers": ["json_lines"],
        "level": "INFO",
        "propagate": False,
    }
    return config
