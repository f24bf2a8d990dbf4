"""Offline for real: every HTTP(S) request of this process goes to a proxy that refuses it."""

from __future__ import annotations

import socket

import pytest


def use_refusing_proxy(monkeypatch: pytest.MonkeyPatch) -> str:
    """Point ``http(s)_proxy`` (both spellings) at a port on 127.0.0.1 that nobody listens on,
    and clear ``no_proxy``, for the rest of the test.

    Anything that downloads through urllib (torch.hub, torchvision's weights API) then fails at
    once with a refused connection, as on a host without internet, instead of reaching the
    network or waiting for a timeout. Loopback clients that must not go through it build their
    own opener without proxies (``server_process``). Returns the proxy's ``host:port``.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free when asked, so nothing answers there
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return f"127.0.0.1:{port}"
