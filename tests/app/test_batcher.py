"""Dynamic batching (``app/batcher.py``): batches under concurrency, a lone request that does
not wait for company, a full queue, deadlines, disconnected clients, failures inside a batch,
and per-request thresholds within one forward pass. All in process (the app factory over
httpx's ASGI transport).

A request waits in the queue for its batch only while another is on its way (announced, its
upload or decoding not done). The tests that need a request to sit in the queue keep one on
its way: an upload that stalls part-way (``_on_its_way``), as a slow client's would."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image

from app.batcher import Batcher, Job
from app.errors import OverloadedError
from app.main import create_app
from app.metrics import Metrics
from app.settings import Settings
from model import Detector
from model.network.postprocess import Cut
from tests.app.support import (
    PATIENCE_S,
    detect_scope,
    encode,
    in_process,
    metric,
    shapes_image,
)

PNG = encode(shapes_image((320, 240)), "PNG")
# Noise: random weights on a flat background give many exactly tied scores, and NMS among
# tied boxes depends on visiting order; noise keeps the scores distinct.
NOISE = encode(
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)),
    "PNG",
)
CLIENTS = 32


def _post_many(client: httpx.AsyncClient, count: int) -> Awaitable[list[httpx.Response]]:
    return asyncio.gather(
        *(
            client.post("/detect", content=PNG, headers={"Content-Type": "image/png"})
            for _ in range(count)
        )
    )


@pytest.mark.anyio
async def test_concurrent_clients_are_batched(client: httpx.AsyncClient) -> None:
    before = (await client.get("/metrics")).text
    responses = await _post_many(client, CLIENTS)
    assert [r.status_code for r in responses] == [200] * CLIENTS
    after = (await client.get("/metrics")).text

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


# ---- a small queue: full queue and disconnected clients -----------------------------------


# How long the ``queued`` app's batches wait for company. The tests act while a request waits
# (a second request, a hang-up) and time a lone request against it, which takes well under
# 0.1 s in process on a quiet machine: 4 s leaves room for a machine many times slower.
QUEUED_WAIT_S = 4.0


@pytest.fixture
async def queued(
    tiny_weights: Path, tiny_detector: Detector, anyio_backend: str
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An app with a queue of one image, batches formed after ``QUEUED_WAIT_S`` unless 8 images
    wait or nothing more is on its way: with a stalled upload on its way, a request sits in
    the queue long enough for the next to find it full, or for its client to leave. Gives the
    app and a client calling it in process."""
    settings = _settings(
        tiny_weights,
        max_queue=1,
        max_batch_size=8,
        max_wait_ms=QUEUED_WAIT_S * 1000,
        min_body_rate=1,  # the stalled upload (8 bytes) is not cut for slowness for 8 s
        max_images_per_request=1,
        request_timeout_s=30,
    )
    app = create_app(settings, tiny_detector)
    async with in_process(app) as client:
        yield app, client


