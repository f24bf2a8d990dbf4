"""``python -m app`` (``app/__main__.py``): settings errors stop it before it serves, and
Ctrl-C stops the served process quietly.

The settings error is tested by calling ``main`` in process; the Ctrl-C test uses the real
process, since its point is a signal sent to ``python -m app`` and its exit status.
"""

from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path

import pytest

from app.__main__ import main
from app.settings import get_settings
from tests.app.support import Server
from tests.model.weights.test_imagenet import _refusing_proxy


def test_invalid_setting_stops_the_server_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in [k for k in os.environ if k.startswith("SSD_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SSD_MAX_BATCH_SIZE", "many")
    get_settings.cache_clear()
    try:
        code = main(["--port", "0"])
    finally:
        get_settings.cache_clear()
    assert code != 0
    assert "invalid setting SSD_MAX_BATCH_SIZE='many'" in capsys.readouterr().err


def test_ctrl_c_stops_the_server_quietly(
    tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Started from a process whose urllib goes through a proxy that refuses everything (as
    # after an offline test, or behind a proxy without no_proxy): the readiness probe of the
    # loopback server must not go through it.
    _refusing_proxy(monkeypatch)
    monkeypatch.setattr(urllib.request, "_opener", None)  # restored after the test
    urllib.request.install_opener(urllib.request.build_opener())  # with the proxy
    server = Server(
        {"SSD_WEIGHTS": str(tiny_weights), "SSD_DEVICE": "cpu"}, tmp_path / "server.log"
    ).wait_ready()
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=30) == 0
    assert "Traceback" not in server.output()
    server.stop()
