"""Where images are decoded: a few threads, a budget in pixels, and the request's deadline.

Decoding is the one step whose cost the client chooses, so it is bounded three ways:

- ``app.intake.open_image`` refuses what would cost too much before a pixel is decoded, and
  decodes large JPEGs at reduced scale;
- ``PixelBudget`` bounds the pixels decoded and held at once across all requests (memory),
  whatever the number of requests;
- the decode is awaited only until the request's deadline: then the request gets 504 and
  leaves, while the thread, which cannot be stopped, finishes on its own and only then gives
  its pixels back to the budget.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from app.errors import DeadlineExceededError

log = logging.getLogger(__name__)

T = TypeVar("T")


class PixelBudget:
    """A semaphore counted in pixels: ``acquire(n)`` waits until ``n`` fit, first come first
    served (a large image is not starved by a stream of small ones). Event-loop only."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 pixel, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, pixels: int) -> None:
        """Wait until ``pixels`` fit; cancellable (then nothing is taken)."""
        if pixels > self.capacity:
            raise ValueError(f"{pixels} pixels can never fit a budget of {self.capacity}")
        if not self._waiters and self.in_use + pixels <= self.capacity:
            self.in_use += pixels
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (pixels, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # granted just as it was cancelled
                self.release(pixels)
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, pixels: int) -> None:
        """Give ``pixels`` back and let waiters in, in order."""
        self.in_use -= pixels
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            pixels, waiter = self._waiters[0]
            if self.in_use + pixels > self.capacity:
                return
            self._waiters.popleft()
            self.in_use += pixels
            waiter.set_result(None)


class DecodePool:
    """Threads that decode (one per core: the work is CPU-bound and Pillow's decoders release
    the GIL), admitted by a ``PixelBudget``.

    Args:
        pixel_budget: most pixels decoded and held at once (``SSD_DECODE_PIXEL_BUDGET``).
        threads: decoding threads; default one per core.
    """

    def __init__(self, pixel_budget: int, threads: int | None = None) -> None:
        self.budget = PixelBudget(pixel_budget)
        self._executor = ThreadPoolExecutor(
            max_workers=threads or os.cpu_count() or 1, thread_name_prefix="ssd-decode"
        )

    async def run(self, pixels: int, deadline: float, work: Callable[[], T]) -> T:
        """Run ``work`` (which decodes ``pixels`` pixels) on a decoding thread, by ``deadline``
        (a ``time.monotonic()`` value).

        Raises:
            DeadlineExceededError: the deadline passed while waiting for room or for ``work``.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                await self.budget.acquire(pixels)
        except TimeoutError:
            raise DeadlineExceededError(
                "no room to decode the image within the request deadline"
            ) from None
        try:
            future = self._executor.submit(work)
        except BaseException:
            self.budget.release(pixels)
            raise
        # The pixels go back when the thread is done (or the work is cancelled before it
        # started), not when the request stops waiting: a running thread cannot be stopped,
        # and cancelling the wrapper below leaves it running.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self.budget.release, pixels))
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            log.warning("a decode of %d pixels ran past its request's deadline", pixels)
            raise DeadlineExceededError(
                "decoding the image did not finish within the request deadline"
            ) from None

    def shutdown(self) -> None:
        """Wait for the decodes running, then stop the threads."""
        self._executor.shutdown(wait=True)
