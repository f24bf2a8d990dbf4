"""A second, independently drawn shapes set, to check the shipped model beyond its generator.

Nothing here comes from ``model.data.synthetic``: shapes are drawn with Pillow's own primitives
(``regular_polygon``, ``ellipse``, ``rectangle``), aliased rather than supersampled, most
with a dark outline around a flat fill, often pasted onto real photographs (the raccoon
photos, when the shared datasets are present) instead of procedural clutter. Proportions are
the ones a person would pick (a plus sign with arms a third as thick as they are long, a 4:1
bar), not the generator's ranges. Boxes are the tight extent of each shape's own pixels.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms.v2.functional import pil_to_tensor

from model.data.synthetic import CLASS_NAMES

_FILLS = [(220, 40, 40), (40, 90, 220), (30, 160, 60), (240, 190, 20), (150, 60, 200),
          (20, 20, 20), (250, 250, 250), (240, 120, 20)]  # fmt: skip


def _draw(
    draw: ImageDraw.ImageDraw,
    name: str,
    cx: float,
    cy: float,
    side: float,
    rng: random.Random,
    fill,
    outline,
) -> None:
    r = side / 2
    width = max(1, round(side / 25)) if outline else 0
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
    elif name == "square":
        draw.regular_polygon(
            (cx, cy, r), 4, rotation=rng.uniform(0, 90), fill=fill, outline=outline, width=width
        )
    elif name == "triangle":
        draw.regular_polygon(
            (cx, cy, r), 3, rotation=rng.uniform(0, 120), fill=fill, outline=outline, width=width
        )
    elif name == "star":
        start = rng.uniform(0, 72)
        angles = [start + 36 * k for k in range(10)]
        points = [
            (
                cx + (r if k % 2 == 0 else 0.45 * r) * np.cos(np.radians(a)),
                cy + (r if k % 2 == 0 else 0.45 * r) * np.sin(np.radians(a)),
            )
            for k, a in enumerate(angles)
        ]
        draw.polygon(points, fill=fill, outline=outline, width=width)
    elif name == "cross":
        t = side / 6  # arms a third as thick as the cross is wide
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif name == "bar":
        t = side / 8  # 4:1
        box = (
            (cx - r, cy - t, cx + r, cy + t)
            if rng.random() < 0.5
            else (cx - t, cy - r, cx + t, cy + r)
        )
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    else:
        raise ValueError(name)


def _background(rng: random.Random, size: tuple[int, int], photos: list[Path]) -> Image.Image:
    if photos and rng.random() < 0.6:
        return Image.open(rng.choice(photos)).convert("RGB").resize(size)
    return Image.new("RGB", size, tuple(rng.randrange(90, 256) for _ in range(3)))


def hand_drawn_set(
    count: int,
    *,
    seed: int = 7,
    side_range: tuple[int, int] = (40, 160),
    photos: list[Path] | None = None,
    image_size: tuple[int, int] = (480, 360),
) -> list[tuple[torch.Tensor, dict]]:
    """``count`` (uint8 Tensor[3, H, W], target) pairs with 1-4 non-overlapping shapes each,
    in the project's sample contract (``model.data.base``)."""
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        image = _background(rng, image_size, photos or [])
        boxes, labels, placed = [], [], []
        for _ in range(rng.randint(1, 4)):
            side = rng.uniform(*side_range)
            for _try in range(20):
                cx = rng.uniform(side / 2 + 2, image_size[0] - side / 2 - 2)
                cy = rng.uniform(side / 2 + 2, image_size[1] - side / 2 - 2)
                if all(
                    abs(cx - x) > (side + s) / 2 + 4 or abs(cy - y) > (side + s) / 2 + 4
                    for x, y, s in placed
                ):
                    break
            else:
                continue
            name = rng.choice(CLASS_NAMES)
            mask = Image.new("L", image_size, 0)
            _draw(
                ImageDraw.Draw(mask),
                name,
                cx,
                cy,
                side,
                random.Random(index * 31 + len(placed)),
                255,
                255 if name != "cross" else None,
            )
            fill = rng.choice(_FILLS)
            outline = (0, 0, 0) if rng.random() < 0.6 and name != "cross" else None
            _draw(
                ImageDraw.Draw(image),
                name,
                cx,
                cy,
                side,
                random.Random(index * 31 + len(placed)),
                fill,
                outline,
            )
            ys, xs = np.nonzero(np.asarray(mask))
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(CLASS_NAMES.index(name) + 1)
            placed.append((cx, cy, side))
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "difficult": torch.zeros(len(labels), dtype=torch.bool),
            "image_id": index,
            "file_name": f"hand_drawn/{index:04d}.png",
        }
        samples.append((pil_to_tensor(image), target))
    return samples
