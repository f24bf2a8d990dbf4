"""``python -m app`` as a child process on a free local port: for tests and benchmarks that
need the real server (its sockets, signals and stdout), started and stopped the same way.

The tests (``tests/app``, ``tests/deploy``) and the benchmarks (``bench/service.py``,
``bench/gpu.py``, run from the repository root so that ``tests`` is importable) share this one
copy of the command, the port picking and the readiness wait. Nothing here is needed to serve,
so it stays out of ``app/`` and out of the image. Only the standard library is used.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Self

# The repository root: ``python -m app`` runs from here, so the default SSD_WEIGHTS resolves.
REPO = Path(__file__).resolve().parents[2]
# Start-up imports torch and builds the model; on a busy 2-core machine that takes a while.
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (free when asked; the server binds it right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(port: int, log_level: str = "warning") -> list[str]:
    """The command that serves the app as ``make run`` does (``python -m app``), on
    127.0.0.1:``port``."""
    return [
        sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", log_level,
    ]  # fmt: skip


# Loopback needs no proxy: an http_proxy in the environment (or one that urllib.request's
# global opener picked up earlier in the process) must not stand between us and the server.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerProcess:
    """``python -m app`` in a child process on 127.0.0.1, on a free port.

    Args:
        env: ``SSD_*`` settings and any other variables; added to this process's environment
            with its own ``SSD_*`` variables left out.
        log_path: where the server's stdout and stderr go (a pipe could fill up and block
            it); None discards stdout (the access log) and leaves stderr on this process's.
    """

    def __init__(
        self, env: dict[str, str], log_path: Path | None = None, log_level: str = "warning"
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SSD_")}
        full_env.update(env)
        self._log: IO[bytes] | None = log_path.open("wb") if log_path is not None else None
        self.process = subprocess.Popen(
            server_command(self.port, log_level),
            cwd=REPO,
            env=full_env,
            stdout=self._log if self._log is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if self._log is not None else None,
        )

    def output(self) -> str:
        """What the server printed so far ("" without a ``log_path``)."""
        if self._log is None or self.log_path is None:
            return ""
        if not self._log.closed:  # closed once stopped
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> Self:
        """Block until /readyz answers 200; raise RuntimeError, with the server's output, if
        it exits first or is not ready within ``timeout`` seconds (then it is stopped)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"server exited with {code}:\n{self.output()}")
            try:
                with _DIRECT.open(self.url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (OSError, urllib.error.URLError):  # not listening yet, or 503 not ready
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.output()}")

    def stop(self) -> None:
        """SIGINT (no drain delay), then kill if it lingers past ``STOP_TIMEOUT_S``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
