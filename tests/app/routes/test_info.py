"""GET /model (``app/routes/info.py``): the model served and the batching settings, in
process."""

from __future__ import annotations

import httpx
import pytest

from model.runtime import cpu_has_fast_bf16
from tests.app.support import CLASS_NAMES


@pytest.mark.anyio
async def test_model_endpoint(client: httpx.AsyncClient) -> None:
    body = (await client.get("/model")).json()
    assert body["name"] == "tiny"
    assert len(body["version"]) == 12
    assert body["class_names"] == CLASS_NAMES  # what the tiny checkpoint was saved with
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
