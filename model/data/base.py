"""The sample contract and ``DetectionDataset``, the base of the datasets read from disk.

The readers live beside this file: ``model.data.voc.VocDataset`` (Pascal VOC XML) and
``model.data.coco.CocoDataset`` (COCO JSON), both built on ``DetectionDataset`` here, and
``model.data.synthetic.SyntheticShapes``. This module imports none of them, nor the package.

Every one of them follows one sample contract::

    dataset[i] -> (image, target)
    image:  uint8 Tensor[3, H, W], RGB (greyscale, CMYK, palette and alpha images converted)
    target: "boxes"        float32 Tensor[G, 4], xyxy, absolute 0-based pixel-edge coordinates
                           of that image (a box [0, 0, 1, 1] covers exactly pixel (0, 0))
            "labels"       int64 Tensor[G], 1..C-1; label k is class_names[k - 1], 0 is background
            "difficult"    bool Tensor[G]
            "crowd_boxes"  float32 Tensor[K, 4], xyxy: regions an evaluator should ignore
            "crowd_labels" int64 Tensor[K], 1..C-1: each crowd region's class (COCOeval ignores
                           a crowd region only for detections of its class); empty but for COCO
            "image_id"     int
            "file_name"    str
    and from CocoDataset only, for COCOeval's small/medium/large split:
            "areas"        float64 Tensor[G], square pixels: the JSON's ``area`` (the
                           segmentation's, not the box's), float64 so it stays exact
            "crowd_areas"  float64 Tensor[K], the same for the crowd regions

Bad data never crashes a run or reaches the loss as NaN. Boxes partly outside the image are
clipped to it; boxes with no area left, non-finite coordinates, unknown class names (when the
classes are fixed), missing or unreadable annotation and image files are skipped. Each kind is
counted in ``report()`` and logged once when the dataset is built. An image that opens but
fails to decode (a truncated JPEG) is found only when loaded: it is counted then, logged, and
the next good sample is returned in its place. With a multi-worker DataLoader those load-time
counts stay in the worker that met the image.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from model.data.seeding import Purpose, text_key, torch_seed
from model.network.boxes import clip_and_sanitize
from model.network.preprocessing import to_rgb_tensor

logger = logging.getLogger(__name__)

# The parts of a dataset a caller can ask for (``load_dataset``'s and the CLIs' ``--split``).
SPLITS = ("train", "val", "test", "all")
# Everything Pillow raises for a file it cannot open or decode.
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# The kinds of bad data counted by report(), in the order they are logged.
REPORT_KEYS = (
    "missing_annotations",
    "unreadable_annotations",
    "missing_images",
    "unreadable_images",
    "malformed_objects",
    "unknown_classes",
    "clipped_boxes",
    "zero_area_boxes",
    "size_mismatches",
)


class Annotation(NamedTuple):
    """One image's size and objects, as ``annotations()`` gives them (crowd regions left out)."""

    width: int  # pixels
    height: int  # pixels
    boxes: Tensor  # float32 [G, 4], xyxy, absolute 0-based pixel-edge coordinates
    labels: Tensor  # int64 [G], 1..C-1

    def relative(self) -> np.ndarray:
        """The boxes as float64 [G, 4], xyxy in 0-1 of the image's width and height: where
        they lie in the network's input after a plain resize."""
        scale = np.array([self.width, self.height, self.width, self.height], dtype=np.float64)
        return self.boxes.numpy().astype(np.float64).reshape(-1, 4) / scale


@dataclass
class Record:
    """One image as indexed: its file, the size its boxes are clipped to, and its objects."""

    path: Path
    file_name: str
    image_id: int
    size: tuple[int, int]  # (width, height) in pixels
    # xyxy pixel-edge boxes, as annotated while indexing, clipped by _finish_index.
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    difficult: list[bool] = field(default_factory=list)
    crowd_boxes: list[list[float]] = field(default_factory=list)
    crowd_labels: list[int] = field(default_factory=list)
    # Object areas in square pixels, when the annotation format has them (COCO); else None.
    # While indexing, None stands for an area the annotation lacks: the clipped box's is used.
    areas: list[float | None] | None = None
    crowd_areas: list[float | None] | None = None


