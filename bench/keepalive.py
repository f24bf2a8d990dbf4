"""Requests per second through the server's connection handling: keep-alive clients asking
GET /healthz as fast as they can, against one or more checkouts of this repository.

Each ``--repo`` gets its own ``python -m app`` (this interpreter, the shipped model on the
CPU), all started first; then the measuring windows alternate between them, so a busy machine
slows them alike. /healthz does no model work: what is measured is HTTP parsing, the
connection guard (``app/connection_guard.py``) and the app's middleware. Prints the median
requests/s per checkout and the ratio to the first; never fails on a time.

``--in-process`` measures instead the CPU time ``GuardedConnection`` of this checkout adds per
request, in process, with a stub in place of uvicorn's protocol (and a bare httptools parse of
the same request beside it), free of the noise of sockets and other processes.

    .venv/bin/python -m bench.keepalive [--repo PATH ...] [--clients 16] [--seconds 5]
    .venv/bin/python -m bench.keepalive --in-process
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

import httptools

from app.connection_guard import ConnectionLimits, GuardedConnection
from app.settings import DEFAULT_WEIGHTS
from tests.support.server_process import REPO, free_port, server_command

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"


def start(repo: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``python -m app`` from ``repo`` on a free port, once /readyz answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSD_")}
    env.update(SSD_DEVICE="cpu", SSD_WEIGHTS=str(REPO / DEFAULT_WEIGHTS), OMP_NUM_THREADS="1")
    process = subprocess.Popen(server_command(port), cwd=repo, env=env)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    end = time.monotonic() + 120
    while time.monotonic() < end:
        try:
            with opener.open(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server from {repo} was not ready in 120 s")


async def client(port: int, until: float) -> int:
    """Requests answered on one keep-alive connection before ``until`` (loop time)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop, done = asyncio.get_running_loop(), 0
    while loop.time() < until:
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        await reader.readexactly(length)
        done += 1
    writer.close()
    return done


async def window(port: int, clients: int, seconds: float) -> float:
    """Requests per second from ``clients`` connections over ``seconds``."""
    until = asyncio.get_running_loop().time() + seconds
    counts = await asyncio.gather(*(client(port, until) for _ in range(clients)))
    return sum(counts) / seconds


# What curl sends, with two more headers browsers add.
TYPICAL_REQUEST = (
    b"GET /healthz HTTP/1.1\r\nHost: example\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n"
    b"Accept-Encoding: gzip\r\nConnection: keep-alive\r\n\r\n"
)


class _Stub(asyncio.Protocol):
    """Stands in for uvicorn's protocol (and for the transport): does nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def is_closing(self) -> bool:
        return False


class _Callbacks:
    """The parser callbacks the guard registers, doing nothing."""

    def on_message_begin(self) -> None: ...
    def on_url(self, url: bytes) -> None: ...
    def on_header(self, name: bytes, value: bytes) -> None: ...
    def on_headers_complete(self) -> None: ...
    def on_message_complete(self) -> None: ...


async def in_process(requests: int) -> tuple[float, float]:
    """Seconds of CPU per request: through ``GuardedConnection`` (its stub answering each at
    once), and through a bare httptools parser with the same callbacks."""
    limits = ConnectionLimits(
        header_timeout_s=10, max_header_bytes=16384, body_timeout_s=30, max_connections=10
    )
    bound = {"limits": limits, "served_by": _Stub, "open": set()}
    guard = type("GuardedConnection", (GuardedConnection,), bound)()
    guard.connection_made(_Stub())  # type: ignore[arg-type]
    start = time.process_time()
    for _ in range(requests):
        guard.data_received(TYPICAL_REQUEST)
        guard.response_complete()
    guarded = (time.process_time() - start) / requests
    parser = httptools.HttpRequestParser(_Callbacks())
    start = time.process_time()
    for _ in range(requests):
        parser.feed_data(TYPICAL_REQUEST)
    return guarded, (time.process_time() - start) / requests


def main() -> None:
    """Start a server per ``--repo``, measure them in alternating windows, print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, action="append", help="checkout (default: this)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0, help="per window")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--in-process", action="store_true", help="the guard's CPU per request")
    args = parser.parse_args()
    if args.in_process:
        guarded, bare = asyncio.run(in_process(200_000))
        print(
            f"GuardedConnection: {guarded * 1e6:.2f} us of CPU per request (a bare httptools "
            f"parse of it: {bare * 1e6:.2f} us); {len(TYPICAL_REQUEST)}-byte request, 200,000 times"
        )
        return
    repos = [repo.resolve() for repo in args.repo or [REPO]]
    servers = [start(repo) for repo in repos]
    rates: list[list[float]] = [[] for _ in repos]
    try:
        for _, port in servers:  # one short warm-up each
            asyncio.run(window(port, args.clients, 1.0))
        for _ in range(args.rounds):
            for i, (_, port) in enumerate(servers):
                rates[i].append(asyncio.run(window(port, args.clients, args.seconds)))
    finally:
        for process, _ in servers:
            process.send_signal(signal.SIGINT)  # no drain delay, as ServerProcess.stop
            process.wait()
    first = statistics.median(rates[0])
    for repo, rate in zip(repos, rates, strict=True):
        median = statistics.median(rate)
        print(
            f"{repo}: {median:,.0f} requests/s (median of {len(rate)} x {args.seconds:g} s, "
            f"{args.clients} clients; min {min(rate):,.0f}, max {max(rate):,.0f}); "
            f"{median / first:.3f} x the first"
        )


if __name__ == "__main__":
    main()
