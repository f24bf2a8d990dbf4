"""YOLO (Ultralytics) text labels and their ``data.yaml``: ``YoloDataset``.

The export most labelling tools offer (Roboflow, CVAT, Label Studio, Ultralytics itself).
Samples follow the contract in ``model.data.base``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from model.data.base import SPLITS, DetectionDataset, Record, holdout, image_size
from model.data.voc import IMAGE_SUFFIXES
from model.network.boxes import clip_and_sanitize, cxcywh_to_xyxy

logger = logging.getLogger(__name__)

# How far outside 0-1 a normalised value may lie and still be taken (then clipped to the
# image): exporters that round pixel coordinates, or add float noise (1.0000001), land up to a
# pixel outside, and a pixel is 0.01 of a 100-pixel side. Beyond that the numbers are not
# normalised at all (pixels, or a 0-100 scale) and the line is skipped.
TOLERANCE = 0.01
# Exports write 6 decimals (Ultralytics, Roboflow): cx and w / 2 are each off by up to 5e-7, so
# a box drawn to the image's edge can end 1e-6 past it. A corner that close to 0 or 1 is put on
# the edge, not counted as clipped; 1e-5 leaves a factor of ten.
ROUNDING = 1e-5
# Bad lines logged one by one per dataset; the rest are only counted (report() has them all).
MAX_LOGGED_LINES = 20
# The data.yaml keys of the parts a split can name.
ENTRY_KEYS = ("train", "val", "test")


class YoloDataset(DetectionDataset):
    """A ``data.yaml`` and the YOLO label files of its images.

    data.yaml (Ultralytics' format): ``names`` as a list or an ``{id: name}`` map with ids
    0..n-1, ``nc`` (the class count; optional when ``names`` is given, and then equal to its
    length); ``train``, ``val`` and ``test``, each a folder of images (searched recursively), a
    ``.txt`` file listing image paths, or a list of either. They are relative to ``path:`` when
    it is given (itself relative to the yaml's folder when relative), else to the yaml's
    folder; an entry that does not exist but starts with ``../`` is also tried without it, as
    Ultralytics does for Roboflow's exports (``train: ../train/images`` beside the yaml).
    A path listed in a ``.txt`` file is relative to that file's folder, or else to the root.

    Labels: the image path with its last ``/images/`` replaced by ``/labels/`` and its suffix
    by ``.txt`` (Ultralytics' rule). One line per object: ``class cx cy w h``, normalised to
    0-1 of the image's width and height; or ``class x1 y1 x2 y2 x3 y3 ...`` (a segment, at
    least three points), whose bounding box is taken. Boxes become xyxy pixel-edge coordinates
    of the image; the image's size comes from its header. An image without a label file, or
    with an empty one, is a negative (no objects).

    Bad lines are skipped or repaired, counted in ``report()`` and logged with file and line:
    a wrong field count or a non-number (malformed_objects), a class id out of range
    (unknown_classes), a value outside 0-1 by more than ``TOLERANCE`` (malformed_objects; within
    it the box is clipped to the image, clipped_boxes), no area left (zero_area_boxes).

    Which images: "train", "val" and "test" take their entry; "val" without a ``val`` entry is
    the deterministic ``holdout`` (``val_fraction`` of the train entry's images, by their path
    under the root) and "train" is then the rest; "test" without a ``test`` entry and "all"
    take every entry's images.

    Classes: ``names`` in id order (label k is class id k - 1), unless ``classes`` fixes them;
    then objects of other names are skipped and counted (unknown_classes), not logged.
    """

    def __init__(
        self,
        data_yaml: str | Path,
        *,
        split: str = "all",
        val_fraction: float = 0.1,
        classes: list[str] | None = None,
    ) -> None:
        data_yaml = Path(data_yaml)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not data_yaml.is_file():
            raise FileNotFoundError(f"YOLO data.yaml not found: {data_yaml}")
        try:
            data = yaml.safe_load(data_yaml.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise ValueError(f"cannot read YOLO data.yaml {data_yaml}: {error}") from error
        if not isinstance(data, dict):
            raise ValueError(f"{data_yaml} must hold a mapping, got {type(data).__name__}")
        names = _class_names(data, data_yaml)
        super().__init__(f"yolo:{data_yaml} ({split})", names if classes is None else classes)
        self.root = _root(data, data_yaml)
        self.data_yaml = data_yaml
        self._logged = 0
        label_of_name = {name: k for k, name in enumerate(self.class_names, start=1)}
        # YOLO class id -> label, for the ids whose name is among the classes.
        self._label_of_id = {i: label_of_name[n] for i, n in enumerate(names) if n in label_of_name}
        self._n_ids = len(names)
        # Image ids are positions among every entry's images, so all splits of a yaml agree
        # (an entry whose folder is missing, as Roboflow's test often is, fails only "all").
        present = self._entries(data, list(ENTRY_KEYS), strict=False)
        ordinal = {path: k for k, path in enumerate(present)}
        for path in self._select(data, split, val_fraction):
            self._index_image(path, ordinal.get(path, len(ordinal)))
        if self._logged > MAX_LOGGED_LINES:
            logger.warning(
                "%s: %d more bad lines not listed", self.name, self._logged - MAX_LOGGED_LINES
            )
        self._finish_index()

    def _select(self, data: dict[str, Any], split: str, val_fraction: float) -> list[str]:
        """The image paths this dataset uses, in order."""
        if split == "all" or (split == "test" and not data.get("test")):
            given = [k for k in ENTRY_KEYS if data.get(k)]
            if not given:
                raise ValueError(f"{self.data_yaml} has no {' / '.join(ENTRY_KEYS)} entry")
            return self._entries(data, given)
        if split == "test" or data.get("val"):
            return self._entries(data, [split])
        train = self._entries(data, ["train"])
        held_out = holdout([self._file_name(p) for p in train], val_fraction)
        return [p for p in train if (self._file_name(p) in held_out) == (split == "val")]

    def _entries(self, data: dict[str, Any], keys: list[str], *, strict: bool = True) -> list[str]:
        """The image paths of the yaml's entries ``keys``, in order, each once. ``strict``:
        an absent entry or a missing path is an error, else left out."""
        paths: dict[str, None] = {}
        for key in keys:
            entry = data.get(key)
            if not entry and strict:
                raise ValueError(f"{self.data_yaml} has no {key} entry")
            for item in (entry if isinstance(entry, list) else [entry]) if entry else []:
                try:
                    paths.update(dict.fromkeys(self._entry_images(key, str(item))))
                except FileNotFoundError:
                    if strict:
                        raise
        return list(paths)

    def _entry_images(self, key: str, item: str) -> list[str]:
        """The image paths one entry names (a folder, a .txt list or an image)."""
        path = self._under_root(item)
        if not os.path.exists(path) and item.startswith("../"):
            path = self._under_root(item[3:])
        if os.path.isdir(path):
            found = (
                os.path.join(folder, file)
                for folder, _, files in os.walk(path, followlinks=True)
                for file in files
            )
            return sorted(p for p in found if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        if os.path.isfile(path) and path.endswith(".txt"):
            listed = [line.strip() for line in Path(path).read_text().splitlines()]
            beside = os.path.dirname(path)
            return [_listed(line, beside, str(self.root)) for line in listed if line]
        if os.path.isfile(path):
            return [path]
        raise FileNotFoundError(f"{self.data_yaml}: {key} entry {item!r} not found: {path}")

    def _under_root(self, item: str) -> str:
        return os.path.normpath(item if os.path.isabs(item) else os.path.join(self.root, item))

    def _file_name(self, path: str) -> str:
        """The image's path under the root (posix), or its whole path when outside it."""
        relative = os.path.relpath(path, self.root)
        return Path(path).as_posix() if relative.startswith("..") else Path(relative).as_posix()

    def _index_image(self, path: str, image_id: int) -> None:
        if not os.path.isfile(path):
            self._counts["missing_images"] += 1
            return
        size = image_size(Path(path))
        if size is None:
            self._counts["unreadable_images"] += 1
            return
        label_file = label_path(path)
        lines: list[str] = []
        if os.path.exists(label_file):
            try:
                lines = Path(label_file).read_text().splitlines()
            except (OSError, UnicodeDecodeError):
                self._counts["unreadable_annotations"] += 1
                return
        record = Record(Path(path), self._file_name(path), image_id, size)
        self._add_lines(record, label_file, lines)
        self.records.append(record)

    def _add_lines(self, record: Record, label_file: str, lines: list[str]) -> None:
        """Add each good line of a label file to ``record``; count and log the bad ones."""
        # line number, label, normalised box, whether it is cxcywh (else xyxy, a segment's)
        parsed: list[tuple[int, int, list[float], bool]] = []
        for number, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields:
                continue
            result = self._parse_line(fields)
            if isinstance(result, str):
                kind, why = result.split(":", 1)
                if kind != "unlisted":
                    self._counts[kind] += 1
                    self._log_line(label_file, number, why)
                else:
                    self._counts["unknown_classes"] += 1
                continue
            parsed.append((number, *result))
        if not parsed:
            return
        width, height = record.size
        scale = torch.tensor([width, height, width, height], dtype=torch.float64)
        # (G, 4) normalised xyxy -> pixels, with the export's rounding at the edges undone
        normalised = torch.tensor([box for _, _, box, _ in parsed], dtype=torch.float64)
        centred = torch.tensor([is_cxcywh for *_, is_cxcywh in parsed])
        normalised[centred] = cxcywh_to_xyxy(normalised[centred])
        normalised[normalised.abs() < ROUNDING] = 0.0
        normalised[(normalised - 1).abs() < ROUNDING] = 1.0
        boxes = normalised * scale
        _, keep = clip_and_sanitize(boxes, (height, width))
        rows = zip(parsed, boxes.tolist(), keep.tolist(), strict=True)
        for (number, label, *_), box, kept in rows:
            if not kept:
                self._counts["zero_area_boxes"] += 1
                self._log_line(label_file, number, "no area inside the image; line skipped")
                continue
            if min(box) < 0 or max(box[0], box[2]) > width or max(box[1], box[3]) > height:
                # Counted as clipped_boxes by _finish_index, which clips it.
                self._log_line(label_file, number, "box clipped to the image")
            self._add_object(record, box, label)

    def _parse_line(self, fields: list[str]) -> tuple[int, list[float], bool] | str:
        """(label, normalised box, whether the box is cxcywh rather than xyxy) of one line's
        fields, or "report_key:why" for a bad line ("unlisted:" for a class left out by
        ``classes``)."""
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            return (
                f"malformed_objects:{len(fields)} fields, not 5 (class cx cy w h) nor an odd "
                "number of at least 7 (a segment); line skipped"
            )
        try:
            number = float(fields[0])
            values = [float(v) for v in fields[1:]]
        except ValueError:
            return f"malformed_objects:not all numbers: {' '.join(fields)!r}; line skipped"
        if not all(math.isfinite(v) for v in values) or not number.is_integer():
            return (
                f"malformed_objects:not all finite, or class {fields[0]} not an integer; "
                "line skipped"
            )
        class_id = int(number)
        if not 0 <= class_id < self._n_ids:
            return f"unknown_classes:class {class_id} not in 0..{self._n_ids - 1}; line skipped"
        if class_id not in self._label_of_id:
            return "unlisted:"
        outside = [v for v in values if not -TOLERANCE <= v <= 1 + TOLERANCE]
        if outside:
            return (
                f"malformed_objects:{outside[0]} outside 0-1 by more than {TOLERANCE} "
                "(not normalised?); line skipped"
            )
        if len(values) == 4:  # cx cy w h, turned into xyxy per file (one call, not per line)
            return self._label_of_id[class_id], values, True
        xs, ys = values[0::2], values[1::2]  # a segment: x1 y1 x2 y2 ..., its bounding box
        return self._label_of_id[class_id], [min(xs), min(ys), max(xs), max(ys)], False

    def _log_line(self, label_file: str, number: int, why: str) -> None:
        self._logged += 1
        if self._logged <= MAX_LOGGED_LINES:
            logger.warning("%s: %s:%d: %s", self.name, label_file, number, why)


def label_path(image_path: str) -> str:
    """The label file of an image, by Ultralytics' rule: the last ``/images/`` of the path
    becomes ``/labels/`` and the suffix ``.txt`` (beside the image when there is no
    ``/images/``)."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    head, found, tail = image_path.rpartition(images)
    swapped = f"{head}{labels}{tail}" if found else image_path
    return os.path.splitext(swapped)[0] + ".txt"


def _class_names(data: dict[str, Any], data_yaml: Path) -> list[str]:
    """``names`` in id order, checked against ``nc``."""
    names, count = data.get("names"), data.get("nc")
    if isinstance(names, dict):
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError) as error:
            raise ValueError(f"{data_yaml}: names ids must be integers, got {names}") from error
        if sorted(by_id) != list(range(len(by_id))):
            raise ValueError(f"{data_yaml}: names ids must be 0..{len(by_id) - 1}, got {names}")
        names = [by_id[i] for i in range(len(by_id))]
    elif isinstance(names, list):
        names = [str(n) for n in names]
    elif names is None and isinstance(count, int) and count > 0:
        names = [f"class_{i}" for i in range(count)]  # Ultralytics' names when it has none
    else:
        raise ValueError(f"{data_yaml}: names must be a list or an {{id: name}} map, got {names}")
    if count is not None and count != len(names):
        raise ValueError(f"{data_yaml}: nc is {count} but names has {len(names)}: {names}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{data_yaml}: names must be some distinct names, got {names}")
    return names


def _root(data: dict[str, Any], data_yaml: Path) -> Path:
    """The folder the entries are relative to: ``path:`` (relative to the yaml's folder when
    relative), else the yaml's folder."""
    base = data_yaml.parent
    if data.get("path"):
        return Path(os.path.normpath(base / str(data["path"])))
    return base


def _listed(line: str, beside: str, root: str) -> str:
    """A path from a .txt list: as is when absolute, else beside the list or, failing that,
    under the root."""
    if os.path.isabs(line):
        return line
    near = os.path.normpath(os.path.join(beside, line))
    under = os.path.normpath(os.path.join(root, line))
    return near if os.path.exists(near) or not os.path.exists(under) else under
