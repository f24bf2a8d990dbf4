"""Every error the service answers, its HTTP status and code, in one place.

Responses always have the body ``{"error": {"code": "...", "message": "..."}}`` (on the
DeepStack routes, under ``/v1/vision/``, DeepStack's ``{"success": false, "error": "...",
"code": STATUS, "reason": "..."}``) and never a stack trace. ``model/`` raises plain Python
errors; the call sites in ``app/`` wrap them in
the ``ServiceError`` that says what went wrong (a bad image, a failed batch), and the handlers
here turn those into responses.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# Seconds a client should wait before retrying a 503; one batch at most takes well under this.
RETRY_AFTER_S = 1


class ServiceError(Exception):
    """An error with its HTTP answer. ``reason`` labels ``ssd_rejected_total`` (None: not a
    rejection of the client's request, e.g. a server fault)."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    reason: ClassVar[str | None] = None
    retry_after: ClassVar[int | None] = None
    # Whether the connection closes after the answer (the rest of the request is not wanted).
    close_connection: ClassVar[bool] = False
    www_authenticate: ClassVar[str | None] = None  # the 401 challenge, for WWW-Authenticate

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidImageError(ServiceError):
    """The image is empty, undecodable or truncated."""

    status, code, reason = 400, "invalid_image", "invalid_image"


class TooLargeError(ServiceError):
    """The body is over SSD_MAX_UPLOAD_BYTES or the image over SSD_MAX_IMAGE_PIXELS."""

    status, code, reason = 413, "too_large", "too_large"


class UnsupportedTypeError(ServiceError):
    """The bytes are not JPEG, PNG, WebP or BMP (whatever the declared type)."""

    status, code, reason = 415, "unsupported_type", "unsupported_type"


class SlowUploadError(ServiceError):
    """The body did not arrive within SSD_BODY_TIMEOUT_S, or slower than SSD_MIN_BODY_RATE."""

    status, code, reason, close_connection = 408, "slow_upload", "slow_upload", True


class BadRequestError(ServiceError):
    """Bad parameters, a missing field, or a malformed multipart body."""

    status, code, reason = 422, "bad_request", "bad_request"


class UnknownModelError(ServiceError):
    """``?model=`` (or the reload route) names a model this server does not have."""

    status, code, reason = 404, "unknown_model", "bad_request"


class MissingKeyError(ServiceError):
    """API keys are on and the request carries none (``app.auth``)."""

    status, code, reason = 401, "unauthorized", "missing_key"
    www_authenticate = 'Bearer realm="ssd"'


class WrongKeyError(ServiceError):
    """API keys are on and the request's key is not one of them (or not an admin key where
    one is needed)."""

    status, code, reason = 401, "unauthorized", "wrong_key"
    www_authenticate = 'Bearer realm="ssd", error="invalid_token"'


class ReloadDisabledError(ServiceError):
    """The reload route is off (SSD_ALLOW_RELOAD is false)."""

    status, code = 403, "reload_disabled"


class ReloadFailedError(ServiceError):
    """The model's source failed to load or to warm up; the old copy goes on serving."""

    status, code = 422, "reload_failed"


class OverloadedError(ServiceError):
    """The queue is full."""

    status, code, reason, retry_after = 503, "overloaded", "overloaded", RETRY_AFTER_S


class NotReadyError(ServiceError):
    """The model is not loaded and warmed up yet."""

    status, code, retry_after = 503, "not_ready", RETRY_AFTER_S


class DrainingError(ServiceError):
    """The server got SIGTERM: it finishes what it has and takes nothing new."""

    status, code, retry_after = 503, "draining", RETRY_AFTER_S


class DeadlineExceededError(ServiceError):
    """The request waited longer than SSD_REQUEST_TIMEOUT_S."""

    status, code, reason = 504, "timeout", "timeout"


class ClientDisconnectedError(ServiceError):
    """The client went away before its answer: during its upload, or while its image waited;
    nobody reads this answer.

    499 is nginx's "client closed request", used so the request counter tells these apart.
    """

    status, code, reason = 499, "client_disconnected", "disconnected"


class InferenceFailedError(ServiceError):
    """The batch this request was in failed: a server fault, answered to every request in it."""

    status, code = 500, "inference_failed"


# The DeepStack API's routes (app.routes.deepstack), whose clients expect its error shape.
DEEPSTACK_PREFIX = "/v1/vision/"


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    request: Request | None = None,
    retry_after: int | None = None,
    close_connection: bool = False,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The JSON error body every failure uses (the DeepStack shape on its routes), with the
    request's id when it has one, and ``headers`` besides."""
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if close_connection:
        headers["Connection"] = "close"
    request_id = getattr(request.state, "request_id", None) if request is not None else None
    if request is not None and request.url.path.startswith(DEEPSTACK_PREFIX):
        body = {"success": False, "error": message, "code": status, "reason": code}
        if request_id is not None:
            body["request_id"] = request_id
        return JSONResponse(body, status_code=status, headers=headers)
    error = {"code": code, "message": message}
    if request_id is not None:
        error["request_id"] = request_id
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error as JSON: ServiceError, validation errors, HTTP errors, the rest."""

    def count_rejection(request: Request, reason: str | None) -> None:
        service = getattr(request.app.state, "service", None)
        if reason is not None and service is not None:
            service.metrics.rejected.labels(reason=reason).inc()

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        count_rejection(request, exc.reason)
        return error_response(
            exc.status,
            exc.code,
            exc.message,
            request=request,
            retry_after=exc.retry_after,
            close_connection=exc.close_connection,
            headers={"WWW-Authenticate": exc.www_authenticate} if exc.www_authenticate else None,
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        count_rejection(request, BadRequestError.reason)
        problems = []
        for item in exc.errors():
            where = ".".join(str(part) for part in item.get("loc", ()))
            problems.append(f"{where}: {item.get('msg', 'invalid')}")
        message = "; ".join(problems) or "invalid request"
        return error_response(422, BadRequestError.code, message, request=request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = HTTPStatus(exc.status_code).phrase
        code = phrase.lower().replace(" ", "_").replace("-", "_")
        message = exc.detail if isinstance(exc.detail, str) else phrase
        response = error_response(exc.status_code, code, message, request=request)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error", request=request)
