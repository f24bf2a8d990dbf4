"""OpenAPI pieces shared by the routes: documented error responses and image request bodies."""

from __future__ import annotations

from typing import Any

from app.schemas import DeepStackError, ErrorResponse

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp")
_FILE = {"type": "string", "format": "binary"}

_ERROR_TEXT = {
    400: "The image is empty, undecodable or truncated (`invalid_image`).",
    408: "The body did not arrive within SSD_BODY_TIMEOUT_S, or slower than "
    "SSD_MIN_BODY_RATE bytes/s (`slow_upload`); the connection closes.",
    401: "API keys are on and the request has no key, or a wrong one (`unauthorized`); see "
    "WWW-Authenticate.",
    403: "Reloads are off: set SSD_ALLOW_RELOAD=true to allow them (`reload_disabled`).",
    404: "No model has the name given in `model` (`unknown_model`); GET /models lists them.",
    413: "The body is over SSD_MAX_UPLOAD_BYTES, or the image header declares more than "
    "SSD_MAX_IMAGE_PIXELS pixels, or a JPEG holds more than SSD_MAX_JPEG_SCANS scans "
    "(`too_large`).",
    415: "The bytes are not JPEG, PNG, WebP or BMP, whatever the declared type "
    "(`unsupported_type`).",
    422: "Bad parameters, a missing field or a malformed multipart body (`bad_request`); "
    "on a reload, weights that failed to load or to warm up (`reload_failed`).",
    500: "The batch this request was in failed, a server fault (`inference_failed`).",
    503: "The queue is full (`overloaded`), the model is not ready (`not_ready`) or the "
    "server is shutting down (`draining`); see Retry-After.",
    504: "The request waited longer than SSD_REQUEST_TIMEOUT_S (`timeout`).",
}


def error_responses(*statuses: int, deepstack: bool = False) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entries for these error statuses, all with the error body (DeepStack's
    shape for its routes)."""
    model = DeepStackError if deepstack else ErrorResponse
    return {status: {"model": model, "description": _ERROR_TEXT[status]} for status in statuses}


def image_body(field: str, *, many: bool) -> dict[str, Any]:
    """``openapi_extra`` describing a multipart upload in ``field`` (and, for one image, the
    raw body alternative)."""
    many_files = {"type": "array", "items": _FILE, "minItems": 1}
    file_schema: dict[str, Any] = many_files if many else _FILE
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {"type": "object", "required": [field], "properties": {field: file_schema}}
        }
    }
    if not many:
        content.update({media_type: {"schema": _FILE} for media_type in IMAGE_TYPES})
    return {"requestBody": {"required": True, "content": content}}
