"""The app factory and lifespan (``app/main.py``): start-up failures and readiness, in
process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch

from app.main import create_app
from app.settings import Settings, SettingsError
from tests.app.support import encode, in_process, shapes_image


def test_missing_weights_stop_start_up_naming_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.safetensors"
    app = create_app(Settings(weights=missing, device="cpu"))

    async def start() -> None:
        async with in_process(app):
            pass

    with pytest.raises(SettingsError, match=f"SSD_WEIGHTS='{missing}'.*No such file"):
        asyncio.run(start())


def test_unavailable_device_stops_start_up(tiny_weights: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    app = create_app(Settings(weights=tiny_weights, device="cuda"))

    async def start() -> None:
        async with in_process(app):
            pass

    with pytest.raises(SettingsError, match=r"SSD_DEVICE='cuda'.*CUDA is not available"):
        asyncio.run(start())


def test_not_ready_answers_503(tiny_weights: Path) -> None:
    app = create_app(Settings(weights=tiny_weights, device="cpu"))

    async def scenario() -> list[httpx.Response]:
        async with in_process(app) as client:
            ready = await client.get("/readyz")
            app.state.service.lifecycle.ready = False  # as before the warm-up batch has run
            return [
                ready,
                await client.get("/readyz"),
                await client.get("/healthz"),
                await client.post("/detect", content=encode(shapes_image(), "PNG")),
            ]

    ready, not_ready, health, detect = asyncio.run(scenario())
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"
    assert not_ready.headers["Retry-After"] == "1"
    assert health.status_code == 200
    assert detect.status_code == 503
