"""A procedural shapes dataset: detection data made on the fly, so training needs no download.

Sample ``i`` of a split is a pure function of ``(seed, split, i)``: the numpy generator of
the key ``(seed, SPLIT_STREAMS[split], i)`` (the scheme of ``model.data.seeding``) draws
everything, so the same index gives the same pixels on any machine, and the train, val and
test splits never share a sample.

Each image has a cluttered background (a gradient or low-frequency colour blotches, unlabelled
distractor lines and irregular blobs, pixel noise) and 1-8 objects of six classes: circle,
square, triangle, star, cross (a plus sign) and bar (a horizontal or vertical rectangle with
a 3:1 to 6:1 aspect ratio). Objects may overlap, but an object is placed only if every earlier
object keeps at least ``MIN_VISIBLE`` of its pixels, so no label points at a hidden shape.

Boxes are xyxy, absolute 0-based pixel-edge coordinates (a box ``[0, 0, 1, 1]`` covers pixel
(0, 0) exactly), float32, and tight: each is the extent of the object's pixels that remain
visible in the final image, antialiased edges included.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset

from model.data.base import Annotation
from model.data.seeding import Purpose, numpy_generator

CLASS_NAMES = ["circle", "square", "triangle", "star", "cross", "bar"]
# Split -> the key's purpose word; distinct words give independent, disjoint streams.
SPLIT_STREAMS = {
    "train": Purpose.SYNTHETIC_TRAIN,
    "val": Purpose.SYNTHETIC_VAL,
    "test": Purpose.SYNTHETIC_TEST,
}
# Image sides drawn independently, so aspect ratios run from 1:2 to 2:1; the range matches the
# common SSD input sizes (300 and 512) and keeps a sample at a few milliseconds.
SIDE_RANGE = (300, 600)
# An object's larger box side as a fraction of the image's shorter side (log-uniform), from
# tiny objects (3 %, 9 px at the smallest image) to nearly full-frame ones (90 %).
SIZE_RANGE = (0.03, 0.9)
OBJECTS_RANGE = (1, 8)  # objects attempted per image, inclusive (the dataset's brief)
# Bars: long side over short side (the task's definition of a bar), short side >= 2 px.
BAR_ASPECT = (3.0, 6.0)
_MIN_BAR_THICKNESS = 2
# An earlier object must keep this fraction of its pixels when a later one is placed over it;
# below that the later object is re-placed (or dropped), so every label stays honest.
MIN_VISIBLE = 0.6
_PLACEMENT_TRIES = 4
# Object colour vs the mean colour under it: at least this Euclidean RGB distance, so objects
# stand out from the clutter (about a quarter of the 0-255 cube's diagonal, 441).
_MIN_CONTRAST = 100.0
# Supersampling factor for antialiased shape edges; big shapes need less.
_SUPERSAMPLE_SMALL, _SUPERSAMPLE_LARGE, _LARGE_SHAPE = 4, 2, 96
_NOISE_TILE = 1024  # side of the shared noise texture, larger than any image
_NOISE_SIGMA = (0.0, 8.0)  # per-image pixel-noise amplitude, in 0-255 units


@dataclass(frozen=True)
class _Placed:
    label: int  # 1..6, index into CLASS_NAMES plus one
    x: int
    y: int
    mask: np.ndarray  # uint8 (h, w) coverage 0..255, cropped to its non-zero extent


class SyntheticShapes(Dataset):
    """Procedural shapes: ``dataset[i] -> (image, target)``, the project's sample contract.

    ``image`` is a uint8 Tensor[3, H, W] RGB; ``target`` holds "boxes" (float32 [G, 4], xyxy
    absolute pixels), "labels" (int64 [G], 1..6 for CLASS_NAMES), "difficult" (bool [G], all
    False), "crowd_boxes" (float32 [0, 4]), "crowd_labels" (int64 [0]), "image_id" (``i``) and
    "file_name".

    Args:
        length: number of samples.
        split: "train", "val" or "test"; each has its own random stream.
        seed: base seed shared by the splits.
        objects: inclusive (min, max) number of objects attempted per image.
        clutter: draw gradients, noise and distractors; False gives a plain one-colour
            background (used to check that boxes are tight).
    """

    class_names: list[str] = CLASS_NAMES

    def __init__(
        self,
        length: int,
        *,
        split: str = "train",
        seed: int = 0,
        objects: tuple[int, int] = OBJECTS_RANGE,
        clutter: bool = True,
    ) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if split not in SPLIT_STREAMS:
            raise ValueError(f"split must be one of {sorted(SPLIT_STREAMS)}, got {split!r}")
        if not 1 <= objects[0] <= objects[1]:
            raise ValueError(f"objects must be (min, max) with 1 <= min <= max, got {objects}")
        self.length = length
        self.split = split
        self.name = f"synthetic ({split} stream)"
        self.seed = seed
        self.objects = objects
        self.clutter = clutter
        self.class_names = list(CLASS_NAMES)

    def __len__(self) -> int:
        return self.length

    def report(self) -> dict[str, int]:
        """Bad-data counts, as the file-backed datasets give them: none here."""
        return {}

    def annotations(self) -> Iterator[Annotation]:
        """Every sample's size and boxes, as ``DetectionDataset.annotations`` gives them; here
        each image is drawn, since its boxes are the pixels left visible."""
        for index in range(self.length):
            image, target = self[index]
            yield Annotation(image.shape[2], image.shape[1], target["boxes"], target["labels"])

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        index %= self.length
        rng = numpy_generator(self.seed, SPLIT_STREAMS[self.split], index)
        image, placed, owner = _render(rng, self.objects, self.clutter)
        boxes = _visible_boxes(placed, owner)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.tensor([p.label for p in placed], dtype=torch.int64),
            "difficult": torch.zeros(len(placed), dtype=torch.bool),
            "crowd_boxes": torch.zeros((0, 4), dtype=torch.float32),
            "crowd_labels": torch.zeros(0, dtype=torch.int64),
            "image_id": index,
            "file_name": f"synthetic/{self.split}/{index:07d}",
        }
        # (H, W, 3) -> (3, H, W)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), target


def _render(
    rng: np.random.Generator, objects: tuple[int, int], clutter: bool
) -> tuple[np.ndarray, list[_Placed], np.ndarray]:
    """One image, uint8 (H, W, 3); its placed objects; int8 (H, W) map of who owns each pixel.

    Owner 0 is background, k is ``placed[k - 1]``. Every object lies fully inside the image.
    """
    width, height = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, size=2))
    canvas = _background(rng, width, height) if clutter else _plain(rng, width, height)
    pixels = np.array(canvas)
    owner = np.zeros((height, width), dtype=np.int8)
    placed: list[_Placed] = []
    areas, visible = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        label = int(rng.integers(1, len(CLASS_NAMES) + 1))
        side = math.exp(rng.uniform(*np.log(SIZE_RANGE))) * min(width, height)
        mask = _shape_mask(rng, CLASS_NAMES[label - 1], side)
        inside = mask > 0
        h, w = mask.shape
        for _try in range(_PLACEMENT_TRIES):
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            region = owner[y : y + h, x : x + w]
            hidden = np.bincount(region[inside], minlength=len(placed) + 1)[1:]
            if np.all(visible - hidden >= MIN_VISIBLE * areas):
                break
        else:
            continue  # nowhere to put it without hiding an earlier object: leave it out
        region[inside] = len(placed) + 1
        visible = np.append(visible - hidden, inside.sum())
        areas = np.append(areas, inside.sum())
        placed.append(_Placed(label, x, y, mask))
        patch = pixels[y : y + h, x : x + w].astype(np.float32)
        colour = _contrasting_colour(rng, patch)
        alpha = mask[..., None].astype(np.float32) / 255.0
        pixels[y : y + h, x : x + w] = (patch + alpha * (colour - patch) + 0.5).astype(np.uint8)
    if clutter:
        pixels = _add_noise(rng, pixels)
    return pixels, placed, owner


def _visible_boxes(placed: list[_Placed], owner: np.ndarray) -> np.ndarray:
    """Float32 (G, 4) xyxy pixel-edge boxes around the pixels each object still owns."""
    boxes = np.zeros((len(placed), 4), dtype=np.float32)
    for k, p in enumerate(placed, start=1):
        h, w = p.mask.shape
        mine = owner[p.y : p.y + h, p.x : p.x + w] == k
        cols, rows = np.flatnonzero(mine.any(axis=0)), np.flatnonzero(mine.any(axis=1))
        boxes[k - 1] = (p.x + cols[0], p.y + rows[0], p.x + cols[-1] + 1, p.y + rows[-1] + 1)
    return boxes


def _shape_mask(rng: np.random.Generator, name: str, side: float) -> np.ndarray:
    """Antialiased coverage mask, uint8 (h, w), of one shape whose larger side is ~``side``."""
    if name == "bar":
        # Integer-aligned, so the mask is exact and the aspect ratio is exactly in BAR_ASPECT.
        aspect = rng.uniform(*BAR_ASPECT)
        thick = max(_MIN_BAR_THICKNESS, round(side / aspect))
        length = min(max(round(thick * aspect), 3 * thick), 6 * thick)
        shape = (thick, length) if rng.random() < 0.5 else (length, thick)
        return np.full(shape, 255, dtype=np.uint8)
    factor = _SUPERSAMPLE_SMALL if side < _LARGE_SHAPE else _SUPERSAMPLE_LARGE
    size = max(1, round(side * factor))
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    if name == "circle":
        draw.ellipse((0, 0, size - 1, size - 1), fill=255)
    else:
        points = _unit_polygon(rng, name)
        # Scale the rotated polygon so its larger extent fills the canvas.
        low, high = points.min(axis=0), points.max(axis=0)
        points = (points - low) / (high - low).max() * (size - 1)
        draw.polygon([tuple(p) for p in points.tolist()], fill=255)
    small = image.reduce(factor) if factor > 1 else image
    crop = small.getbbox()
    return np.asarray(small.crop(crop) if crop else small)


def _unit_polygon(rng: np.random.Generator, name: str) -> np.ndarray:
    """Vertices (n, 2) of a shape around the origin, randomly rotated (cross: by up to 15°)."""
    if name == "square":
        points = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
        angle = rng.uniform(0.0, math.pi / 2)
    elif name == "triangle":
        # Equilateral, then stretched by up to 25 % along one axis so not all look alike.
        t = np.array([90.0, 210.0, 330.0]) * math.pi / 180
        points = np.stack([np.cos(t), np.sin(t) * rng.uniform(0.8, 1.25)], axis=1)
        angle = rng.uniform(0.0, 2 * math.pi)
    elif name == "star":
        # Inner radius 0.38 is the regular pentagram's (1 / golden ratio²); fatter up to 0.5.
        t = np.arange(10) * math.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        points = np.stack([np.cos(t) * radius, np.sin(t) * radius], axis=1)
        angle = rng.uniform(0.0, 2 * math.pi)
    elif name == "cross":
        # Half arm thickness over half arm length: thin (0.15) to chunky (0.3) plus signs,
        # all clearly unlike a square (1.0) or a bar (one arm only).
        a = rng.uniform(0.15, 0.3)
        points = np.array([
            [-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a],
            [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a],
        ])  # fmt: skip
        # A plus sign stays a plus sign: rotate by at most 15°, never towards an "x".
        angle = rng.uniform(-math.pi / 12, math.pi / 12)
    else:
        raise ValueError(f"no polygon for shape {name!r}")
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    mean = under.reshape(-1, 3).mean(axis=0)
    colour = rng.integers(0, 256, size=3).astype(np.float32)
    for _ in range(8):
        if np.linalg.norm(colour - mean) >= _MIN_CONTRAST:
            break
        colour = rng.integers(0, 256, size=3).astype(np.float32)
    else:
        colour = np.where(mean < 128, 255.0, 0.0).astype(np.float32)  # the opposite corner
    return colour


def _plain(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    return Image.new("RGB", (width, height), colour)


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Gradient or colour blotches, then unlabelled lines and irregular blobs."""
    # A tiny random colour grid blown up bilinearly: 2x2 is a gradient, larger is blotchy.
    grid = int(rng.choice([1, 2, 2, 3, 5]))
    cells = rng.integers(0, 256, size=(grid, grid, 3), dtype=np.uint8)
    image = Image.fromarray(cells).resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    for _ in range(int(rng.integers(0, 7))):
        start = rng.uniform((0, 0), (width, height))
        angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.25, 1.0) * short
        end = start + length * np.array([math.cos(angle), math.sin(angle)])
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line([tuple(start), tuple(end)], fill=colour, width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(0, 5))):
        n = int(rng.integers(7, 12))
        t = np.sort(rng.uniform(0, 2 * math.pi, size=n))
        radius = rng.uniform(0.03, 0.15) * short * rng.uniform(0.5, 1.0, size=n)
        centre = rng.uniform((0, 0), (width, height))
        points = centre + np.stack(
            [np.cos(t) * radius, np.sin(t) * radius * rng.uniform(0.4, 1.0)], 1
        )
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.polygon([tuple(p) for p in points.tolist()], fill=colour)
    return image


_noise_tile: np.ndarray | None = None


def _add_noise(rng: np.random.Generator, pixels: np.ndarray) -> np.ndarray:
    """Zero-mean Gaussian pixel noise, sigma drawn per image, from a shared fixed texture.

    A fresh 600x600x3 normal draw costs more than the rest of the sample, so the noise is a
    random window of one texture made once from a fixed seed; the sample stays a pure
    function of its seed.
    """
    global _noise_tile
    if _noise_tile is None:
        tile = np.random.default_rng(0).standard_normal((_NOISE_TILE, _NOISE_TILE, 3))
        _noise_tile = tile.astype(np.float32)
    sigma = rng.uniform(*_NOISE_SIGMA)
    h, w = pixels.shape[:2]
    y, x = int(rng.integers(0, _NOISE_TILE - h + 1)), int(rng.integers(0, _NOISE_TILE - w + 1))
    noisy = pixels + sigma * _noise_tile[y : y + h, x : x + w]
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
