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


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A uint8 Tensor[3, height, width] of uniform noise."""
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=seeded(seed))


def random_boxes(
    n: int, height: int, width: int, g: torch.Generator, max_side: float = 0.6
) -> torch.Tensor:
    """n xyxy pixel boxes inside a height x width image, 1 pixel to max_side of it a side."""
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width - 1.0, height - 1.0])
    wh = 1.0 + torch.rand(n, 2, generator=g) * torch.tensor([width, height]) * max_side
    x1y1 = torch.minimum(xy + wh, torch.tensor([float(width), float(height)]))
    return torch.cat([xy, x1y1], dim=1)


def no_boxes() -> tuple[torch.Tensor, torch.Tensor]:
    """Empty boxes Tensor[0, 4] and labels Tensor[0], as the sample contract has them."""
    return torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
