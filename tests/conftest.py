"""Fixtures shared by the whole suite, and its one torch thread."""

import os
from pathlib import Path

import pytest
import torch

# ../shared/datasets beside the repository root (see that folder's README.md). Never copied in.
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def pytest_configure(config: pytest.Config) -> None:
    """One torch (OpenMP) thread, here and in the processes the tests start. With two
    threads on a 2-core machine that is busy with something else, every parallel op waits
    for whichever thread the scheduler has set aside, and the suite's small networks slow
    down many times over (docs/test-suite.md); with one thread the suite's cost no longer
    depends on the neighbours'."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip, saying why, where torch sees no CUDA device (plain pytest
    deselects them already; ``pytest -m gpu`` selects them on any machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def _shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {name!r} not found at {path} (it lives beside the repo)")
    return path


@pytest.fixture(scope="session")
def raccoon() -> Path:
    """The raccoon Pascal VOC dataset (200 photos, 160/40 split)."""
    return _shared("raccoon")


@pytest.fixture(scope="session")
def coco128() -> Path:
    """The coco128 COCO-JSON dataset (128 images, 80 categories)."""
    return _shared("coco128")
