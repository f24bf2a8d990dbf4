"""Fixtures for the service tests: a tiny random checkpoint and running servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model import ssd300_vgg16
from model.checkpoint import save_checkpoint
from tests.app.support import CLASS_NAMES, SHIPPED_WEIGHTS, Server

# Small batching settings shared by the default test server: batches of up to 8, formed within
# 30 ms, so 32 concurrent clients give several multi-image batches.
DEFAULT_ENV = {
    "SSD_MAX_BATCH_SIZE": "8",
    "SSD_MAX_WAIT_MS": "30",
    "SSD_MAX_QUEUE": "64",
    "SSD_MAX_UPLOAD_BYTES": "3000000",
    "SSD_MAX_IMAGE_PIXELS": "20000000",
    "SSD_REQUEST_TIMEOUT_S": "60",
    "SSD_DEVICE": "cpu",
}


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
def shipped_weights() -> Path:
    """The shipped trained model; tests needing real detections skip without it."""
    if not SHIPPED_WEIGHTS.is_file():
        pytest.skip(
            "needs the trained shipped model weights/ssd300_shapes.safetensors, which is not "
            "in the repository yet"
        )
    return SHIPPED_WEIGHTS


@pytest.fixture(scope="session")
def trained_server(
    shipped_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server with the shipped model."""
    log = tmp_path_factory.mktemp("trained") / "uvicorn.log"
    running = Server({**DEFAULT_ENV, "SSD_WEIGHTS": str(shipped_weights)}, log).wait_ready()
    yield running
    running.stop()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for in-process servers, leaving the CPU to the rest of the machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
