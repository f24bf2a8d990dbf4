"""Pascal VOC XML detection annotations: ``VocDataset`` and its layout and XML helpers.

Samples follow the contract in ``model.data.base``.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from pathlib import Path

from model.data.base import SPLITS, DetectionDataset, Record, holdout, image_size

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class VocDataset(DetectionDataset):
    """Pascal VOC XML annotations, in a VOCdevkit folder or any folder of XML and images.

    Layouts: ``root/Annotations/*.xml`` + ``root/JPEGImages/`` (+ ``root/ImageSets/Main/``)
    as in the VOC devkit; or XML files directly in ``root`` or in its sub-folders, with the
    images in ``root`` or its sub-folders. Each XML's image is found by its ``filename`` tag,
    else by the XML's stem.

    Which images: ``image_set`` names ``ImageSets/Main/{image_set}.txt`` and is used as is.
    Without it, "all" takes every image; "train", "val" and "test" take
    ``ImageSets/Main/{split}.txt`` when it exists; else "test" takes every image, "val" the
    deterministic ``holdout(stems, val_fraction)`` and "train" the rest. The dataset's
    ``name`` says which (the file, or the holdout and its fraction).

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
        # Image ids are XML stems (VOC's convention), whichever folder the XML sits in.
        parsed = {path.stem: _parse_voc_xml(path) for path in xml_files}
        if classes is None:
            entries = [entry for entry in parsed.values() if entry is not None]
            classes = sorted(
                {obj[0] for entry in entries for obj in entry[1] if obj[1] is not None}
            )
        selected, source = self._select(root, sorted(parsed), image_set, split, val_fraction)
        super().__init__(f"voc:{root} ({source})", classes)
        label_of = {c: k for k, c in enumerate(self.class_names, start=1)}
        keep_difficult = use_difficult or split != "train"
        images = _image_index(image_dirs)
        ordinal = {stem: k for k, stem in enumerate(sorted(parsed))}
        for stem in selected:
            if stem not in parsed:
                self._counts["missing_annotations"] += 1
                continue
            entry = parsed[stem]
            if entry is None:
                self._counts["unreadable_annotations"] += 1
                continue
            filename, objects = entry
            path = images.get(Path(filename).name) or images.get(Path(filename).stem)
            path = path or images.get(stem)
            if path is None:
                self._counts["missing_images"] += 1
                continue
            size = image_size(path)
            if size is None:
                self._counts["unreadable_images"] += 1
                continue
            record = Record(path, path.relative_to(root).as_posix(), ordinal[stem], size)
            for class_name, box, difficult in objects:
                if box is None:
                    self._counts["malformed_objects"] += 1
                elif class_name not in label_of:
                    self._counts["unknown_classes"] += 1
                elif keep_difficult or not difficult:
                    self._add_object(record, box, label_of[class_name], difficult=difficult)
            self.records.append(record)
        self._finish_index()

    @staticmethod
    def _select(
        root: Path, stems: list[str], image_set: str | None, split: str, val_fraction: float
    ) -> tuple[list[str], str]:
        """The image ids (XML stems) this dataset uses, in order, and where they come from."""
        set_dir = root / "ImageSets" / "Main"
        if image_set is not None:
            set_file = set_dir / f"{image_set}.txt"
            if not set_file.is_file():
                raise FileNotFoundError(
                    f"VOC image set {image_set!r} not found: {set_file} (without a split "
                    f"file, only {', '.join(SPLITS)} name parts of the folder)"
                )
            return _read_image_set(set_file), f"ImageSets/Main/{image_set}.txt"
        if split != "all" and (set_dir / f"{split}.txt").is_file():
            return _read_image_set(set_dir / f"{split}.txt"), f"ImageSets/Main/{split}.txt"
        if split in ("all", "test"):
            return stems, f"{split}: every image"
        held_out = holdout(stems, val_fraction)
        if split == "val":
            return [s for s in stems if s in held_out], f"val: held out {val_fraction:g}"
        rest = f"the rest of a holdout of {val_fraction:g}" if held_out else "nothing held out"
        return [s for s in stems if s not in held_out], f"train: {rest}"


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
        bndbox = obj.find("bndbox")
        box: list[float] | None = None
        if bndbox is not None:
            with contextlib.suppress(ValueError):  # a missing or non-numeric coordinate
                xmin, ymin, xmax, ymax = (
                    float(bndbox.findtext(tag, "")) for tag in ("xmin", "ymin", "xmax", "ymax")
                )
                box = [xmin - 1.0, ymin - 1.0, xmax, ymax]  # see VocDataset: 1-based to edges
        if not name:
            box = None  # an object without a class name is as malformed as one without a box
        objects.append((name, box, difficult))
    return filename, objects
