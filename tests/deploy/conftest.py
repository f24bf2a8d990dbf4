"""Fixtures of the deployment tests: a private Docker engine, the base-image stand-in and the
two service images (full and cpu) built from the repository's Dockerfile.

Every test here carries the ``deploy`` marker, which plain ``pytest`` (``make test``) leaves
out; ``make test-deploy`` runs them. The engine is started once per run and removed, with all
its images, at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.engine import Engine, missing_tools
from tests.deploy.support import (
    COMPOSE_CPU_FILE,
    CPU_TARGET,
    FIGURES,
    REPO,
    compose,
    load_yaml,
    unavailable,
)

HERE = Path(__file__).parent
BASE_IMAGE = "debian:bookworm-slim"  # the Dockerfile's FROM, stood in by engine.py
BUILD_TIMEOUT_S = 1800  # several GB of wheels (docs/performance.md); a slow mirror gets room
# Free disk the engine's data root needs: the build stage's virtual environment and the image's
# copy of it (6.24 GB, torch's CUDA libraries most of it), with room to spare. Free space fell
# by about 12 GB during a build here (docs/performance.md); a CI run that started with less
# failed deep in the build with "no space left on device".
NEEDED_DISK_GB = 20


@pytest.hookimpl(tryfirst=True)  # before the -m selection looks at the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this folder ``deploy``."""
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.deploy)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the figures the tests measured (build time, image size, cold start ...)."""
    if FIGURES:
        terminalreporter.section("deployment figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """A running private dockerd; skips (fails under CI) where none can start here."""
    missing = missing_tools()
    if missing:
        unavailable(f"no Docker engine: {', '.join(missing)} not installed "
                    "(apt-get install docker.io docker-compose debootstrap)")  # fmt: skip
    if os.geteuid() != 0:
        unavailable("starting a private dockerd needs root")
    scratch = tempfile.gettempdir()  # where Engine puts its data root
    free = shutil.disk_usage(scratch).free / 1e9
    if free < NEEDED_DISK_GB:
        unavailable(
            f"the image build needs about {NEEDED_DISK_GB} GB free under {scratch} (the "
            f"engine's data root); {free:.1f} GB are"
        )
    FIGURES["free disk at the start"] = f"{free:.0f} GB"
    running = Engine()
    try:
        running.wait_ready()
    except RuntimeError as exc:
        running.stop()
        unavailable(f"the Docker engine did not start: {exc}")
    yield running
    start = time.monotonic()
    running.stop()
    FIGURES["engine clean-up (images, containers, data root)"] = f"{time.monotonic() - start:.0f} s"


@pytest.fixture(scope="session")
def base_image(engine: Engine) -> str:
    """The local stand-in for the Dockerfile's base image."""
    seconds = engine.import_base_image(BASE_IMAGE)
    FIGURES["base image stand-in (debootstrap + import)"] = f"{seconds:.0f} s"
    # Part of both images' sizes below; the registry's debian:bookworm-slim is smaller.
    _record_size(engine, BASE_IMAGE, "base image stand-in size")
    return BASE_IMAGE


@pytest.fixture(scope="session")
def detector_image(engine: Engine, base_image: str) -> str:
    """The service image, built from the repository with the compose file's image name (so
    ``docker-compose up`` uses it instead of building again)."""
    tag = compose()["services"]["detector"]["image"]
    start = time.monotonic()
    engine.docker("build", "--network", "host", "-t", tag, str(REPO), timeout=BUILD_TIMEOUT_S)
    FIGURES["full image build (every stage)"] = f"{time.monotonic() - start:.0f} s"
    free = shutil.disk_usage(engine.root).free / 1e9
    FIGURES["free disk after the build"] = f"{free:.0f} GB"
    _record_size(engine, tag, "full image size")
    return tag


@pytest.fixture(scope="session")
def cpu_image(engine: Engine, detector_image: str) -> str:
    """The torch-free image (the Dockerfile's cpu target), with docker-compose.cpu.yml's image
    name. Built after the full image, whose build has already built its stages (the classic
    builder builds every stage up to the last), so this mostly tags the cache."""
    tag = load_yaml(COMPOSE_CPU_FILE)["services"]["detector"]["image"]
    start = time.monotonic()
    engine.docker(
        "build", "--network", "host", "--target", CPU_TARGET, "-t", tag, str(REPO),
        timeout=BUILD_TIMEOUT_S,
    )  # fmt: skip
    FIGURES["cpu image build (after the full image's)"] = f"{time.monotonic() - start:.0f} s"
    _record_size(engine, tag, "cpu image size")
    return tag


def _record_size(engine: Engine, tag: str, figure: str) -> None:
    size = int(engine.docker("image", "inspect", "-f", "{{.Size}}", tag).stdout)
    FIGURES[figure] = f"{size / 1e9:.2f} GB ({size} bytes)"
