"""Signals: SIGTERM shuts down gracefully, SIGHUP reloads the models.

SIGTERM is a graceful, bounded shutdown: stop being ready first, then drain, then a cap.

Uvicorn stops accepting connections on SIGTERM, finishes the requests in flight and then runs
the lifespan shutdown (which empties the batch queue). This adds the step before: ``/readyz``
answers 503 for ``drain_s`` seconds, so a load balancer stops sending new work before the
listening socket closes. And the step after: at ``cut_after_s`` from SIGTERM, uploads still
arriving are cut, so a slow client cannot hold the process; uvicorn's own graceful-shutdown
timeout (``app.server.server_config``) cancels whatever is left at the cap.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


def install_drain_handler(
    on_drain: Callable[[], None],
    drain_s: float,
    loop: asyncio.AbstractEventLoop,
    *,
    on_cut: Callable[[], None],
    cut_after_s: float,
) -> Callable[[], None]:
    """Wrap the server's SIGTERM handler: call ``on_drain`` at once, the server's handler
    ``drain_s`` seconds later (at once on a second SIGTERM), and ``on_cut`` ``cut_after_s``
    seconds after the first SIGTERM. Returns an undo function.

    Does nothing (returns a no-op) when no Python handler is installed for SIGTERM, as under
    an in-process test client, or when not on the main thread.
    """
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except ValueError:
        return lambda: None
    if not callable(previous):
        return lambda: None
    server_handler: Callable[[int, FrameType | None], object] = previous

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if getattr(on_sigterm, "fired", False):  # a second SIGTERM: no more waiting
            server_handler(signum, frame)
            return
        on_sigterm.fired = True  # type: ignore[attr-defined]
        on_drain()
        log.info("SIGTERM: draining, stopping in %.3g s", drain_s)
        loop.call_soon_threadsafe(loop.call_later, drain_s, server_handler, signum, frame)
        loop.call_soon_threadsafe(loop.call_later, cut_after_s, on_cut)

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread
        return lambda: None

    def undo() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, server_handler)

    return undo


def install_reload_handler(
    reload: Callable[[], Coroutine[Any, Any, None]], loop: asyncio.AbstractEventLoop
) -> Callable[[], None]:
    """Run ``reload()`` as a task on ``loop`` at each SIGHUP (the signal a daemon is sent to
    re-read its files). Returns an undo function.

    Does nothing (returns a no-op) off the main thread, where no signal handler can be set.
    """
    tasks: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        log.info("SIGHUP: reloading the models")
        task = loop.create_task(reload(), name="ssd-reload")
        tasks.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    except (ValueError, RuntimeError):  # not the main thread
        return lambda: None
    return lambda: loop.remove_signal_handler(signal.SIGHUP)
