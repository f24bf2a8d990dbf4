"""Reading a request's image bytes: a size-capped body, then multipart fields or the raw body."""

from __future__ import annotations

from fastapi import Request
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import Message

from app.errors import BadRequestError, TooLargeError


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``max_bytes``.

    The declared Content-Length is checked first; the streamed size is checked as well, since
    a chunked body declares none.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise TooLargeError(f"the body is {declared} bytes; the most accepted is {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise TooLargeError(f"the body is over {max_bytes} bytes, the most this server accepts")
        chunks.append(chunk)
    return b"".join(chunks)


def is_multipart(request: Request) -> bool:
    """Whether the request declares a multipart/form-data body."""
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    return content_type == b"multipart/form-data"


async def form_images(request: Request, body: bytes, field: str, max_count: int) -> list[bytes]:
    """The files in the multipart ``field`` of ``body`` (already read, size-capped).

    Raises:
        BadRequestError: a malformed body, a missing field, a field that is not a file, or more
            than ``max_count`` files.
    """

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_count)
    except HTTPException as exc:  # Starlette's answer to a malformed or over-full body
        raise BadRequestError(f"multipart body refused: {exc.detail}") from None
    try:
        values = form.getlist(field)
        if not values:
            raise BadRequestError(f"missing multipart field {field!r} (the image file)")
        if len(values) > max_count:
            raise BadRequestError(
                f"{len(values)} files in field {field!r}; at most {max_count} per request"
            )
        files = []
        for value in values:
            if not isinstance(value, UploadFile):
                raise BadRequestError(f"multipart field {field!r} must be a file, not text")
            files.append(await value.read())
        return files
    finally:
        await form.close()
