"""Cross-origin requests from browsers: off unless ``SSD_CORS_ORIGINS`` names origins.

Starlette's ``CORSMiddleware`` does the work. The settings are read in the lifespan, after the
app is built, so this wrapper makes the middleware on the first request, from the settings the
service started with.
"""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

# What a page may send and read: its key, its request id, the multipart or image body.
ALLOWED_HEADERS = ["Authorization", "X-API-Key", "X-Request-ID", "Content-Type"]
EXPOSED_HEADERS = ["X-Request-ID", "Retry-After", "WWW-Authenticate"]


class OptionalCors:
    """``CORSMiddleware`` for the origins in the service's settings, or nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._inner: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._inner is None:
            service = getattr(scope["app"].state, "service", None)
            origins = service.settings.cors_origin_list() if service is not None else []
            if not origins:
                await self.app(scope, receive, send)
                return
            self._inner = CORSMiddleware(
                self.app,
                allow_origins=origins,
                allow_methods=["GET", "POST"],
                allow_headers=ALLOWED_HEADERS,
                expose_headers=EXPOSED_HEADERS,
                max_age=600,
            )
        await self._inner(scope, receive, send)
