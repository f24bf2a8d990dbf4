"""Reading a request's image bytes: a size-, time- and rate-capped body, then multipart fields or
the raw body."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive

from app.errors import (
    BadRequestError,
    ClientDisconnectedError,
    DrainingError,
    SlowUploadError,
    TooLargeError,
    UnsupportedTypeError,
)

# The minimum rate is averaged from the start of the body with this much slack, so a client
# whose first bytes are slow to arrive (TCP slow start, a phone waking its radio) is not cut
# at once; Apache's mod_reqtimeout uses the same idea (an initial timeout extended by MinRate).
BODY_RATE_GRACE_S = 2.0


@dataclass(frozen=True)
class BodyLimits:
    """How a request body must arrive: at most ``max_bytes``, all of it within ``timeout_s``
    of the headers, at an average of at least ``min_rate`` bytes/s after the grace period."""

    max_bytes: int
    timeout_s: float
    min_rate: float


async def read_body(request: Request, limits: BodyLimits, cut: asyncio.Event) -> bytes:
    """The whole body, refused as soon as it is known to break ``limits``.

    The declared Content-Length is checked first; the streamed size is checked as well, since
    a chunked body declares none.

    Raises:
        TooLargeError: over ``limits.max_bytes`` (413).
        SlowUploadError: past the body timeout or below the minimum rate (408).
        ClientDisconnectedError: the client went away before the body ended (499).
        DrainingError: ``cut`` was set (the server is shutting down) before the body ended.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise TooLargeError(
            f"the body is {declared} bytes; the most accepted is {limits.max_bytes}"
        )
    start = asyncio.get_running_loop().time()
    chunks, size = [], 0
    while True:
        # The latest time the next chunk may arrive: the body timeout, or the time by which
        # the bytes so far would have arrived at the minimum rate, whichever is sooner.
        due = start + min(limits.timeout_s, BODY_RATE_GRACE_S + size / limits.min_rate)
        message = await _receive_by(request.receive, due, cut)
        if message is None:
            elapsed = asyncio.get_running_loop().time() - start
            raise SlowUploadError(
                f"the body did not arrive in time: {size} bytes in {elapsed:.3g} s (it must "
                f"arrive within {limits.timeout_s:g} s at {limits.min_rate:g} bytes/s or more)"
            )
        if message["type"] == "http.disconnect":
            raise ClientDisconnectedError(f"the client went away after {size} bytes of its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limits.max_bytes:
            raise TooLargeError(
                f"the body is over {limits.max_bytes} bytes, the most this server accepts"
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _receive_by(receive: Receive, due: float, cut: asyncio.Event) -> Message | None:
    """The next ASGI message, or None if it has not come by ``due`` (event-loop time).

    Raises:
        DrainingError: ``cut`` was set first.
    """
    if cut.is_set():
        raise DrainingError("the server is shutting down; the upload was cut before it ended")
    receiving = asyncio.ensure_future(receive())
    cutting = asyncio.ensure_future(cut.wait())
    timeout = max(0.0, due - asyncio.get_running_loop().time())
    try:
        done, _ = await asyncio.wait(
            {receiving, cutting}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for task in (receiving, cutting):
            task.cancel()
    if receiving in done:
        return receiving.result()
    if cutting in done:
        raise DrainingError("the server is shutting down; the upload was cut before it ended")
    return None


@dataclass(frozen=True)
class Upload:
    """What a request body carried: its images, and its multipart text fields (none for a raw
    body), such as DeepStack's ``min_confidence``."""

    images: list[bytes]
    fields: dict[str, str] = field(default_factory=dict)


async def read_images(
    request: Request,
    limits: BodyLimits,
    cut: asyncio.Event,
    name: str,
    max_count: int,
    *,
    raw: bool,
) -> Upload:
    """The images a request uploads: the files of the multipart field ``name`` (at most
    ``max_count``), with the form's text fields, or, where ``raw`` allows it, the raw body as
    one image.

    Raises:
        as ``read_body`` and ``read_form``;
        UnsupportedTypeError: the body is not multipart and ``raw`` is False.
    """
    body = await read_body(request, limits, cut)
    if is_multipart(request):
        return await read_form(request, body, name, max_count)
    if not raw:
        raise UnsupportedTypeError(f"send multipart/form-data with one or more files in `{name}`")
    return Upload([body])


def is_multipart(request: Request) -> bool:
    """Whether the request declares a multipart/form-data body."""
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    return content_type == b"multipart/form-data"


async def read_form(request: Request, body: bytes, field: str, max_count: int) -> Upload:
    """The files in the multipart ``field`` of ``body`` (already read, size-capped), and the
    form's text fields (the last value of each).

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
        texts = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        return Upload(files, texts)
    finally:
        await form.close()
