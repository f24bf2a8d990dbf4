"""Detection datasets read from disk (Pascal VOC XML, COCO JSON) and the ``--data`` spec.

Every dataset here, and ``model.synthetic.SyntheticShapes``, follows one sample contract::

    dataset[i] -> (image, target)
    image:  uint8 Tensor[3, H, W], RGB (greyscale, CMYK, palette and alpha images converted)
    target: "boxes"       float32 Tensor[G, 4], xyxy, absolute 0-based pixel-edge coordinates
                          of that image (a box [0, 0, 1, 1] covers exactly pixel (0, 0))
            "labels"      int64 Tensor[G], 1..C-1; label k is class_names[k - 1], 0 is background
            "difficult"   bool Tensor[G]
            "crowd_boxes" float32 Tensor[K, 4], xyxy: regions an evaluator should ignore
            "image_id"    int
            "file_name"   str

Bad data never crashes a run or reaches the loss as NaN. Boxes partly outside the image are
clipped to it; boxes with no area left, non-finite coordinates, unknown class names (when the
classes are fixed), missing or unreadable annotation and image files are skipped. Each kind is
counted in ``report()`` and logged once when the dataset is built. An image that opens but
fails to decode (a truncated JPEG) is found only when loaded: it is counted then, logged, and
the next good sample is returned in its place. With a multi-worker DataLoader those load-time
counts stay in the worker that met the image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from model.boxes import has_positive_area
from model.preprocessing import to_rgb_tensor
from model.synthetic import SyntheticShapes

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")
# Default lengths of the synthetic dataset when the spec gives no N.
SYNTHETIC_TRAIN_LENGTH, SYNTHETIC_EVAL_LENGTH = 10_000, 500
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
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


@dataclass
class _Record:
    """One image as indexed: its file, the size its boxes are clipped to, and its objects."""

    path: Path
    file_name: str
    image_id: int
    size: tuple[int, int]  # (width, height) in pixels
    boxes: list[list[float]] = field(default_factory=list)  # xyxy pixel-edge, clipped
    labels: list[int] = field(default_factory=list)
    difficult: list[bool] = field(default_factory=list)
    crowd_boxes: list[list[float]] = field(default_factory=list)


class DetectionDataset(Dataset):
    """Images and boxes indexed once up front; base of the VOC and COCO readers.

    Subclasses fill ``records`` (via ``_add_box``, which clips and counts) and call
    ``_finish_index``. ``target(i)`` gives an annotation without decoding its image.
    """

    def __init__(self, name: str, class_names: list[str]) -> None:
        self.name = name
        self.class_names = list(class_names)
        self.records: list[_Record] = []
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
        return {
            "boxes": _box_tensor(record.boxes),
            "labels": torch.tensor(record.labels, dtype=torch.int64),
            "difficult": torch.tensor(record.difficult, dtype=torch.bool),
            "crowd_boxes": _box_tensor(record.crowd_boxes),
            "image_id": record.image_id,
            "file_name": record.file_name,
        }

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
            limits = torch.tensor([width, height, width, height], dtype=torch.float32)
            for key in ("boxes", "crowd_boxes"):
                target[key] = torch.minimum(target[key], limits)
            crowd = target["crowd_boxes"]
            target["crowd_boxes"] = crowd[has_positive_area(crowd)]
            keep = has_positive_area(target["boxes"])
            for key in ("boxes", "labels", "difficult"):
                target[key] = target[key][keep]
        return image, target

    def _add_box(self, record: _Record, xyxy: list[float], *, crowd: bool = False) -> bool:
        """Clip an xyxy box to the record's image and keep it if it has area; counts both."""
        if not all(math.isfinite(v) for v in xyxy):
            self._counts["malformed_objects"] += 1
            return False
        width, height = record.size
        x0, y0, x1, y1 = xyxy
        clipped = [min(max(x0, 0.0), width), min(max(y0, 0.0), height)]
        clipped += [min(max(x1, 0.0), width), min(max(y1, 0.0), height)]
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            self._counts["zero_area_boxes"] += 1
            return False
        self._counts["clipped_boxes"] += clipped != list(xyxy)
        (record.crowd_boxes if crowd else record.boxes).append(clipped)
        return True

    def _finish_index(self) -> None:
        counts = {key: n for key, n in self.report().items() if n}
        boxes = sum(len(r.boxes) for r in self.records)
        summary = f"{self.name}: {len(self)} images, {boxes} boxes, {len(self.class_names)} classes"
        if counts:
            logger.warning("%s; bad data repaired or skipped: %s", summary, counts)
        else:
            logger.info("%s; no bad data", summary)