class DetectionDataset(Dataset):
    """Images and boxes indexed once up front; base of the VOC and COCO readers.

    Subclasses fill ``records`` (objects via ``_add_object``) and call ``_finish_index``,
    which clips every box to its image and counts what it changed.
    ``target(i)`` gives an annotation without decoding its image.
    """

    def __init__(self, name: str, class_names: list[str]) -> None:
        self.name = name
        self.class_names = list(class_names)
        self.records: list[Record] = []
        self._counts: Counter[str] = Counter()
        self._bad: set[int] = set()  # indices whose image failed to decode
        self._mismatched: set[int] = set()  # indices whose image size differs from the index

    def __len__(self) -> int:
        return len(self.records)

    def report(self) -> dict[str, int]:
        """Counts of each kind of bad data met so far (see REPORT_KEYS), zeros included."""
        return {key: self._counts[key] for key in REPORT_KEYS}

    def target(self, index: int) -> dict[str, Any]:
        """The indexed annotation of sample ``index``, in the contract's format, no image read."""
        record = self.records[index]
        target = {
            "boxes": _box_tensor(record.boxes),
            "labels": torch.tensor(record.labels, dtype=torch.int64),
            "difficult": torch.tensor(record.difficult, dtype=torch.bool),
            "crowd_boxes": _box_tensor(record.crowd_boxes),
            "crowd_labels": torch.tensor(record.crowd_labels, dtype=torch.int64),
            "image_id": record.image_id,
            "file_name": record.file_name,
        }
        if record.areas is not None and record.crowd_areas is not None:
            target["areas"] = torch.tensor(record.areas, dtype=torch.float64)
            target["crowd_areas"] = torch.tensor(record.crowd_areas, dtype=torch.float64)
        return target

    def annotations(self) -> Iterator[Annotation]:
        """Every image's indexed size and boxes, in index order, with no image decoded.

        The size is the one the boxes were clipped to while indexing (the annotation's or
        the image header's); a wrong declared size is found only when the image is loaded.
        """
        for index, record in enumerate(self.records):
            target = self.target(index)
            yield Annotation(*record.size, target["boxes"], target["labels"])

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images in {self.name}")
        index %= len(self)
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            if candidate in self._bad:
                continue
            sample = self._load(candidate)
            if sample is not None:
                return sample
        raise RuntimeError(f"{self.name}: none of its {len(self)} images could be decoded")

    def _load(self, index: int) -> tuple[Tensor, dict[str, Any]] | None:
        record = self.records[index]
        try:
            with Image.open(record.path) as pil:
                image = to_rgb_tensor(pil)
        except _IMAGE_ERRORS as error:
            self._bad.add(index)
            self._counts["unreadable_images"] += 1
            logger.warning("%s: skipping unreadable image %s (%s)", self.name, record.path, error)
            return None
        target = self.target(index)
        height, width = image.shape[1:]
        if (width, height) != record.size:
            # The annotation's idea of the image size was wrong: clip to the real one.
            if index not in self._mismatched:
                self._mismatched.add(index)
                self._counts["size_mismatches"] += 1
                logger.warning(
                    "%s: %s is %dx%d, not %dx%d as indexed; boxes clipped to it",
                    self.name,
                    record.path,
                    width,
                    height,
                    *record.size,
                )
            # Per-object keys stay aligned with their boxes; areas keep the JSON's value.
            for keys in (_OBJECT_KEYS, _CROWD_KEYS):
                target[keys[0]], keep = clip_and_sanitize(target[keys[0]], (height, width))
                for key in keys[1:]:
                    if key in target:
                        target[key] = target[key][keep]
        return image, target

    def _add_object(
        self,
        record: Record,
        xyxy: list[float],
        label: int,
        *,
        difficult: bool = False,
        area: float | None = None,
        crowd: bool = False,
    ) -> None:
        """Add one object (an xyxy pixel-edge box, as annotated) to ``record``.

        A box with a non-finite coordinate is counted as malformed and left out; the others
        are clipped by ``_finish_index``. ``area`` (square pixels) is kept only for records
        that carry areas; None there means the clipped box's area.
        """
        if not all(math.isfinite(v) for v in xyxy):
            self._counts["malformed_objects"] += 1
            return
        areas = record.crowd_areas if crowd else record.areas
        if areas is not None:
            areas.append(area)
        if crowd:
            record.crowd_boxes.append(list(xyxy))
            record.crowd_labels.append(label)
        else:
            record.boxes.append(list(xyxy))
            record.labels.append(label)
            record.difficult.append(difficult)

    def _clip(self, record: Record) -> None:
        """Clip the record's boxes to its image, drop and count those left with no area."""
        width, height = record.size
        for crowd in (False, True):
            boxes = record.crowd_boxes if crowd else record.boxes
            if not boxes:
                continue
            raw = torch.tensor(boxes, dtype=torch.float64)
            clipped, keep = clip_and_sanitize(raw, (height, width))
            self._counts["zero_area_boxes"] += int((~keep).sum())
            self._counts["clipped_boxes"] += int((clipped != raw[keep]).any(dim=1).sum())
            kept = keep.nonzero().flatten().tolist()
            aligned = (
                [record.crowd_labels, record.crowd_areas]
                if crowd
                else [record.labels, record.difficult, record.areas]
            )
            for values in aligned:
                if values is not None:
                    values[:] = [values[i] for i in kept]
            boxes[:] = clipped.tolist()
            areas = record.crowd_areas if crowd else record.areas
            if areas is not None:  # an area the annotation lacks is the clipped box's
                areas[:] = [
                    (b[2] - b[0]) * (b[3] - b[1]) if a is None else a
                    for a, b in zip(areas, boxes, strict=True)
                ]

    def _finish_index(self) -> None:
        for record in self.records:
            self._clip(record)
        counts = {key: n for key, n in self.report().items() if n}
        boxes = sum(len(r.boxes) for r in self.records)
        summary = f"{self.name}: {len(self)} images, {boxes} boxes, {len(self.class_names)} classes"
        if counts:
            logger.warning("%s; bad data repaired or skipped: %s", summary, counts)
        else:
            logger.info("%s; no bad data", summary)


