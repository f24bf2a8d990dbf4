"""API keys: off unless the settings give some.

With keys on (``SSD_API_KEYS``, ``SSD_API_KEYS_FILE``, ``SSD_ADMIN_KEYS`` or
``SSD_ADMIN_KEYS_FILE``), every route that detects or tells about the models needs a key:

* a client key or an admin key for detection and model information (``client_key``);
* an admin key for ``POST /models/NAME/reload`` (``admin_key``), or a client key where no admin
  key is set.

A key comes in ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; on the DeepStack routes
also in the form field ``api_key``, checked once the body is read (``check_form_key``). The
probes (``/healthz``, ``/readyz``), ``/metrics``, the OpenAPI docs and the demo page's HTML stay
open: probes and scrapers carry no keys, and the docs and page show nothing of the models (the
page asks for a key before it detects).

A missing or wrong key is answered 401 with ``WWW-Authenticate: Bearer`` and counted in
``ssd_rejected_total`` by reason (``missing_key``, ``wrong_key``). Keys are compared as SHA-256
digests with ``hmac.compare_digest``, against every key, so the time taken tells nothing of
which key came close; they are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.errors import MissingKeyError, WrongKeyError

# auto_error=False: a missing key is ours to answer (401 JSON, counted), not FastAPI's 403.
_BEARER = HTTPBearer(auto_error=False, description="an API key as a Bearer token")
_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class Keys:
    """The keys the service accepts, as digests. Empty: authentication is off."""

    clients: tuple[bytes, ...] = ()
    admins: tuple[bytes, ...] = ()

    @classmethod
    def of(cls, clients: Iterable[str], admins: Iterable[str]) -> Keys:
        return cls(tuple(map(_digest, clients)), tuple(map(_digest, admins)))

    @property
    def on(self) -> bool:
        return bool(self.clients or self.admins)

    def allows(self, key: str | None, *, admin: bool) -> bool:
        """Whether ``key`` opens a route (an admin route when ``admin``): compared with every
        key of the kind, in constant time for each."""
        if key is None:
            return False
        wanted = self.admins if admin and self.admins else self.clients + self.admins
        digest = _digest(key)
        matches = [hmac.compare_digest(digest, known) for known in wanted]
        return any(matches)


def presented_key(bearer: HTTPAuthorizationCredentials | None, header: str | None) -> str | None:
    """The key a request's headers carry: ``X-API-Key``, else a Bearer token."""
    if header:
        return header
    return bearer.credentials if bearer is not None else None


def _check(request: Request, key: str | None, *, admin: bool) -> None:
    keys: Keys = request.app.state.service.keys
    if not keys.on:
        return
    if key is None:
        raise MissingKeyError("this route needs an API key: Authorization: Bearer KEY or X-API-Key")
    if not keys.allows(key, admin=admin):
        kind = "an admin key" if admin and keys.admins else "a valid API key"
        raise WrongKeyError(f"the key given is not {kind}")


async def client_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
    header: Annotated[str | None, Security(_HEADER)],
) -> None:
    """A dependency: a client or admin key, when keys are on."""
    _check(request, presented_key(bearer, header), admin=False)


async def admin_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
    header: Annotated[str | None, Security(_HEADER)],
) -> None:
    """A dependency: an admin key (a client key where no admin key is set), when keys are on."""
    _check(request, presented_key(bearer, header), admin=True)


async def header_key_if_any(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
    header: Annotated[str | None, Security(_HEADER)],
) -> str | None:
    """A dependency for the DeepStack routes: checks a key sent in the headers, and gives it;
    None when the headers carry none (the form's ``api_key`` is checked after the body)."""
    key = presented_key(bearer, header)
    if key is not None:
        _check(request, key, admin=False)
    return key


def check_form_key(request: Request, fields: dict[str, str]) -> None:
    """The DeepStack form field ``api_key``, for a request whose headers carried no key."""
    _check(request, fields.get("api_key") or None, admin=False)


ClientKey = Depends(client_key)
AdminKey = Depends(admin_key)
