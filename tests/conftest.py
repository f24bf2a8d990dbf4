"""Fixtures shared by the whole suite."""

from pathlib import Path

import pytest

# ../shared/datasets beside the repository root (see that folder's README.md). Never copied in.
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


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
