"""COCO JSON detection annotations: ``CocoDataset``.

Samples follow the contract in ``model.data.base``, with the COCO-only "areas" and
"crowd_areas" described there.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from model.data.base import SPLITS, DetectionDataset, Record, holdout, image_size
from model.network.boxes import xywh_to_xyxy

logger = logging.getLogger(__name__)


class CocoDataset(DetectionDataset):
    """COCO-style JSON detection annotations (``images``, ``annotations``, ``categories``).

    Which images: "all" and "test" take every image of the file, with or without objects (COCO
    ships its splits as separate files); "train" and "val" split one file as a VOC folder
    without split files is split: "val" takes the deterministic ``holdout`` of the file names,
    ``val_fraction`` of them, and "train" the rest.

    Boxes are ``[x, y, width, height]`` in pixel-edge coordinates, turned into xyxy. Categories,
    sorted by id, become labels 1..C-1 with their names kept, all of the file's categories
    whether used or not, but placeholders: a category that no annotation uses and that is
    named as another category's supercategory (Roboflow's exports carry their dataset's name
    as category 0, the supercategory of every real class) is dropped and logged.
    ``label_to_category_id`` and ``category_id_to_label`` map between the
    two. With ``classes`` fixed, categories are matched by name and annotations of other
    categories are skipped and counted. ``iscrowd`` annotations are never training boxes; they
    go to ``target["crowd_boxes"]`` and ``target["crowd_labels"]``. Each annotation's ``area``
    (the segmentation's area in square pixels, which COCOeval uses for small/medium/large) goes
    to ``target["areas"]`` or ``target["crowd_areas"]``; the clipped box's area stands in when
    the field is missing.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotations: str | Path,
        *,
        classes: list[str] | None = None,
        split: str = "all",
        val_fraction: float = 0.1,
    ) -> None:
        images_dir, annotations = Path(images_dir), Path(annotations)
        if not images_dir.is_dir():
            raise FileNotFoundError(f"COCO images folder not found: {images_dir}")
        try:
            data = json.loads(annotations.read_text())
            categories = sorted(data["categories"], key=lambda c: c["id"])
            images = data["images"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"cannot read COCO annotations {annotations}: {error}") from error
        if classes is None:
            categories = self._drop_placeholders(categories, data.get("annotations", []))
            classes = [c["name"] for c in categories]
        part = f"{split}: every image" if split in ("all", "test") else split
        if split == "val":
            part = f"val: held out {val_fraction:g}"
        elif split == "train":
            part = f"train: the rest of a holdout of {val_fraction:g}"
        super().__init__(f"coco:{images_dir}:{annotations} ({part})", classes)
        label_of_name = {name: k for k, name in enumerate(self.class_names, start=1)}
        self.category_id_to_label = {
            c["id"]: label_of_name[c["name"]] for c in categories if c["name"] in label_of_name
        }
        self.label_to_category_id = {v: k for k, v in self.category_id_to_label.items()}
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        other_split: list[Any] = []  # ids of the images the other part of the file takes
        if split in ("train", "val"):
            held_out = holdout([str(image.get("file_name", "")) for image in images], val_fraction)
            ours = [(str(i.get("file_name", "")) in held_out) == (split == "val") for i in images]
            other_split = [i.get("id") for i, mine in zip(images, ours, strict=True) if not mine]
            images = [i for i, mine in zip(images, ours, strict=True) if mine]
        by_id = self._index_images(images, images_dir)
        # The other part's annotations are skipped without being counted as bad data.
        by_id.update(dict.fromkeys(other_split))
        self._index_objects(data.get("annotations", []), by_id)
        self._finish_index()

    @staticmethod
    def _drop_placeholders(
        categories: list[dict[str, Any]], annotations: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """``categories`` without the placeholders (see the class), which are logged."""
        used = {ann.get("category_id") for ann in annotations if isinstance(ann, dict)}
        placeholders = [
            c
            for c in categories
            if c["id"] not in used
            and any(o is not c and o.get("supercategory") == c["name"] for o in categories)
        ]
        if placeholders:
            logger.info(
                "COCO categories dropped as placeholders (no annotation uses them, and they "
                "name other categories' supercategory): %s",
                ", ".join(f"{c['id']} {c['name']!r}" for c in placeholders),
            )
        return [c for c in categories if not any(c is p for p in placeholders)]

    def _index_images(
        self, images: list[dict[str, Any]], images_dir: Path
    ) -> dict[int, Record | None]:
        """A record per usable image of the JSON, by image id (None: missing or unreadable,
        counted)."""
        by_id: dict[int, Record | None] = {}  # None: the image is missing or unreadable
        for image in images:
            path = images_dir / str(image.get("file_name", ""))
            by_id[image.get("id")] = None
            if not path.is_file():
                self._counts["missing_images"] += 1
                continue
            # Sizes come from the JSON (reading 118k headers would be slow); a wrong one is
            # caught and repaired when the image is loaded (size_mismatches).
            declared = (image.get("width"), image.get("height"))
            size: tuple[int, int] | None
            if all(isinstance(v, int | float) and v > 0 for v in declared):
                size = (int(declared[0]), int(declared[1]))
            else:
                size = image_size(path)
            if size is None:
                self._counts["unreadable_images"] += 1
                continue
            record = Record(
                path, image["file_name"], int(image["id"]), size, areas=[], crowd_areas=[]
            )
            by_id[record.image_id] = record
            self.records.append(record)
        return by_id

    def _index_objects(
        self, annotations: list[dict[str, Any]], by_id: dict[int, Record | None]
    ) -> None:
        """Add each usable annotation to its image's record; count and skip the rest."""
        # (record, label, area or None, crowd) and the xywh box of each usable annotation.
        objects: list[tuple[Record, int, float | None, bool]] = []
        xywh: list[list[float]] = []
        for ann in annotations:
            if ann.get("image_id") in by_id and by_id[ann["image_id"]] is None:
                continue  # its image was already counted as missing or unreadable
            owner = by_id.get(ann.get("image_id"))
            bbox = ann.get("bbox")
            if owner is None or not _is_xywh(bbox):
                self._counts["malformed_objects"] += 1
                continue
            label = self.category_id_to_label.get(ann.get("category_id"))
            if label is None:
                self._counts["unknown_classes"] += 1
                continue
            area = ann.get("area")
            area = float(area) if _is_number(area) and math.isfinite(area) else None
            objects.append((owner, label, area, bool(ann.get("iscrowd", 0))))
            xywh.append([float(v) for v in bbox])
        # All boxes converted at once: one call instead of one per annotation.
        xyxy = xywh_to_xyxy(torch.tensor(xywh, dtype=torch.float64).reshape(-1, 4)).tolist()
        for (owner, label, area, crowd), box in zip(objects, xyxy, strict=True):
            self._add_object(owner, box, label, area=area, crowd=crowd)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_xywh(bbox: object) -> bool:
    return isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
