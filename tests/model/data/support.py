"""Helpers shared by the data tests: the sample contract check and files written to tmp_path."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def count_boxes(dataset) -> int:
    """Training boxes over the whole dataset, from the index (no image decoded)."""
    return sum(len(dataset.target(i)["boxes"]) for i in range(len(dataset)))


def check_sample(image: torch.Tensor, target: dict) -> None:
    """The sample contract, and no value that could turn into NaN."""
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    boxes, height, width = target["boxes"], image.shape[1], image.shape[2]
    assert boxes.dtype == torch.float32 and boxes.shape == (len(target["labels"]), 4)
    assert target["labels"].dtype == torch.int64 and target["difficult"].dtype == torch.bool
    crowd = target["crowd_boxes"]
    assert crowd.dtype == torch.float32 and crowd.shape == (len(target["crowd_labels"]), 4)
    assert target["crowd_labels"].dtype == torch.int64
    assert torch.isfinite(boxes).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all()
    assert (boxes[:, [1, 3]] <= height).all()


def write_image(path: Path, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> None:
    """A flat grey image of ``size`` (width, height) pixels at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path)