async def _wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = PATIENCE_S) -> None:
    end = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def _depth_is(client: httpx.AsyncClient, depth: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return metric((await client.get("/metrics")).text, "ssd_queue_depth") == depth

    return check


@pytest.mark.anyio
async def test_full_queue_gives_503_and_nothing_else_breaks(
    queued: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = queued
    text = (await client.get("/metrics")).text
    before = metric(text, "ssd_rejected_total", reason="overloaded")
    decodes = metric(text, "ssd_stage_duration_seconds_count", stage="decode")
    async with _on_its_way(app):
        first_task = asyncio.create_task(
            client.post("/detect", content=PNG, headers={"Content-Type": "image/png"})
        )
        await _wait_for(_depth_is(client, 1))
        second = await client.post("/detect", content=PNG, headers={"Content-Type": "image/png"})
        first = await first_task
    assert second.status_code == 503
    # Refused before it cost a decode: only the queued request's image was decoded.
    text = (await client.get("/metrics")).text
    assert metric(text, "ssd_stage_duration_seconds_count", stage="decode") == decodes + 1
    assert second.json()["error"]["code"] == "overloaded"
    assert int(second.headers["Retry-After"]) >= 1
    assert first.status_code == 200, first.text  # the queued request is answered normally
    text = (await client.get("/metrics")).text
    assert metric(text, "ssd_rejected_total", reason="overloaded") == before + 1
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
    again = await client.post("/detect", content=PNG, headers={"Content-Type": "image/png"})
    assert again.status_code == 200


@pytest.mark.anyio
async def test_refused_requests_are_refused_before_they_cost_a_decode(
    queued: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    # Six arrive at once to an empty queue of one: all pass the first look at the queue, but
    # the first to reserve its place takes it, and the others are refused before decoding.
    _, client = queued

    async def decodes() -> float:
        text = (await client.get("/metrics")).text
        return metric(text, "ssd_stage_duration_seconds_count", stage="decode")

    before = await decodes()
    responses = await _post_many(client, 6)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 503, 503, 503, 503, 503], statuses
    assert await decodes() == before + 1


async def _post_then_hang_up(
    app: FastAPI, body: bytes, hang_up: asyncio.Event, *, sent_of: int | None = None
) -> list[dict]:
    """POST ``body`` to /detect straight through the ASGI interface, as a server would pass it
    on, and report the client gone (``http.disconnect``) once ``hang_up`` is set; returns the
    messages the app sent. With ``sent_of``, the request announces a body of that many bytes
    and stalls after ``body`` until it hangs up."""
    scope = detect_scope(sent_of or len(body))
    sent: list[dict] = []
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": sent_of is not None}
        if not hang_up.is_set():  # a server's receive blocks until the client goes away
            await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@contextlib.asynccontextmanager
async def _on_its_way(app: FastAPI) -> AsyncIterator[None]:
    """A request on its way to the queue for the ``with`` block: its upload stalls after a
    few bytes of a PNG, until it hangs up at the end (and is answered nothing)."""
    hang_up = asyncio.Event()
    request = asyncio.create_task(_post_then_hang_up(app, PNG[:8], hang_up, sent_of=len(PNG)))
    await _wait_for(lambda: _on_the_way(app, 1))
    try:
        yield
    finally:
        hang_up.set()
        await request


async def _on_the_way(app: FastAPI, count: int) -> bool:
    return app.state.service.registry.get().batcher.admitted == count


@pytest.mark.anyio
async def test_a_lone_request_does_not_wait_for_company(
    queued: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    # Batches wait up to QUEUED_WAIT_S for more images, but with nothing else on its way a
    # request runs at once; with a stalled upload on its way, the same request waits it out.
    app, client = queued
    started = time.monotonic()
    alone = await client.post("/detect", content=PNG, headers={"Content-Type": "image/png"})
    alone_s = time.monotonic() - started
    async with _on_its_way(app):
        started = time.monotonic()
        waited = await client.post("/detect", content=PNG, headers={"Content-Type": "image/png"})
        waited_s = time.monotonic() - started
    assert alone.status_code == waited.status_code == 200
    assert waited_s >= QUEUED_WAIT_S > alone_s, (alone_s, waited_s)
    assert await _on_the_way(app, 0)  # the stalled request's hang-up ended its announcement


@pytest.mark.anyio
async def test_disconnected_client_is_dropped(queued: tuple[FastAPI, httpx.AsyncClient]) -> None:
    app, client = queued
    text = (await client.get("/metrics")).text
    dropped, images = (
        metric(text, "ssd_rejected_total", reason="disconnected"),
        metric(text, "ssd_images_total"),
    )
    hang_up = asyncio.Event()
    async with _on_its_way(app):
        request = asyncio.create_task(_post_then_hang_up(app, PNG, hang_up))
        # Queued, waiting for its batch (QUEUED_WAIT_S): hang up now.
        await _wait_for(_depth_is(client, 1))
        hang_up.set()
        end = time.monotonic() + 10
        while True:
            text = (await client.get("/metrics")).text
            if metric(text, "ssd_rejected_total", reason="disconnected") != dropped:
                break
            assert time.monotonic() < end, "the disconnected request was not dropped"
            await asyncio.sleep(0.1)
        await request
        text = (await client.get("/metrics")).text
        assert metric(text, "ssd_rejected_total", reason="disconnected") == dropped + 1
        assert metric(text, "ssd_images_total") == images  # it never reached the model
        assert metric(text, "ssd_queue_depth") == 0
    # The stalled upload's hang-up counts too: a client gone before its answer.
    text = (await client.get("/metrics")).text
    assert metric(text, "ssd_rejected_total", reason="disconnected") == dropped + 2


# ---- deadlines, failures, per-request parameters -------------------------------------------


def _settings(weights: Path, **overrides: object) -> Settings:
    return Settings(weights=weights, device="cpu", **overrides)


def test_passed_deadline_gives_504(tiny_weights: Path) -> None:
    app = create_app(_settings(tiny_weights, request_timeout_s=0.2, max_wait_ms=3000))

    async def scenario() -> tuple[httpx.Response, str]:
        async with in_process(app) as client, _on_its_way(app):  # the batch waits 3 s for it
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
    """A real Detector whose batch can be made to fail, or to answer one image short (fault
    injection)."""

    fail_forward = False
    short_answer = False

    def run_batch(self, *args, **kwargs):
        if self.fail_forward:
            raise RuntimeError("injected forward failure")
        result = super().run_batch(*args, **kwargs)
        if self.short_answer:
            return dataclasses.replace(result, detections=result.detections[:-1])
        return result


def _post_concurrently(client: httpx.AsyncClient, count: int, query: str = ""):
    return asyncio.gather(
        *(
            client.post("/detect" + query, content=PNG, headers={"Content-Type": "image/png"})
            for _ in range(count)
        )
    )


@pytest.mark.parametrize("fault", ["fail_forward", "short_answer"])
def test_failure_inside_a_batch_answers_every_request(tiny_weights: Path, fault: str) -> None:
    detector = FaultyDetector.load(tiny_weights, device="cpu", precision="fp32")
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
    # Only the good images are recorded (in one batch or more, as they reach the queue).
    assert metric(text, "ssd_batch_size_sum") == 4
    assert metric(text, "ssd_requests_total", route="/detect", status="500") == 4


def test_per_request_parameters_in_one_forward_pass(tiny_weights: Path) -> None:
    detector = Detector.load(tiny_weights, device="cpu", precision="fp32")
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
    # The reference: the same three images run as one batch with no cut (same numerics as the
    # server's batch), each cut by hand to its own threshold and cap.
    inputs, size = detector.prepare(Image.open(io.BytesIO(NOISE)))
    uncut = detector.run_batch([inputs] * 3, [size] * 3, [Cut(0.0, 1000)] * 3).detections
    params = [(0.2, 5), (0.0, 2), (0.9, 100)]
    for response, reference, (threshold, cap) in zip(responses, uncut, params, strict=True):
        keep = [i for i, score in enumerate(reference.scores.tolist()) if score > threshold][:cap]
        got = response.json()["detections"]
        assert len(got) <= cap
        assert [d["label"] for d in got] == [reference.labels[i] for i in keep]
        assert [d["score"] for d in got] == pytest.approx(
            [reference.scores[i].item() for i in keep], abs=1e-4
        )


class GatedDetector(Detector):
    """A real Detector that logs when it runs batches, and whose first batch runs only once
    ``release`` is set: the batches after it are formed while it runs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.log: list[tuple[str, int, str]] = []

    def run_batch(self, inputs, *args, **kwargs):
        self.log.append(("run", len(inputs), threading.current_thread().name))
        assert self.release.wait(timeout=30)
        result = super().run_batch(inputs, *args, **kwargs)
        self.log.append(("done", len(inputs), threading.current_thread().name))
        return result


def _batcher(detector: Any, max_batch_size: int, max_queue: int) -> Batcher:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssd-inference")
    return Batcher(
        detector,
        Metrics(max_batch_size).for_model("m"),
        executor,
        max_batch_size=max_batch_size,
        max_wait_s=0.0,
        max_queue=max_queue,
    )


async def _submit(batcher: Batcher, jobs: list[Job], deadline: float) -> list[int]:
    """Admit, hold and submit ``jobs`` as a request does; the sizes of their batches."""
    with batcher.admit() as ticket:
        batcher.hold(ticket, len(jobs))
        return [answer.batch_size for answer in await batcher.submit(ticket, jobs, deadline)]


def test_batches_run_one_at_a_time_and_form_while_the_model_is_busy(tiny_weights: Path) -> None:
    detector = GatedDetector.load(tiny_weights, device="cpu", precision="fp32")
    inputs, size = detector.prepare(Image.open(io.BytesIO(PNG)))

    def jobs(count: int) -> list[Job]:
        return [Job(inputs, size, Cut(0.3, 10))] * count

    async def scenario() -> list[list[int]]:
        batcher = _batcher(detector, max_batch_size=2, max_queue=8)
        await batcher.start()
        deadline = time.monotonic() + 60
        first = asyncio.create_task(_submit(batcher, jobs(2), deadline))
        await _until(lambda: ("run", 2, "ssd-inference_0") in detector.log)
        # The model is busy: these wait, and run in turn once it is free.
        second = asyncio.create_task(_submit(batcher, jobs(2), deadline))
        await _until(lambda: batcher.queue_depth == 2)
        third = asyncio.create_task(_submit(batcher, jobs(1), deadline))
        await _until(lambda: batcher.queue_depth == 3)
        detector.release.set()
        sizes = list(await asyncio.gather(first, second, third))
        await batcher.stop()
        return sizes

    sizes = asyncio.run(scenario())
    assert sizes == [[2, 2], [2, 2], [1]]
    assert detector.log == [
        ("run", 2, "ssd-inference_0"),
        ("done", 2, "ssd-inference_0"),
        ("run", 2, "ssd-inference_0"),  # the full batch first, in arrival order
        ("done", 2, "ssd-inference_0"),
        ("run", 1, "ssd-inference_0"),
        ("done", 1, "ssd-inference_0"),
    ]


async def _until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.01)


def test_warm_up_runs_on_the_inference_thread() -> None:
    # The backend's first-call set-up happens on the thread that will run the batches.
    calls: list[str] = []

    class Recording:
        def warm_up(self) -> None:
            calls.append(threading.current_thread().name)

    async def scenario() -> None:
        batcher = _batcher(Recording(), max_batch_size=16, max_queue=4)
        await batcher.warm_up()
        await batcher.stop()

    asyncio.run(scenario())
    assert len(calls) == 1 and calls[0].startswith("ssd-inference")


def test_held_places_count_against_the_queue_until_submitted_or_left() -> None:
    batcher = _batcher(None, max_batch_size=8, max_queue=4)
    with batcher.admit() as ticket:
        batcher.hold(ticket, 3)
        assert batcher.admitted == 1
        with pytest.raises(OverloadedError, match="3 more being decoded"), batcher.admit() as other:
            batcher.hold(other, 2)
        with batcher.admit() as other:  # one place is still free
            batcher.hold(other, 1)
            with pytest.raises(OverloadedError, match="the queue is full"), batcher.admit():
                pass  # not even one place
    assert batcher.admitted == 0
    with batcher.admit() as ticket:  # leaving the blocks gave every place back
        batcher.hold(ticket, 4)
