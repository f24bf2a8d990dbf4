"""The app factory and lifespan: start-up failures, readiness, /model, /docs and OpenAPI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import torch

from app.main import create_app
from app.settings import Settings, SettingsError
from model.runtime import cpu_has_fast_bf16
from tests.app.support import (
    REPO,
    Server,
    encode,
    free_port,
    in_process,
    server_command,
    shapes_image,
)


def test_invalid_setting_stops_the_server_naming_the_variable() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSD_")}
    env.update(SSD_MAX_BATCH_SIZE="many", OMP_NUM_THREADS="1")
    result = subprocess.run(
        server_command(free_port()),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "invalid setting SSD_MAX_BATCH_SIZE='many'" in result.stderr


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


def test_not_ready_answers_503(tiny_weights: Path, one_thread: None) -> None:
    app = create_app(Settings(weights=tiny_weights, device="cpu"))

    async def scenario() -> list[httpx.Response]:
        async with in_process(app) as client:
            ready = await client.get("/readyz")
            app.state.service.ready = False  # as before the warm-up batch has run
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


def test_model_endpoint(server: Server) -> None:
    body = httpx.get(server.url + "/model", timeout=10).json()
    assert body["name"] == "tiny"
    assert len(body["version"]) == 12
    assert body["class_names"] == ["circle", "square", "triangle", "star", "cross", "bar"]
    assert body["input_size"] == 300
    # SSD_PRECISION=auto: bf16 on CPUs that do bf16 natively, else fp32
    assert (body["device"], body["precision"]) == ("cpu", "bf16" if cpu_has_fast_bf16() else "fp32")
    assert body["batching"] == {
        "max_batch_size": 8,
        "max_wait_ms": 30.0,
        "max_queue": 64,
        "request_timeout_s": 60.0,
        "max_images_per_request": 16,
    }


def test_openapi_describes_the_api(server: Server) -> None:
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    paths = spec["paths"]
    assert set(paths) == {
        "/detect",
        "/detect/batch",
        "/healthz",
        "/readyz",
        "/metrics",
        "/model",
        "/",
    }
    detect = paths["/detect"]["post"]
    assert detect["description"].startswith("Detect objects in one image")
    content = detect["requestBody"]["content"]
    assert set(content) == {
        "multipart/form-data",
        "image/jpeg",
        "image/png",
        "image/webp",
        "image/bmp",
    }
    assert content["multipart/form-data"]["schema"]["required"] == ["image"]
    params = {p["name"]: p for p in detect["parameters"]}
    threshold = params["score_threshold"]["schema"]["anyOf"][0]
    assert (threshold["minimum"], threshold["maximum"]) == (0, 1)
    limits = params["max_detections"]["schema"]["anyOf"][0]
    assert (limits["minimum"], limits["maximum"]) == (1, 1000)
    responses = detect["responses"]
    assert set(responses) == {"200", "400", "408", "413", "415", "422", "500", "503", "504"}
    ok = responses["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/DetectResponse")
    assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )
    batch = paths["/detect/batch"]["post"]["requestBody"]["content"]
    assert batch["multipart/form-data"]["schema"]["properties"]["images"]["type"] == "array"
    schemas = spec["components"]["schemas"]
    assert set(schemas["Box"]["properties"]) == {"x_min", "y_min", "x_max", "y_max"}
    docs = httpx.get(server.url + "/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_every_route_has_a_description(server: Server) -> None:
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("description"), f"{method.upper()} {path}"


def test_ctrl_c_stops_the_server_quietly(tiny_weights: Path, tmp_path: Path) -> None:
    server = Server(
        {"SSD_WEIGHTS": str(tiny_weights), "SSD_DEVICE": "cpu"}, tmp_path / "server.log"
    ).wait_ready()
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=30) == 0
    assert "Traceback" not in server.output()
    server.stop()