# Per-object target keys, the box first; a crowd region's keys likewise.
_OBJECT_KEYS = ("boxes", "labels", "difficult", "areas")
_CROWD_KEYS = ("crowd_boxes", "crowd_labels", "crowd_areas")


def holdout(stems: list[str], val_fraction: float) -> set[str]:
    """The stems (image ids or file names) held out for validation: a deterministic
    ``val_fraction`` of them.

    Stems are ordered by the first word of their own stream in ``model.data.seeding``
    (key ``(0, HOLDOUT, text_key(stem))``: stable across runs, machines and Python versions,
    and each stem's place independent of the others) and the first ``round(n * val_fraction)``
    are taken, at least one and at most n - 1 when there are two or more and the fraction is
    positive. A larger fraction therefore holds out a superset.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(len(stems) * val_fraction)
    if val_fraction > 0 and len(stems) >= 2:
        n_val = min(max(n_val, 1), len(stems) - 1)
    ordered = sorted(stems, key=lambda s: (torch_seed(0, Purpose.HOLDOUT, text_key(s)), s))
    return set(ordered[:n_val])


def _box_tensor(boxes: list[list[float]]) -> Tensor:
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image header, or None when Pillow cannot open the file."""
    try:
        with Image.open(path) as image:
            return image.size
    except _IMAGE_ERRORS:
        return None
