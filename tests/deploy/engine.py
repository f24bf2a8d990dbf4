"""A private Docker engine for the deployment tests, and the CI stand-in for the base image.

The engine is Debian's ``dockerd`` started by the test with its own data root, exec root and
socket, so it never touches (or needs) a system engine: overlay2 storage (the kernel has
overlayfs; ``vfs`` would copy the whole ~6 GB environment for every step), no iptables and no
default bridge, so containers run on user-defined networks. No image registry is reachable
here, so ``debian:bookworm-slim`` is stood in by a ``debootstrap --variant=minbase`` of
bookworm, imported with the machine's CA bundle for the TLS-intercepting proxy in front of the
package registries. That bundle and ``PIP_CERT`` belong to the stand-in only, never to the
Dockerfile.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.deploy.support import REPO

# Tools from Debian's docker.io, docker-compose and debootstrap packages (.ci/run installs them).
TOOLS = ("dockerd", "docker-compose", "debootstrap")
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Inside the stand-in, at a path of its own: installing Debian's ca-certificates in a build
# (python3 pulls it in) rewrites /etc/ssl/certs/ca-certificates.crt without the proxy's CA.
STAND_IN_CA_BUNDLE = "/usr/local/share/ca-bundle/host-ca-certificates.crt"
ENGINE_START_TIMEOUT_S = 60.0  # dockerd plus its containerd, on a machine perhaps busy
ENGINE_STOP_TIMEOUT_S = 30.0  # dockerd's own shutdown timeout is 15 s, plus containerd's


def missing_tools() -> list[str]:
    """The engine's tools that are not on PATH."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def debian_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The bookworm mirror in apt's own sources (deb822 ``.sources`` or one-line ``.list``)."""
    files = sorted((sources / "sources.list.d").glob("*.sources"))
    for path in files:
        for block in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", block, re.MULTILINE))
            if "bookworm" in fields.get("Suites", "").split() and "URIs" in fields:
                return fields["URIs"].split()[0]
    for path in [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                match = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", line)
                if match:
                    return match.group(1)
    raise RuntimeError(f"no bookworm mirror in {sources}/sources.list*")


class Engine:
    """A running ``dockerd`` on a socket of its own; ``docker(...)`` runs its client.

    Everything lives under one temporary folder (short, since the socket path is limited to
    108 bytes), removed by ``stop()`` with the images and containers in it.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ssd-engine-"))
        self.socket = self.root / "docker.sock"
        self.host = f"unix://{self.socket}"
        dockerd = shutil.which("dockerd")
        assert dockerd is not None
        # The client from the engine's own package (Debian puts both in one), not another
        # docker on PATH whose API version may differ.
        beside = Path(dockerd).resolve().parent.parent / "bin" / "docker"
        self.client = str(beside) if beside.is_file() else (shutil.which("docker") or "docker")
        self.log_path = self.root / "dockerd.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                dockerd,
                "--storage-driver=overlay2",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                f"--data-root={self.root / 'data'}",
                f"--exec-root={self.root / 'exec'}",
                f"--pidfile={self.root / 'dockerd.pid'}",
                "-H",
                self.host,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of pytest reaches the tests, not the engine
        )

    @property
    def env(self) -> dict[str, str]:
        """The environment for docker-compose (and any client) to use this engine."""
        return {**os.environ, "DOCKER_HOST": self.host}

    def log_tail(self, lines: int = 30) -> str:
        """The end of dockerd's output."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self) -> None:
        """Until the engine answers; ``RuntimeError`` with its log if it exits or hangs."""
        end = time.monotonic() + ENGINE_START_TIMEOUT_S
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")  # fmt: skip
            probe = subprocess.run(
                [self.client, "-H", self.host, "version"], capture_output=True, timeout=30
            )
            if probe.returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"dockerd not answering after {ENGINE_START_TIMEOUT_S} s:\n"
                           f"{self.log_tail()}")  # fmt: skip

    def docker(
        self, *args: str, timeout: float = 120, input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``docker args...`` against this engine; ``AssertionError`` with its output if it
        fails (unless ``check`` is False: then the caller reads ``returncode``)."""
        result = subprocess.run(
            [self.client, "-H", self.host, *args],
            capture_output=True,
            timeout=timeout,
            input=input,
        )
        out, err = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
        assert not check or result.returncode == 0, f"docker {' '.join(args)} failed:\n{out}\n{err}"
        return subprocess.CompletedProcess(result.args, result.returncode, out, err)

    def compose(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """``docker-compose args...`` against this engine, from the repository root, with
        ``env`` added to the environment."""
        result = subprocess.run(
            ["docker-compose", *args],
            cwd=REPO,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"docker-compose {' '.join(args)} failed:\n" \
            f"{result.stdout}\n{result.stderr}"  # fmt: skip
        return result

    def import_base_image(self, tag: str) -> float:
        """Build the bookworm stand-in and import it as ``tag``; returns the seconds taken."""
        start = time.monotonic()
        rootfs = self.root / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), debian_mirror()],
            capture_output=True,
            check=True,
            timeout=600,  # a Debian mirror may be slow (docs/performance.md has a run)
        )
        bundle = rootfs / STAND_IN_CA_BUNDLE.lstrip("/")
        bundle.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SYSTEM_CA_BUNDLE, bundle)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            subprocess.run(
                [self.client, "-H", self.host, "import",
                 "--change", f"ENV PIP_CERT={STAND_IN_CA_BUNDLE}", "-", tag],
                stdin=tar.stdout, capture_output=True, check=True, timeout=300,
            )  # fmt: skip
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
        shutil.rmtree(rootfs)
        return time.monotonic() - start

    def stop(self) -> None:
        """Remove every container, network, volume and image, stop the engine, remove its
        folder (the data root with it)."""
        try:
            if self.process.poll() is None:
                containers = self.docker("ps", "-aq").stdout.split()
                if containers:
                    self.docker("rm", "-f", "-v", *containers)
                # Then every image (intermediate layers too), network, volume and build cache.
                self.docker("system", "prune", "-af", "--volumes", timeout=300)
                left = {
                    "images": self.docker("images", "-aq").stdout.split(),
                    "volumes": self.docker("volume", "ls", "-q").stdout.split(),
                    "networks": self.docker(
                        "network", "ls", "-q", "--filter", "type=custom"
                    ).stdout.split(),
                }
                assert not any(left.values()), f"left in the engine after clean-up: {left}"
        finally:
            self._stop_process()
            self._log.close()
            _unmount_below(self.root)
            shutil.rmtree(self.root)

    def _stop_process(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=ENGINE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _unmount_below(root: Path) -> None:
    """Lazily unmount whatever an engine that died left mounted under ``root``."""
    prefix = str(root) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True)
