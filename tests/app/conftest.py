"""Fixtures for the service tests: a tiny random checkpoint, the app in process (most tests),
and real servers (the tests where a real socket, signal or process is the point)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import torch

from app.main import create_app
from model import Detector, ssd300_vgg16
from model.weights.checkpoint import save_checkpoint
from tests.app.support import (
    CLASS_NAMES,
    DEFAULT_ENV,
    GUARDED_ENV,
    SHIPPED_WEIGHTS,
    Server,
    in_process,
    settings_from,
)


@pytest.fixture
def anyio_backend() -> str:
    """In-process tests (``pytest.mark.anyio``) run on asyncio, as uvicorn does."""
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SSD300 (width 1/8) with random weights and the six shapes classes."""
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    torch.manual_seed(0)
    network = ssd300_vgg16(7, width=0.125, batch_norm=True, preset="coco").eval()
    save_checkpoint(path, network, CLASS_NAMES)
    return path


@pytest.fixture(scope="session")
def server(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One uvicorn process serving the tiny model, shared by the whole session.

    Tests that count metrics take differences, since other tests use the same server.
    """
    log = tmp_path_factory.mktemp("server") / "uvicorn.log"
    running = Server({**DEFAULT_ENV, "SSD_WEIGHTS": str(tiny_weights)}, log).wait_ready()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def guarded(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real server with short connection timeouts and caps (``GUARDED_ENV``), for the tests
    of slow and hostile clients; the connection cap counts every connection, so tests using
    it run one at a time."""
    log = tmp_path_factory.mktemp("guarded") / "server.log"
    running = Server({**GUARDED_ENV, "SSD_WEIGHTS": str(tiny_weights)}, log).wait_ready()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def tiny_detector(tiny_weights: Path) -> Detector:
    """The tiny model loaded once, as the lifespan loads it with the test settings (auto
    precision), shared by the in-process apps (it keeps no state between batches)."""
    settings = settings_from({**DEFAULT_ENV, "SSD_WEIGHTS": str(tiny_weights)})
    return Detector.load(tiny_weights, device=settings.device, precision=settings.precision)


@pytest.fixture
async def client(
    tiny_weights: Path, tiny_detector: Detector, anyio_backend: str
) -> AsyncIterator[httpx.AsyncClient]:
    """A client calling a fresh app in process (no socket): the tiny model, the default test
    settings, the lifespan run around the test, fresh metrics."""
    settings = settings_from({**DEFAULT_ENV, "SSD_WEIGHTS": str(tiny_weights)})
    async with in_process(create_app(settings, tiny_detector)) as running:
        yield running


@pytest.fixture(scope="session")
def shipped_weights() -> Path:
    """The shipped trained model (``weights/ssd300_shapes.safetensors``, in the repository);
    tests needing real detections skip if it has been removed."""
    if not SHIPPED_WEIGHTS.is_file():
        pytest.skip(f"needs the trained shipped model {SHIPPED_WEIGHTS}, which is missing")
    return SHIPPED_WEIGHTS


@pytest.fixture(scope="session")
def trained_detector(shipped_weights: Path) -> Detector:
    """The shipped model loaded once, as the lifespan loads it with the test settings."""
    settings = settings_from({**DEFAULT_ENV, "SSD_WEIGHTS": str(shipped_weights)})
    return Detector.load(shipped_weights, device=settings.device, precision=settings.precision)


@pytest.fixture
async def trained_client(
    shipped_weights: Path, trained_detector: Detector, anyio_backend: str
) -> AsyncIterator[httpx.AsyncClient]:
    """A client calling an app in process that serves the shipped model."""
    settings = settings_from({**DEFAULT_ENV, "SSD_WEIGHTS": str(shipped_weights)})
    async with in_process(create_app(settings, trained_detector)) as running:
        yield running
