"""GET /model (``app/routes/info.py``): the model served and the batching settings, in
process."""

from __future__ import annotations

import httpx
import pytest

from model import Detector
from tests.app.support import CLASS_NAMES


@pytest.mark.anyio
async def test_model_endpoint(client: httpx.AsyncClient, tiny_detector: Detector) -> None:
    body = (await client.get("/model")).json()
    assert body["name"] == "tiny"
    assert len(body["version"]) == 12
    assert body["class_names"] == CLASS_NAMES  # what the tiny checkpoint was saved with
    assert body["input_size"] == 300
    # SSD_PRECISION=auto: the precision the Detector measured fastest on this machine
    choice = tiny_detector.precision_choice
    assert choice is not None and body["precision"] == choice.precision == tiny_detector.precision
    assert body["device"] == "cpu"
    assert body["batching"] == {
        "max_batch_size": 8,
        "max_wait_ms": 30.0,
        "max_queue": 64,
        "request_timeout_s": 60.0,
        "max_images_per_request": 16,
    }
