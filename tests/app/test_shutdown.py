"""SIGTERM (``app/signals.py``): /readyz turns 503 at once, new work is refused, the request in
flight finishes, and a stalled upload cannot hold the process past the cap.

Real server: the point is a signal sent to the ``python -m app`` process and its exit.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx

from tests.app.support import (
    LATENESS_S,
    PATIENCE_S,
    Server,
    connect,
    encode,
    head,
    metric,
    read_answer,
    shapes_image,
)

PNG = encode(shapes_image((320, 240)), "PNG")


async def _queued(server: Server) -> None:
    """Until one image waits in the server's queue."""
    end = time.monotonic() + PATIENCE_S
    while metric(server.metrics(), "ssd_queue_depth") != 1:
        assert time.monotonic() < end, "the request never reached the queue"
        await asyncio.sleep(0.05)


def test_sigterm_drains(tiny_weights: Path, tmp_path: Path) -> None:
    # The request waits 6 s for its batch, since an upload that stalls is on its way too;
    # SIGTERM comes while it waits, and the server stops listening 4 s after it
    # (SSD_DRAIN_S), so the request is still in flight then. 4 s, so that the three fresh
    # requests below reach the server inside the drain on a busy machine too.
    env = {
        "SSD_WEIGHTS": str(tiny_weights),
        "SSD_DEVICE": "cpu",
        "SSD_MAX_WAIT_MS": "6000",
        "SSD_DRAIN_S": "4",
        "SSD_MIN_BODY_RATE": "1",  # the stalled upload is not cut for slowness
    }
    server = Server(env, tmp_path / "uvicorn.log").wait_ready()
    try:
        stalled = connect(server)
        stalled.sendall(head(content_length=100_000) + b"abc")

        async def scenario() -> dict[str, httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=PATIENCE_S) as client:
                in_flight = asyncio.create_task(
                    client.post("/detect", content=PNG, headers={"Content-Type": "image/png"})
                )
                await _queued(server)
                server.process.send_signal(signal.SIGTERM)
                async with httpx.AsyncClient(base_url=server.url, timeout=PATIENCE_S) as fresh:
                    end = time.monotonic() + PATIENCE_S
                    # The signal is handled on the server's loop: soon, not at once.
                    while (ready := await fresh.get("/readyz")).status_code == 200:
                        assert time.monotonic() < end, "/readyz never turned 503"
                        await asyncio.sleep(0.05)
                    health = await fresh.get("/healthz")
                    refused = await fresh.post(
                        "/detect", content=PNG, headers={"Content-Type": "image/png"}
                    )
                return {
                    "ready": ready,
                    "health": health,
                    "refused": refused,
                    "in_flight": await in_flight,
                }

        answers = asyncio.run(scenario())
        assert answers["ready"].status_code == 503
        assert answers["ready"].json()["error"]["code"] == "draining"
        assert "Retry-After" in answers["ready"].headers
        assert answers["health"].status_code == 200  # alive, just not taking work
        assert answers["refused"].status_code == 503
        assert answers["refused"].json()["error"]["code"] == "draining"
        in_flight = answers["in_flight"]
        assert in_flight.status_code == 200, in_flight.text
        assert in_flight.json()["image"] == {"width": 320, "height": 240}
        # uvicorn re-raises the captured SIGTERM after a clean shutdown.
        assert server.process.wait(timeout=PATIENCE_S) in (0, -signal.SIGTERM)
        stalled.close()
        assert "Traceback" not in server.output()
    finally:
        server.stop()


def test_sigterm_with_a_stalled_uploader_exits_within_drain_plus_cap(
    tiny_weights: Path, tmp_path: Path
) -> None:
    drain_s, cap_s = 1.0, 4.0
    env = {
        "SSD_WEIGHTS": str(tiny_weights),
        "SSD_DEVICE": "cpu",
        "SSD_DRAIN_S": str(drain_s),
        "SSD_SHUTDOWN_TIMEOUT_S": str(cap_s),
        "SSD_MAX_WAIT_MS": "2500",  # the queued request is still waiting at SIGTERM
        "SSD_BODY_TIMEOUT_S": "600",  # only the shutdown cap can end the stalled upload
        "SSD_MIN_BODY_RATE": "1",
    }
    server = Server(env, tmp_path / "server.log").wait_ready()
    try:
        stalled = connect(server)
        stalled.sendall(head(content_length=100_000) + b"abc")

        async def queued_request() -> httpx.Response:
            async with httpx.AsyncClient(base_url=server.url, timeout=PATIENCE_S) as client:
                return await client.post("/detect", content=PNG)

        async def scenario() -> tuple[httpx.Response, float]:
            task = asyncio.create_task(queued_request())
            await _queued(server)
            start = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            answer = await task
            await asyncio.to_thread(server.process.wait, PATIENCE_S)
            return answer, time.monotonic() - start

        answer, exited_after = asyncio.run(scenario())
        assert answer.status_code == 200, answer.text
        status, body, _ = read_answer(stalled)
        stalled.close()
        assert status == 503 and body["error"]["code"] == "draining", body
        # Without the cap the stalled upload would hold the process for SSD_BODY_TIMEOUT_S
        # (600 s); the slack is for the interpreter's exit on a busy machine.
        assert exited_after < drain_s + cap_s + LATENESS_S, exited_after
        print(f"exited {exited_after:.2f} s after SIGTERM (drain {drain_s} s, cap {cap_s} s)")
        assert "Traceback" not in server.output()
    finally:
        server.stop()
