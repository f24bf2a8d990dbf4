"""Dynamic batching: requests queue up, and one forward pass answers a whole batch.

A batch is formed when ``max_batch_size`` images wait, when the oldest has waited
``max_wait_s``, or when no other request is on its way to the queue (each request announces
itself with ``reserve`` as soon as it arrives), whichever comes first: waiting for company
that is not coming only adds latency, as with a single client. A batch runs on one dedicated
thread, so the event loop keeps accepting requests while it runs, and the next batch fills up
in the meantime. When the next batch is full before the current one is done, it is formed at
once and waits for the model; a batch that is not full is formed only once the model is free,
since until then more images can still join it. The model batches and unbatches
(``Detector.run_batch``): the batcher holds jobs, futures and timings, never tensors it looks
into. The queue is bounded; a full queue is refused at once (503).

Before a batch runs, images whose client has gone away or whose deadline has passed are
dropped. A failure inside a batch answers every image in it with ``InferenceFailedError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from app.errors import (
    ClientDisconnectedError,
    DeadlineExceededError,
    InferenceFailedError,
    OverloadedError,
)
from app.metrics import Metrics
from model import Detections, Detector
from model.inference.detector import ModelInput

log = logging.getLogger(__name__)

DisconnectCheck = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class Job:
    """One prepared image and how its detections are to be cut.

    ``inputs`` is opaque here: what ``Detector.prepare`` made of the image, handed back to
    ``Detector.run_batch`` as it is. ``size`` is the image's (width, height) in pixels, the
    frame its boxes come back in; ``score_threshold`` is in [0, 1], ``max_detections`` >= 1.
    """

    inputs: ModelInput
    size: tuple[int, int]
    score_threshold: float
    max_detections: int


@dataclass(eq=False)
class _Entry:
    job: Job
    enqueued: float  # time.monotonic()
    deadline: float  # time.monotonic()
    is_disconnected: DisconnectCheck | None
    future: asyncio.Future[Detections] = field(repr=False)
    batch_size: int = 0  # images in the forward pass it ran in, once it has run


class Batcher:
    """Queues jobs and runs them through ``detector`` in batches, one batch at a time.

    Args:
        detector: the model (its ``run_batch`` and ``warm_up`` are called on a worker thread).
        metrics: where batch sizes, stage times, queue depth and counts are recorded.
        max_batch_size: most images per forward pass.
        max_wait_s: longest time the oldest waiting image waits for others, in seconds.
        max_queue: most images waiting; beyond that ``submit`` raises ``OverloadedError``.
    """

    def __init__(
        self,
        detector: Detector,
        metrics: Metrics,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(
                f"need max_batch_size >= 1, max_queue >= 1, max_wait_s >= 0; got "
                f"{max_batch_size}, {max_queue}, {max_wait_s}"
            )
        self.detector = detector
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._pending: deque[_Entry] = deque()
        self._reserved = 0  # places held by requests still decoding (see ``reserve``)
        self._on_the_way = 0  # requests announced by ``reserve`` and not yet submitted
        self._arrived = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._in_hand = 0  # batches formed and not yet done: waiting for the model, or running
        self._handoff: asyncio.Queue[list[_Entry] | None] = asyncio.Queue(1)
        # One thread: one batch at a time on the one model copy.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssd-inference")
        metrics.queue_depth.set_function(lambda: self.queue_depth)
        metrics.queue_capacity.set(max_queue)

    @property
    def queue_depth(self) -> int:
        """Images waiting for a batch."""
        return len(self._pending)

    def check_capacity(self, count: int) -> None:
        """Raise ``OverloadedError`` if ``count`` more images would not fit in the queue now
        (places reserved by requests still decoding count as taken)."""
        taken = len(self._pending) + self._reserved
        if taken + count > self.max_queue:
            raise OverloadedError(
                f"the queue is full ({len(self._pending)} of {self.max_queue} images waiting, "
                f"{self._reserved} more being decoded); retry later"
            )

    def reserve(self, count: int = 0) -> Reservation:
        """Announce a request on its way to ``submit`` and hold ``count`` places in the queue
        for its images (more with ``Reservation.hold`` once they are counted), so a request
        the queue cannot take is refused before it pays for decoding. Until it submits or
        leaves, a batch may wait (up to ``max_wait_s``) for it. ``submit`` takes the places
        over; leaving the ``with`` block without submitting gives them back.

        Raises:
            OverloadedError: the places are not free.
        """
        self.check_capacity(count)
        self._reserved += count
        self._on_the_way += 1
        return Reservation(self, count)

    def _returned(self, places: int) -> None:
        """A reservation's ``places`` given back, its request no longer on the way."""
        self._reserved -= places
        self._on_the_way -= 1
        if self._on_the_way == 0:
            self._arrived.set()  # a batch waiting for this request need wait no longer

    async def start(self) -> None:
        """Start the batching loop (call from the event loop that will submit)."""
        self._task = asyncio.create_task(self._loop(), name="ssd-batcher")

    async def stop(self) -> None:
        """Run what is queued, then stop the loop and the worker thread."""
        self._stopping = True
        self._arrived.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def warm_up(self) -> None:
        """Run the model's warm-up on the inference thread, so the first request is not the
        slow one (nothing is recorded in the metrics)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.detector.warm_up)

    async def submit(
        self,
        jobs: Sequence[Job],
        deadline: float,
        is_disconnected: DisconnectCheck | None = None,
        reservation: Reservation | None = None,
        batch_sizes: list[int] | None = None,
    ) -> list[Detections]:
        """Queue ``jobs`` together and wait for their detections, in order.

        Args:
            jobs: prepared images; all are queued at once or none is.
            deadline: ``time.monotonic()`` by which the answer must be there.
            is_disconnected: checked before a batch runs; True drops the jobs.
            reservation: places held for ``jobs`` by ``reserve``; without one, the queue
                must have room now.
            batch_sizes: if given, filled with the size of the batch each job ran in.

        Raises:
            OverloadedError: the queue has no room for all of ``jobs``.
            DeadlineExceededError: the deadline passed first.
            InferenceFailedError: a batch holding one of the jobs failed.
            ClientDisconnectedError: the client went away before the batch ran.
        """
        if reservation is not None:
            reservation.release()  # its places become the jobs' own, with no await between
        if self._stopping:
            raise OverloadedError("the server is shutting down")
        self.check_capacity(len(jobs))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        entries = [
            _Entry(job, now, deadline, is_disconnected, loop.create_future()) for job in jobs
        ]
        self._pending.extend(entries)
        self._arrived.set()
        try:
            async with asyncio.timeout(max(0.0, deadline - now)):
                results = list(await asyncio.gather(*(entry.future for entry in entries)))
            if batch_sizes is not None:
                batch_sizes.extend(entry.batch_size for entry in entries)
            return results
        except TimeoutError:
            raise DeadlineExceededError(
                f"no answer within the request deadline ({deadline - now:.3g} s)"
            ) from None
        finally:
            # Jobs left waiting (deadline passed, another job failed) leave the queue now;
            # gather has cancelled their futures already on a timeout.
            for entry in entries:
                entry.future.cancel()
                if entry.future.cancelled():
                    with contextlib.suppress(ValueError):  # not there: taken into a batch
                        self._pending.remove(entry)

    async def _loop(self) -> None:
        """Form batches; the runner (a task of its own) runs them in turn."""
        runner = asyncio.create_task(self._run_batches(), name="ssd-batch-runner")
        try:
            while (batch := await self._next_batch()) is not None:
                batch = await self._drop_gone(batch)
                if not batch:
                    continue
                self._in_hand += 1
                await self._handoff.put(batch)  # waits while one is waiting already
        finally:
            await self._handoff.put(None)
            await runner

    async def _run_batches(self) -> None:
        """Run the formed batches one at a time on the inference thread; answer their jobs."""
        loop = asyncio.get_running_loop()
        while (batch := await self._handoff.get()) is not None:
            try:
                if all(entry.future.done() for entry in batch):
                    continue  # every request gave up while its batch waited
                started = time.monotonic()
                for entry in batch:
                    waited = started - entry.enqueued
                    self.metrics.stage_duration.labels(stage="queue").observe(waited)
                run = functools.partial(self._infer, [entry.job for entry in batch])
                try:
                    results = await loop.run_in_executor(self._executor, run)
                except Exception as exc:
                    self._failed(batch, exc)
                    continue
                for entry, result in zip(batch, results, strict=True):
                    entry.batch_size = len(batch)
                    if not entry.future.done():
                        entry.future.set_result(result)
            finally:
                self._in_hand -= 1
                self._arrived.set()  # the model is free: a batch that is not full may go

    def _failed(self, batch: list[_Entry], exc: Exception) -> None:
        """Answer every job of a batch that failed with ``InferenceFailedError``."""
        log.error("a batch of %d images failed", len(batch), exc_info=exc)
        for entry in batch:
            if not entry.future.done():
                entry.future.set_exception(
                    InferenceFailedError(f"the batch this image was in failed: {exc!r}")
                )

    async def _next_batch(self) -> list[_Entry] | None:
        """Wait until a batch is due; None once stopping with nothing left. A full batch is
        due at once; one that is not, only while no batch is in hand (the model is free)."""
        while True:
            while self._pending and self._pending[0].future.done():
                self._pending.popleft()
            if not self._pending:
                if self._stopping:
                    return None
                self._arrived.clear()
                await self._arrived.wait()
                continue
            due = self._pending[0].enqueued + self.max_wait_s - time.monotonic()
            full = len(self._pending) >= self.max_batch_size
            free = self._in_hand == 0
            if full or self._stopping or (free and (due <= 0 or self._on_the_way == 0)):
                break
            self._arrived.clear()
            try:  # woken by an arrival, a request no longer on its way, or the model free
                async with asyncio.timeout(due if free else None):
                    await self._arrived.wait()
            except TimeoutError:
                pass
        count = min(self.max_batch_size, len(self._pending))
        return [self._pending.popleft() for _ in range(count)]

    async def _drop_gone(self, batch: list[_Entry]) -> list[_Entry]:
        """The entries still worth running: not cancelled, not past deadline, client there."""
        kept, now = [], time.monotonic()
        for entry in batch:
            if entry.future.done() or entry.deadline <= now:
                continue  # the waiting request answers (504) or has answered already
            if entry.is_disconnected is not None and await _safe_check(entry.is_disconnected):
                entry.future.set_exception(
                    ClientDisconnectedError("the client disconnected before its batch ran")
                )
                continue
            kept.append(entry)
        return kept

    def _infer(self, jobs: list[Job]) -> list[Detections]:
        """One batch through the model, its metrics recorded (on the worker thread)."""
        batch = self.detector.run_batch(
            [job.inputs for job in jobs],
            [job.size for job in jobs],
            [job.score_threshold for job in jobs],
            [job.max_detections for job in jobs],
        )
        results = batch.detections
        if len(results) != len(jobs):
            raise RuntimeError(f"the model returned {len(results)} results for {len(jobs)} images")
        m = self.metrics
        m.batch_size.observe(len(jobs))
        m.images.inc(len(jobs))
        for _ in jobs:  # per image: each waited for its whole batch's forward pass and decoding
            m.stage_duration.labels(stage="inference").observe(batch.forward_s)
            m.stage_duration.labels(stage="postprocess").observe(batch.postprocess_s)
        for result in results:
            for label in result.labels:
                m.detections.labels(label=label).inc()
        return results


class Reservation:
    """A request on its way to a ``Batcher``'s queue and the places it holds there (see
    ``Batcher.reserve``)."""

    def __init__(self, batcher: Batcher, count: int) -> None:
        self._batcher = batcher
        self._count = count
        self._open = True

    def hold(self, count: int) -> None:
        """Hold ``count`` more places.

        Raises:
            OverloadedError: the places are not free.
        """
        self._batcher.check_capacity(count)
        self._batcher._reserved += count
        self._count += count

    def release(self) -> None:
        """Give the places back and end the announcement (once; later calls do nothing)."""
        if self._open:
            self._open = False
            self._batcher._returned(self._count)
            self._count = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


async def _safe_check(is_disconnected: DisconnectCheck) -> bool:
    try:
        return await is_disconnected()
    except Exception:  # a broken check must not take the batch down; assume still there
        log.warning("disconnect check failed", exc_info=True)
        return False
