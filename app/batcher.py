"""Dynamic batching: requests queue up, and one forward pass answers a whole batch.

A request is admitted first (``admit``): from then on a batch may wait for it, and it holds
places in the queue (``hold``) while its images decode, so a request the queue cannot take is
refused (503) before it pays for decoding. ``submit`` turns its places into queued jobs.

A batch is formed when ``max_batch_size`` images wait, when the oldest has waited
``max_wait_s``, or when no admitted request is still on its way to the queue, whichever comes
first: waiting for company that is not coming only adds latency, as with a single client. A
batch runs on the inference thread, so the event loop keeps accepting requests while it runs
and the next batch fills up in the meantime. Before a batch runs, images whose client has gone
away or whose deadline has passed are dropped. A failure inside a batch answers every image
in it with ``InferenceFailedError``.

The batcher holds jobs, futures and timings, never tensors it looks into: the model batches
and unbatches (``Detector.run_batch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from app.errors import (
    ClientDisconnectedError,
    DeadlineExceededError,
    InferenceFailedError,
    OverloadedError,
)
from app.metrics import ModelMetrics
from model.network.detections import Cut, Detections, ServedDetector

log = logging.getLogger(__name__)

DisconnectCheck = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class Job:
    """One prepared image and how its detections are to be cut.

    ``inputs`` is opaque here: what ``Detector.prepare`` made of the image, handed back to
    ``Detector.run_batch`` as it is. ``size`` is the image's (width, height) in pixels, the
    frame its boxes come back in; ``cut`` says which detections it keeps (threshold, cap,
    classes, NMS IoU).
    """

    inputs: object
    size: tuple[int, int]
    cut: Cut


@dataclass(frozen=True)
class Answer:
    """A job's detections (xyxy pixels of its image) and the images in the batch it ran in."""

    detections: Detections
    batch_size: int


@dataclass(eq=False)
class Ticket:
    """A request admitted to a ``Batcher``: on its way to the queue, holding ``places`` in it.
    Only the batcher changes it."""

    places: int = 0


@dataclass(eq=False)
class _Entry:
    job: Job
    enqueued: float  # time.monotonic()
    deadline: float  # time.monotonic()
    is_disconnected: DisconnectCheck | None
    future: asyncio.Future[Answer] = field(repr=False)