def _box_tensor(boxes: list[list[float]]) -> Tensor:
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image header, or None when Pillow cannot open the file."""
    try:
        with Image.open(path) as image:
            return image.size
    except _IMAGE_ERRORS:
        return None


def holdout(stems: list[str], val_fraction: float) -> set[str]:
    """The stems held out for validation: a deterministic ``val_fraction`` of them.

    Stems are ordered by the SHA-1 of their UTF-8 bytes (stable across runs, machines and
    Python versions, unlike ``hash``) and the first ``round(n * val_fraction)`` are taken,
    at least one and at most n - 1 when there are two or more and the fraction is positive.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(len(stems) * val_fraction)
    if val_fraction > 0 and len(stems) >= 2:
        n_val = min(max(n_val, 1), len(stems) - 1)
    ordered = sorted(stems, key=lambda s: (hashlib.sha1(s.encode()).hexdigest(), s))
    return set(ordered[:n_val])


# Pascal VOC ---------------------------------------------------------------------------------


class VocDataset(DetectionDataset):
    """Pascal VOC XML annotations, in a VOCdevkit folder or any folder of XML and images.

    Layouts: ``root/Annotations/*.xml`` + ``root/JPEGImages/`` (+ ``root/ImageSets/Main/``)
    as in the VOC devkit; or XML files directly in ``root`` or in its sub-folders, with the
    images in ``root`` or its sub-folders. Each XML's image is found by its ``filename`` tag,
    else by the XML's stem.

    Which images: ``image_set`` names ``ImageSets/Main/{image_set}.txt`` and is used as is.
    Without it, "all" and "test" take every image; "train" and "val" take
    ``ImageSets/Main/{split}.txt`` when it exists; else "val" takes the deterministic
    ``holdout(stems, val_fraction)`` and "train" the rest.

    Coordinates: VOC stores 1-based, inclusive pixel indices (VOC devkit, VOCevaldet.m computes
    a box's width as ``xmax - xmin + 1``). Pixel i (1-based) spans the pixel-edge interval
    [i - 1, i], so a box becomes ``(xmin - 1, ymin - 1, xmax, ymax)`` in 0-based pixel-edge
    coordinates, and its width stays ``xmax - xmin + 1``.

    Classes: the sorted names found in all of ``root``'s XML files (so every split of a folder
    agrees), unless ``classes`` fixes them; then objects of other names are skipped and counted.
    ``use_difficult=False`` drops objects marked difficult from the "train" split only;
    other splits always carry them, flagged in ``target["difficult"]``. The default follows
    the SSD authors' VOC recipe (ssd_pascal.py: ``train_on_diff_gt = True``).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        image_set: str | None = None,
        split: str = "all",
        val_fraction: float = 0.1,
        classes: list[str] | None = None,
        use_difficult: bool = True,
    ) -> None:
        root = Path(root)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not root.is_dir():
            raise FileNotFoundError(f"VOC folder not found: {root}")
        xml_files, image_dirs = _voc_layout(root)
        if not xml_files:
            raise FileNotFoundError(f"no VOC .xml annotation files in {root} or its sub-folders")
        name = f"voc:{root}" + (f":{image_set}" if image_set else f" ({split})")
        # Image ids are XML stems (VOC's convention), whichever folder the XML sits in.
        parsed = {path.stem: _parse_voc_xml(path) for path in xml_files}
        if classes is None:
            entries = [entry for entry in parsed.values() if entry is not None]
            classes = sorted(
                {obj[0] for entry in entries for obj in entry[1] if obj[1] is not None}
            )
        super().__init__(name, classes)
        selected = self._select(root, sorted(parsed), image_set, split, val_fraction)
        label_of = {c: k for k, c in enumerate(self.class_names, start=1)}
        keep_difficult = use_difficult or split != "train"
        images = _image_index(image_dirs)
        ordinal = {stem: k for k, stem in enumerate(sorted(parsed))}
        for stem in selected:
            if stem not in parsed:
                self._counts["missing_annotations"] += 1
                continue
            if parsed[stem] is None:
                self._counts["unreadable_annotations"] += 1
                continue
            filename, objects = parsed[stem]
            path = images.get(Path(filename).name) or images.get(Path(filename).stem)
            path = path or images.get(stem)
            if path is None:
                self._counts["missing_images"] += 1
                continue
            size = _image_size(path)
            if size is None:
                self._counts["unreadable_images"] += 1
                continue
            record = _Record(path, path.relative_to(root).as_posix(), ordinal[stem], size)
            for class_name, box, difficult in objects:
                if box is None:
                    self._counts["malformed_objects"] += 1
                elif class_name not in label_of:
                    self._counts["unknown_classes"] += 1
                elif (keep_difficult or not difficult) and self._add_box(record, box):
                    record.labels.append(label_of[class_name])
                    record.difficult.append(difficult)
            self.records.append(record)
        self._finish_index()

    @staticmethod
    def _select(
        root: Path, stems: list[str], image_set: str | None, split: str, val_fraction: float
    ) -> list[str]:
        """The image ids (XML stems) this dataset uses, in order."""
        set_dir = root / "ImageSets" / "Main"
        if image_set is not None:
            set_file = set_dir / f"{image_set}.txt"
            if not set_file.is_file():
                raise FileNotFoundError(f"VOC image set {image_set!r} not found: {set_file}")
            return _read_image_set(set_file)
        if split in ("all", "test"):
            return stems
        if (set_dir / f"{split}.txt").is_file():
            return _read_image_set(set_dir / f"{split}.txt")
        held_out = holdout(stems, val_fraction)
        return [s for s in stems if (s in held_out) == (split == "val")]


def _voc_layout(root: Path) -> tuple[list[Path], list[Path]]:
    """The XML files and the folders to look for images in, for either layout."""
    if (root / "Annotations").is_dir():
        xml_files = sorted((root / "Annotations").glob("*.xml"))
        jpeg_dir = root / "JPEGImages"
        return xml_files, [jpeg_dir] if jpeg_dir.is_dir() else [root]
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    xml_files = sorted(root.glob("*.xml")) or sorted(p for d in subdirs for p in d.glob("*.xml"))
    return xml_files, [root, *subdirs]


def _image_index(folders: list[Path]) -> dict[str, Path]:
    """Image file name -> path and stem -> path over ``folders``; the first folder wins."""
    index: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                index.setdefault(path.name, path)
                index.setdefault(path.stem, path)
    return index


def _read_image_set(path: Path) -> list[str]:
    # Class-specific set files carry a second column (1 / -1 / 0); the id is the first word.
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


VocObject = tuple[str, list[float] | None, bool]  # name, xyxy pixel-edge box or None, difficult


def _parse_voc_xml(path: Path) -> tuple[str, list[VocObject]] | None:
    """(filename tag, objects) of one VOC XML file, or None when it cannot be parsed."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return None
    filename = (root.findtext("filename") or "").strip()
    objects: list[VocObject] = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        box: list[float] | None
        try:
            bndbox = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (
                float(bndbox.findtext(tag, "")) for tag in ("xmin", "ymin", "xmax", "ymax")
            )
            box = [xmin - 1.0, ymin - 1.0, xmax, ymax]  # see VocDataset: 1-based to edges
        except (AttributeError, ValueError):
            box = None
        if not name:
            box = None  # an object without a class name is as malformed as one without a box
        objects.append((name, box, difficult))
    return filename, objects


