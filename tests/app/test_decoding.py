"""The decode pool's pixel budget and deadlines, and the batcher's queue reservations."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.batcher import Batcher
from app.decoding import DecodePool, PixelBudget
from app.errors import DeadlineExceededError, OverloadedError
from app.metrics import Metrics
from tests.app.support import LATENESS_S


def test_pixel_budget_admits_in_order_within_capacity() -> None:
    async def scenario() -> list[str]:
        budget = PixelBudget(100)
        order: list[str] = []

        async def take(name: str, pixels: int, hold_s: float) -> None:
            await budget.acquire(pixels)
            order.append(name)
            assert budget.in_use <= budget.capacity
            await asyncio.sleep(hold_s)
            budget.release(pixels)

        # big waits for room; small arrives after it and must not overtake it.
        await asyncio.gather(take("first", 60, 0.1), take("big", 80, 0.0), take("small", 10, 0.0))
        with pytest.raises(ValueError, match="never fit"):
            await budget.acquire(101)
        assert budget.in_use == 0
        return order

    assert asyncio.run(scenario()) == ["first", "big", "small"]


def test_cancelled_waiter_takes_nothing() -> None:
    async def scenario() -> int:
        budget = PixelBudget(10)
        await budget.acquire(10)
        waiter = asyncio.create_task(budget.acquire(5))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        budget.release(10)
        return budget.in_use

    assert asyncio.run(scenario()) == 0


def test_decode_past_its_deadline_answers_504_and_keeps_its_pixels_until_done() -> None:
    release = threading.Event()

    async def scenario() -> tuple[float, int, int]:
        pool = DecodePool(pixel_budget=100, threads=1)
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError, match="did not finish"):
            await pool.run(60, start + 0.2, release.wait)
        waited = time.monotonic() - start
        held = pool.budget.in_use  # the thread still runs: its pixels are still taken
        release.set()
        await asyncio.sleep(0.1)
        pool.shutdown()
        return waited, held, pool.budget.in_use

    waited, held, after = asyncio.run(scenario())
    # Answered at the deadline, not when the decode ends (never, until after the answer).
    assert 0.2 <= waited < 0.2 + LATENESS_S
    assert (held, after) == (60, 0)


def test_no_room_by_the_deadline_answers_504() -> None:
    async def scenario() -> None:
        pool = DecodePool(pixel_budget=100, threads=2)
        await pool.budget.acquire(100)
        with pytest.raises(DeadlineExceededError, match="no room"):
            await pool.run(1, time.monotonic() + 0.1, lambda: None)
        assert pool.budget.in_use == 100
        pool.shutdown()

    asyncio.run(scenario())


def test_reservations_count_against_the_queue_until_submitted_or_left() -> None:
    batcher = Batcher(None, Metrics(8), max_batch_size=8, max_wait_s=0.01, max_queue=4)  # type: ignore[arg-type]
    with batcher.reserve(3):
        batcher.check_capacity(1)
        with pytest.raises(OverloadedError, match="3 more being decoded"):
            batcher.reserve(2)
    batcher.check_capacity(4)  # leaving the block gave the places back
    reservation = batcher.reserve(4)
    reservation.release()
    reservation.release()  # once only
    batcher.check_capacity(4)