class Batcher:
    """Queues jobs and runs them through ``detector`` in batches, one batch at a time.

    Args:
        detector: the model; its ``run_batch`` and ``warm_up`` run on ``executor``.
        metrics: the model's series (batch sizes, stage times, counts).
        executor: the inference thread (one worker), which the copies of one model share,
            so that a swapped-in copy's batches and the old copy's last ones take turns.
        max_batch_size: most images per forward pass.
        max_wait_s: longest time the oldest waiting image waits for others, in seconds.
        max_queue: most images waiting or held; beyond that ``OverloadedError``.
    """

    def __init__(
        self,
        detector: ServedDetector,
        metrics: ModelMetrics,
        executor: Executor,
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
        self._executor = executor
        self._pending: deque[_Entry] = deque()
        self._tickets: set[Ticket] = set()  # admitted, not yet submitted or gone
        self._arrived = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def queue_depth(self) -> int:
        """Images waiting for a batch."""
        return len(self._pending)

    @property
    def admitted(self) -> int:
        """Requests admitted and not yet queued (reading or decoding their images)."""
        return len(self._tickets)

    @contextlib.contextmanager
    def admit(self) -> Iterator[Ticket]:
        """Admit a request: until it submits or leaves the block, a batch may wait (up to
        ``max_wait_s``) for it, and the places it ``hold``s count as taken.

        Raises:
            OverloadedError: not even one place is free.
        """
        self._check_room(1)
        ticket = Ticket()
        self._tickets.add(ticket)
        try:
            yield ticket
        finally:
            self._leave(ticket)

    def hold(self, ticket: Ticket, count: int) -> None:
        """Hold ``count`` more places for ``ticket``'s images.

        Raises:
            OverloadedError: the places are not free.
        """
        self._check_room(count)
        ticket.places += count

    async def submit(
        self,
        ticket: Ticket,
        jobs: Sequence[Job],
        deadline: float,
        is_disconnected: DisconnectCheck | None = None,
    ) -> list[Answer]:
        """Queue ``jobs`` together in the places ``ticket`` holds and wait for their answers,
        in order.

        Args:
            ticket: from ``admit``, holding at least ``len(jobs)`` places.
            jobs: prepared images; all are queued at once.
            deadline: ``time.monotonic()`` by which the answer must be there.
            is_disconnected: checked before a batch runs; True drops the jobs.

        Raises:
            DeadlineExceededError: the deadline passed first.
            InferenceFailedError: a batch holding one of the jobs failed.
            ClientDisconnectedError: the client went away before the batch ran.
        """
        if ticket.places < len(jobs) or ticket not in self._tickets:
            raise ValueError(f"the ticket holds {ticket.places} places for {len(jobs)} jobs")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        entries = [
            _Entry(job, now, deadline, is_disconnected, loop.create_future()) for job in jobs
        ]
        self._pending.extend(entries)  # the ticket's places become these, with no await between
        self._leave(ticket)
        self._arrived.set()
        try:
            async with asyncio.timeout(max(0.0, deadline - now)):
                return list(await asyncio.gather(*(entry.future for entry in entries)))
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

    async def warm_up(self) -> None:
        """Run the model's warm-up on the inference thread, so the first request is not the
        slow one (nothing is recorded in the metrics).

        Raises:
            whatever the model raises: a copy that cannot run a blank image.
        """
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.detector.warm_up)

    async def start(self) -> None:
        """Start the batching loop (call from the event loop that will submit)."""
        self._task = asyncio.create_task(self._loop(), name="ssd-batcher")

    async def stop(self) -> None:
        """Once every admitted request has submitted or left, run what is queued, then stop."""
        self._stopping = True
        self._arrived.set()
        if self._task is not None:
            await self._task

    def _check_room(self, count: int) -> None:
        held = sum(ticket.places for ticket in self._tickets)
        if len(self._pending) + held + count > self.max_queue:
            raise OverloadedError(
                f"the queue is full ({len(self._pending)} of {self.max_queue} images waiting, "
                f"{held} more being decoded); retry later"
            )

    def _leave(self, ticket: Ticket) -> None:
        """``ticket``'s request is no longer on its way: its places are given back (or were
        taken over by its jobs)."""
        if ticket in self._tickets:
            self._tickets.remove(ticket)
            ticket.places = 0
            if not self._tickets:
                self._arrived.set()  # a batch waiting for company need wait no longer

    async def _loop(self) -> None:
        """Form batches and run them, one at a time."""
        while (batch := await self._next_batch()) is not None:
            batch = await self._drop_gone(batch)
            if batch:
                await self._run(batch)

    async def _next_batch(self) -> list[_Entry] | None:
        """Wait until a batch is due; None once stopping with nothing queued or on its way."""
        while True:
            while self._pending and self._pending[0].future.done():
                self._pending.popleft()
            if not self._pending:
                if self._stopping and not self._tickets:
                    return None
                self._arrived.clear()
                await self._arrived.wait()
                continue
            due = self._pending[0].enqueued + self.max_wait_s - time.monotonic()
            full = len(self._pending) >= self.max_batch_size
            if full or self._stopping or due <= 0 or not self._tickets:
                break
            self._arrived.clear()
            try:  # woken by an arrival or a request no longer on its way
                async with asyncio.timeout(due):
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

    async def _run(self, batch: list[_Entry]) -> None:
        """One batch through the model on the inference thread; answer its jobs."""
        started = time.monotonic()
        for entry in batch:
            self.metrics.stage("queue", started - entry.enqueued)
        jobs = [entry.job for entry in batch]
        run = functools.partial(
            self.detector.run_batch,
            [job.inputs for job in jobs],
            [job.size for job in jobs],
            [job.cut for job in jobs],
        )
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, run)
            if len(result.detections) != len(jobs):
                raise RuntimeError(
                    f"the model returned {len(result.detections)} results for {len(jobs)} images"
                )
        except Exception as exc:
            log.error("a batch of %d images failed", len(batch), exc_info=exc)
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(
                        InferenceFailedError(f"the batch this image was in failed: {exc!r}")
                    )
            return
        self.metrics.batch(
            [detections.labels for detections in result.detections],
            result.forward_s,
            result.postprocess_s,
        )
        for entry, detections in zip(batch, result.detections, strict=True):
            if not entry.future.done():
                entry.future.set_result(Answer(detections, len(batch)))


async def _safe_check(is_disconnected: DisconnectCheck) -> bool:
    try:
        return await is_disconnected()
    except Exception:  # a broken check must not take the batch down; assume still there
        log.warning("disconnect check failed", exc_info=True)
        return False
