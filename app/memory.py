"""Handing freed memory back to the system.

glibc's malloc keeps what the process frees in its arenas for reuse, so after a burst (100
stalled 10 MiB uploads, say) the resident size stays near its peak although the memory is free
(docs/operations.md, "Memory", has the measurement). ``malloc_trim(0)`` returns the free
pages, including those in the middle of the heap; it costs a walk over the arenas, so it runs
on a thread every few seconds rather than after every request.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

# How often freed memory goes back: short enough that a burst's memory is back within a
# scrape interval or two (Prometheus' default is 15 s), long enough to cost nothing.
TRIM_INTERVAL_S = 5.0


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None elsewhere (musl, macOS).

    Looked up among the symbols the process already has (``CDLL(None)``), so it needs no
    ``ldconfig`` or compiler to find libc, as ``ctypes.util.find_library`` would.
    """
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


async def trim_periodically(interval_s: float = TRIM_INTERVAL_S) -> None:
    """Give freed heap memory back every ``interval_s`` seconds until cancelled; returns at
    once where there is no ``malloc_trim``."""
    trim = malloc_trim()
    if trim is None:
        log.info("no malloc_trim here: freed memory stays with the allocator")
        return
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval_s)
        await loop.run_in_executor(None, trim, 0)
