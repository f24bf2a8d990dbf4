"""Every HTTP request: its id, its metrics and one access-log line.

The id is the client's ``X-Request-ID`` when it is a sane token, else a new one; it is echoed
in the response header and in error bodies. The log line is one JSON object per request on the
``app.access`` logger: id, method, route, status, latency, and for detection requests the
images' sizes and the size of the batch each ran in.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("app.access")

REQUEST_ID_HEADER = b"x-request-id"
# A client's id is kept if it is a short token of safe characters (it goes into a log line and
# a header); otherwise the request gets a new one.
_SAFE_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
# Requests that match no route share one label value, so random paths cannot blow up the
# number of time series.
UNMATCHED_ROUTE = "unmatched"


def route_label(scope: Scope) -> str:
    """The matched route's path template; for a mounted app (the docs' static files), the
    mount's path, so paths under it share one label; for the plain routes FastAPI adds
    (/docs, /openapi.json), which have no parameters, the path itself."""
    route = scope.get("route")
    if route is not None:
        return route.path
    endpoint = scope.get("endpoint")
    if endpoint is None:
        return UNMATCHED_ROUTE
    for candidate in scope["app"].routes:
        if isinstance(candidate, Mount) and candidate.app is endpoint:
            return candidate.path
    return scope["path"]


def request_id(scope: Scope) -> str:
    """The client's X-Request-ID if it is safe to repeat, else a new random one."""
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER and _SAFE_ID.fullmatch(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


class AccessMiddleware:
    """Gives each HTTP request its id, counts and times it by route template and status code,
    and writes its access-log line.

    It reads the metrics from ``app.state.service`` at request time, since they are built in
    the lifespan; requests before that are logged but not counted.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid = request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = 500  # what the client sees if the app raises before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", ()),
                    (REQUEST_ID_HEADER, rid.encode("ascii")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = route_label(scope)
            service = getattr(scope["app"].state, "service", None)
            if service is not None:
                service.metrics.request_duration.labels(route=route).observe(elapsed)
                service.metrics.requests.labels(route=route, status=str(status)).inc()
            line: dict[str, Any] = {
                "request_id": rid,
                "method": scope["method"],
                "route": route,
                "status": status,
                "latency_ms": round(elapsed * 1000, 2),
            }
            if "image_sizes" in state:
                line["image_sizes"] = state["image_sizes"]
                line["batch_sizes"] = state.get("batch_sizes")
            log.info(json.dumps(line))
