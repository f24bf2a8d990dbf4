"""Dynamic batching: batches under concurrency, a full queue, deadlines, disconnected clients,
failures inside a batch, and per-request thresholds within one forward pass."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app.main import create_app
from app.settings import Settings
from model import Detector
from tests.app.support import Server, encode, in_process, metric, shapes_image

PNG = encode(shapes_image((320, 240)), "PNG")
# Noise: random weights on a flat background give many exactly tied scores, and NMS among
# tied boxes depends on visiting order; noise keeps the scores distinct.
NOISE = encode(
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)),
    "PNG",
)
CLIENTS = 32


async def _post_many(url: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(url + "/detect", content=PNG, headers={"Content-Type": "image/png"})
                for _ in range(count)
            )
        )


def test_concurrent_clients_are_batched(server: Server) -> None:
    before = server.metrics()
    responses = asyncio.run(_post_many(server.url, CLIENTS))
    assert [r.status_code for r in responses] == [200] * CLIENTS
    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    batches = delta("ssd_batch_size_count")
    assert delta("ssd_batch_size_sum") == CLIENTS  # every image ran exactly once
    assert delta("ssd_images_total") == CLIENTS
    # Batches of one image fall in the le="1" bucket; fewer of those than batches means at
    # least one batch held several images.
    singles = delta("ssd_batch_size_bucket", le="1.0")
    assert singles < batches < CLIENTS, (singles, batches)
    print(f"{CLIENTS} clients: {batches:.0f} batches, mean size {CLIENTS / batches:.2f}")


# ---- a small queue: full queue and disconnected clients (real sockets) ---------------------


@pytest.fixture(scope="module")
def queue_server(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Queue of one image, batches formed after 1.5 s unless 8 images wait: a request sits in
    the queue long enough for the next to find it full, or for its client to leave."""
    env = {
        "SSD_WEIGHTS": str(tiny_weights),
        "SSD_DEVICE": "cpu",
        "SSD_MAX_QUEUE": "1",
        "SSD_MAX_BATCH_SIZE": "8",
        "SSD_MAX_WAIT_MS": "1500",
        "SSD_MAX_IMAGES_PER_REQUEST": "1",
        "SSD_REQUEST_TIMEOUT_S": "30",
    }
    log = tmp_path_factory.mktemp("queue") / "uvicorn.log"
    running = Server(env, log).wait_ready()
    yield running
    running.stop()


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def test_full_queue_gives_503_and_nothing_else_breaks(queue_server: Server) -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=queue_server.url, timeout=30) as client:
            first = asyncio.create_task(
                client.post("/detect", content=PNG, headers={"Content-Type": "image/png"})
            )
            await _wait_for(lambda: metric(queue_server.metrics(), "ssd_queue_depth") == 1)
            second = await client.post(
                "/detect", content=PNG, headers={"Content-Type": "image/png"}
            )
            return await first, second

    text = queue_server.metrics()
    before = metric(text, "ssd_rejected_total", reason="overloaded")
    decodes = metric(text, "ssd_stage_duration_seconds_count", stage="decode")
    first, second = asyncio.run(scenario())
    assert second.status_code == 503
    # Refused before it cost a decode: only the queued request's image was decoded.
    decoded = metric(queue_server.metrics(), "ssd_stage_duration_seconds_count", stage="decode")
    assert decoded == decodes + 1
    assert second.json()["error"]["code"] == "overloaded"
    assert int(second.headers["Retry-After"]) >= 1
    assert first.status_code == 200, first.text  # the queued request is answered normally
    text = queue_server.metrics()
    assert metric(text, "ssd_rejected_total", reason="overloaded") == before + 1
    assert httpx.get(queue_server.url + "/healthz").status_code == 200
    assert httpx.get(queue_server.url + "/readyz").status_code == 200
    again = httpx.post(
        queue_server.url + "/detect", content=PNG, headers={"Content-Type": "image/png"}, timeout=30
    )
    assert again.status_code == 200


def test_refused_requests_are_refused_before_they_cost_a_decode(queue_server: Server) -> None:
    # Six arrive at once to an empty queue of one: all pass the first look at the queue, but
    # the first to reserve its place takes it, and the others are refused before decoding.
    decodes = metric(queue_server.metrics(), "ssd_stage_duration_seconds_count", stage="decode")
    responses = asyncio.run(_post_many(queue_server.url, 6))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 503, 503, 503, 503, 503], statuses
    decoded = metric(queue_server.metrics(), "ssd_stage_duration_seconds_count", stage="decode")
    assert decoded == decodes + 1


