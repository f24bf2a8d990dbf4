"""Fixtures shared by the model tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from model import Detector
from model.data.synthetic import SyntheticShapes
from model.evaluation.evaluate import predict_dataset

SHIPPED = Path(__file__).resolve().parents[2] / "weights" / "ssd300_shapes.safetensors"
# Images of the synthetic test split that the shipped model is checked on: enough for mAP@0.5
# to move by well under the 1-point guards, a few seconds per precision on 2 CPU cores (the
# full 500-image split is ``python -m model.evaluate``).
TEST_SUBSET = 100

ShippedRun = tuple[Detector, list[Any], list[dict[str, Any]]]


@pytest.fixture(scope="session")
def shipped_on_test_split() -> Callable[..., ShippedRun]:
    """The shipped model loaded in a precision on a device (the CPU unless named), with its
    detections and the ground truths on the first ``TEST_SUBSET`` images of the synthetic test
    split: each precision and device is run once per session, however many tests compare it
    (skips when the model is not shipped)."""
    if not SHIPPED.is_file():
        pytest.skip(f"no shipped model at {SHIPPED}")
    runs: dict[tuple[str, str], ShippedRun] = {}
    samples = SyntheticShapes(TEST_SUBSET, split="test")

    def run(precision: str, device: str = "cpu") -> ShippedRun:
        if (precision, device) not in runs:
            detector = Detector.load(SHIPPED, device=device, precision=precision)
            detections = predict_dataset(detector, samples, batch_size=16)
            runs[precision, device] = (detector, *detections)
        return runs[precision, device]

    return run