# COCO ---------------------------------------------------------------------------------------


class CocoDataset(DetectionDataset):
    """COCO-style JSON detection annotations (``images``, ``annotations``, ``categories``).

    Every image of the file is used, with or without objects: COCO ships its splits as
    separate files. Boxes are ``[x, y, width, height]`` in pixel-edge coordinates, turned into
    xyxy. Categories, sorted by id, become labels 1..C-1 with their names kept, all of the
    file's categories whether used or not; ``label_to_category_id`` and
    ``category_id_to_label`` map between the two. With ``classes`` fixed, categories are
    matched by name and annotations of other categories are skipped and counted.
    ``iscrowd`` annotations are never training boxes; they go to ``target["crowd_boxes"]``.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotations: str | Path,
        *,
        classes: list[str] | None = None,
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
            classes = [c["name"] for c in categories]
        super().__init__(f"coco:{images_dir}:{annotations}", classes)
        label_of_name = {name: k for k, name in enumerate(self.class_names, start=1)}
        self.category_id_to_label = {
            c["id"]: label_of_name[c["name"]] for c in categories if c["name"] in label_of_name
        }
        self.label_to_category_id = {v: k for k, v in self.category_id_to_label.items()}
        by_id: dict[int, _Record | None] = {}  # None: the image is missing or unreadable
        for image in images:
            path = images_dir / str(image.get("file_name", ""))
            by_id[image.get("id")] = None
            if not path.is_file():
                self._counts["missing_images"] += 1
                continue
            # Sizes come from the JSON (reading 118k headers would be slow); a wrong one is
            # caught and repaired when the image is loaded (size_mismatches).
            size = (image.get("width"), image.get("height"))
            if all(isinstance(v, int | float) and v > 0 for v in size):
                size = (int(size[0]), int(size[1]))
            else:
                size = _image_size(path)
            if size is None:
                self._counts["unreadable_images"] += 1
                continue
            record = _Record(path, image["file_name"], int(image["id"]), size)
            by_id[record.image_id] = record
            self.records.append(record)
        for ann in data.get("annotations", []):
            if ann.get("image_id") in by_id and by_id[ann["image_id"]] is None:
                continue  # its image was already counted as missing or unreadable
            record = by_id.get(ann.get("image_id"))
            bbox = ann.get("bbox")
            if record is None or not _is_xywh(bbox):
                self._counts["malformed_objects"] += 1
                continue
            label = self.category_id_to_label.get(ann.get("category_id"))
            if label is None:
                self._counts["unknown_classes"] += 1
                continue
            x, y, w, h = (float(v) for v in bbox)
            if ann.get("iscrowd", 0):
                self._add_box(record, [x, y, x + w, y + h], crowd=True)
            elif self._add_box(record, [x, y, x + w, y + h]):
                record.labels.append(label)
                record.difficult.append(False)
        self._finish_index()


def _is_xywh(bbox: object) -> bool:
    return (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
    )


# The --data spec ----------------------------------------------------------------------------


def load_dataset(
    spec: str,
    *,
    split: str,
    val_fraction: float = 0.1,
    classes: list[str] | None = None,
    use_difficult: bool = True,
) -> DetectionDataset | SyntheticShapes:
    """The dataset a ``--data`` spec names, for one purpose.

    Specs:
        ``voc:PATH[:SPLIT]``  Pascal VOC, see VocDataset (SPLIT names ImageSets/Main/SPLIT.txt)
        ``coco:IMAGES_DIR:ANNOTATIONS_JSON``  COCO JSON, see CocoDataset (every image, any split)
        ``synthetic[:N]``  procedural shapes, see model.synthetic; N samples, by default
            SYNTHETIC_TRAIN_LENGTH for "train" and SYNTHETIC_EVAL_LENGTH otherwise
            ("val" has its own stream; "test" and "all" share the test stream)

    ``split`` is "train", "val", "test" or "all"; ``val_fraction`` is the part of a VOC folder
    without split files held out for "val"; ``classes`` fixes the class list.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kind, _, rest = spec.partition(":")
    if kind == "voc" and rest:
        path, image_set = rest, None
        if not Path(rest).exists() and ":" in rest:
            path, image_set = rest.rsplit(":", 1)
        return VocDataset(
            path,
            image_set=image_set or None,
            split=split,
            val_fraction=val_fraction,
            classes=classes,
            use_difficult=use_difficult,
        )
    if kind == "coco" and ":" in rest:
        images_dir, annotations = rest.rsplit(":", 1)
        return CocoDataset(images_dir, annotations, classes=classes)
    if kind == "synthetic":
        if classes is not None and list(classes) != SyntheticShapes.class_names:
            raise ValueError(
                f"the synthetic dataset has classes {SyntheticShapes.class_names}, got {classes}"
            )
        default = SYNTHETIC_TRAIN_LENGTH if split == "train" else SYNTHETIC_EVAL_LENGTH
        if rest and not (rest.isdigit() and int(rest) > 0):
            raise ValueError(f"synthetic:N needs a positive integer N, got {spec!r}")
        stream = split if split in ("train", "val") else "test"
        return SyntheticShapes(int(rest) if rest else default, split=stream)
    raise ValueError(
        "data spec must be voc:PATH[:SPLIT], coco:IMAGES_DIR:ANNOTATIONS_JSON or "
        f"synthetic[:N], got {spec!r}"
    )