def test_disconnected_client_is_dropped(queue_server: Server) -> None:
    request = (
        f"POST /detect HTTP/1.1\r\nHost: 127.0.0.1:{queue_server.port}\r\n"
        f"Content-Type: image/png\r\nContent-Length: {len(PNG)}\r\n\r\n"
    ).encode() + PNG

    async def scenario() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", queue_server.port)
        writer.write(request)
        await writer.drain()
        # Queued, waiting for its batch (1.5 s): hang up now.
        await _wait_for(lambda: metric(queue_server.metrics(), "ssd_queue_depth") == 1)
        writer.close()
        await writer.wait_closed()

    text = queue_server.metrics()
    dropped, images = (
        metric(text, "ssd_rejected_total", reason="disconnected"),
        metric(text, "ssd_images_total"),
    )
    asyncio.run(scenario())
    end = time.monotonic() + 10
    while metric(queue_server.metrics(), "ssd_rejected_total", reason="disconnected") == dropped:
        assert time.monotonic() < end, "the disconnected request was not dropped"
        time.sleep(0.1)
    text = queue_server.metrics()
    assert metric(text, "ssd_rejected_total", reason="disconnected") == dropped + 1
    assert metric(text, "ssd_images_total") == images  # it never reached the model
    assert metric(text, "ssd_queue_depth") == 0


# ---- in-process: deadlines, failures, per-request parameters -------------------------------


def _settings(weights: Path, **overrides: object) -> Settings:
    return Settings(weights=weights, device="cpu", **overrides)


def test_passed_deadline_gives_504(tiny_weights: Path, one_thread: None) -> None:
    app = create_app(_settings(tiny_weights, request_timeout_s=0.2, max_wait_ms=3000))

    async def scenario() -> tuple[httpx.Response, str]:
        async with in_process(app) as client:
            response = await client.post(
                "/detect", content=PNG, headers={"Content-Type": "image/png"}
            )
            return response, (await client.get("/metrics")).text

    response, text = asyncio.run(scenario())
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    assert metric(text, "ssd_rejected_total", reason="timeout") == 1
    assert metric(text, "ssd_queue_depth") == 0  # the expired request left the queue
    assert metric(text, "ssd_images_total") == 0


class FaultyDetector(Detector):
    """A real Detector whose forward pass or decoding can be made to fail (fault injection)."""

    fail_forward = False
    short_decode = False

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fail_forward:
            raise RuntimeError("injected forward failure")
        return super().forward(inputs)

    def decode(self, *args, **kwargs):
        results = super().decode(*args, **kwargs)
        return results[:-1] if self.short_decode else results


def _post_concurrently(client: httpx.AsyncClient, count: int, query: str = ""):
    return asyncio.gather(
        *(
            client.post("/detect" + query, content=PNG, headers={"Content-Type": "image/png"})
            for _ in range(count)
        )
    )


@pytest.mark.parametrize("fault", ["fail_forward", "short_decode"])
def test_failure_inside_a_batch_answers_every_request(
    tiny_weights: Path, one_thread: None, fault: str
) -> None:
    detector = FaultyDetector.load(tiny_weights, device="cpu")
    app = create_app(_settings(tiny_weights, max_batch_size=4, max_wait_ms=2000), detector)

    async def scenario():
        async with in_process(app) as client:
            setattr(detector, fault, True)
            failed = await _post_concurrently(client, 4)
            setattr(detector, fault, False)
            healthy = await client.get("/healthz"), await client.get("/readyz")
            after = await _post_concurrently(client, 4)
            return failed, healthy, after, (await client.get("/metrics")).text

    failed, healthy, after, text = asyncio.run(scenario())
    for response in failed:
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "inference_failed"
        assert "Traceback" not in response.text
    assert [r.status_code for r in healthy] == [200, 200]
    assert [r.status_code for r in after] == [200] * 4
    assert metric(text, "ssd_batch_size_count") == 1  # only the good batch is recorded
    assert metric(text, "ssd_requests_total", route="/detect", status="500") == 4


def test_per_request_parameters_in_one_forward_pass(tiny_weights: Path, one_thread: None) -> None:
    detector = Detector.load(tiny_weights, device="cpu")
    app = create_app(_settings(tiny_weights, max_batch_size=3, max_wait_ms=3000), detector)
    queries = [
        "?score_threshold=0.2&max_detections=5",
        "?score_threshold=0.0&max_detections=2",
        "?score_threshold=0.9&max_detections=100",
    ]

    async def scenario():
        async with in_process(app) as client:
            responses = await asyncio.gather(
                *(
                    client.post("/detect" + q, content=NOISE, headers={"Content-Type": "image/png"})
                    for q in queries
                )
            )
            return responses, (await client.get("/metrics")).text

    responses, text = asyncio.run(scenario())
    assert metric(text, "ssd_batch_size_count") == 1  # all three in one batch
    assert metric(text, "ssd_batch_size_sum") == 3
    assert [len(r.json()["detections"]) for r in responses][:2] == [5, 2]
    # The reference: the same three images forwarded as one batch (same numerics as the
    # server's batch), each decoded on its own at its own scalar threshold and cap.
    inputs, size = detector.prepare(Image.open(io.BytesIO(NOISE)))
    loc, conf = detector.forward(torch.stack([inputs] * 3))
    params = [(0.2, 5), (0.0, 2), (0.9, 100)]
    for i, (response, (threshold, cap)) in enumerate(zip(responses, params, strict=True)):
        [alone] = detector.decode(loc[i : i + 1], conf[i : i + 1], [size], threshold, cap)
        got = response.json()["detections"]
        assert len(got) <= cap
        assert all(d["score"] > threshold - 1e-4 for d in got)
        assert [d["label"] for d in got] == alone.labels
        assert [d["score"] for d in got] == pytest.approx(alone.scores.tolist(), abs=1e-4)
