"""Detection data: the readers, the ``--data`` spec, the augmentation and the training loader.

``load_dataset`` turns a ``--data`` spec into a dataset that follows the sample contract of
``model.data.base``. This package's ``__init__`` imports its parts; the parts never import
it back, so there is no cycle to hide.

    base.py       the sample contract, DetectionDataset (index, clip, count bad data), SPLITS
    voc.py        VocDataset: Pascal VOC XML, in a VOCdevkit or any folder
    coco.py       CocoDataset: COCO JSON
    yolo.py       YoloDataset: YOLO text labels and their data.yaml
    synthetic.py  SyntheticShapes: procedural shapes, no download
    seeding.py    the one seeding scheme (numpy SeedSequence over integer keys)
    transforms.py the paper's training augmentation and the eval transform
    crop.py       the authors' IoU-constrained crop (one step of that augmentation)
    loader.py     augmented samples keyed by (epoch, index) and each epoch's batches
    check.py      ``python -m model.data check SPEC``: sizes, classes and default-box coverage
"""

from __future__ import annotations

from pathlib import Path

from model.data.base import SPLITS, DetectionDataset
from model.data.coco import CocoDataset
from model.data.synthetic import SyntheticShapes
from model.data.voc import VocDataset
from model.data.yolo import YoloDataset

__all__ = [
    "SPEC_FORMS",
    "SPLITS",
    "SYNTHETIC_EVAL_LENGTH",
    "SYNTHETIC_TRAIN_LENGTH",
    "CocoDataset",
    "DetectionDataset",
    "SyntheticShapes",
    "VocDataset",
    "YoloDataset",
    "load_dataset",
    "split_spec",
]

# The --data forms, as the command lines' help gives them (load_dataset says what each means).
SPEC_FORMS = (
    "voc:PATH[:SPLIT], coco:IMAGES:JSON, coco:FOLDER (Roboflow), yolo:DATA.YAML[:SPLIT], "
    "synthetic[:N]"
)
# The annotation file of each split folder of Roboflow's COCO export.
ROBOFLOW_COCO_FILE = "_annotations.coco.json"
# Default lengths of the synthetic dataset when the spec gives no N.
SYNTHETIC_TRAIN_LENGTH, SYNTHETIC_EVAL_LENGTH = 10_000, 500


def split_spec(spec: str) -> tuple[str, str | None]:
    """A ``--data`` spec's dataset and the part its ``:SPLIT`` names, or None where it names
    none: ``voc:PATH:val`` -> (``voc:PATH``, "val"). Only the VOC and YOLO forms take a
    ``:SPLIT``; a PATH that exists as written is never split, even with a colon in it."""
    kind, _, rest = spec.partition(":")
    if kind in ("voc", "yolo") and rest and not Path(rest).exists() and ":" in rest:
        path, part = rest.rsplit(":", 1)
        return f"{kind}:{path}", part or None
    return spec, None


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
        ``voc:PATH[:SPLIT]``  Pascal VOC, see model.data.voc; SPLIT names
            ImageSets/Main/SPLIT.txt where that file exists, else (one of SPLITS) the part
            of the folder that ``split=SPLIT`` takes, whatever ``split`` asks for
        ``coco:IMAGES_DIR:ANNOTATIONS_JSON``  COCO JSON, see model.data.coco ("all" and
            "test": every image; "train" and "val" split the file as a VOC folder without
            split files)
        ``coco:FOLDER``  Roboflow's COCO export: FOLDER/_annotations.coco.json, the images
            beside it (one such folder per split: train/, valid/, test/)
        ``yolo:DATA_YAML[:SPLIT]``  YOLO labels, see model.data.yolo; SPLIT (one of SPLITS)
            fixes the part of the yaml used, whatever ``split`` asks for
        ``synthetic[:N]``  procedural shapes, see model.data.synthetic; N samples, by default
            SYNTHETIC_TRAIN_LENGTH for "train" and SYNTHETIC_EVAL_LENGTH otherwise
            ("val" has its own stream; "test" and "all" share the test stream)

    ``split`` is one of SPLITS ("train", "val", "test", "all"), the part taken where the spec
    names none (a spec's ``:SPLIT`` wins, so ``voc:PATH:val`` and ``voc:PATH`` with
    ``split="val"`` are the same images); ``val_fraction`` is the part of a VOC folder without
    split files (or of a COCO file, or of a YOLO train entry without a val entry) held out for
    "val"; ``classes`` fixes the class list.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source, part = split_spec(spec)
    kind, _, rest = spec.partition(":")
    if kind == "voc" and rest:
        path, image_set = source.partition(":")[2], part
        # A split file wins; without one, a part's name takes that part as split= would.
        if part in SPLITS and not (Path(path) / "ImageSets" / "Main" / f"{part}.txt").is_file():
            image_set, split = None, part
        return VocDataset(
            path,
            image_set=image_set,
            split=split,
            val_fraction=val_fraction,
            classes=classes,
            use_difficult=use_difficult,
        )
    if kind == "coco" and rest:
        if ":" in rest and not Path(rest).is_dir():
            images_dir, annotations = rest.rsplit(":", 1)
        else:
            images_dir, annotations = rest, str(Path(rest) / ROBOFLOW_COCO_FILE)
            if not Path(annotations).is_file():
                raise FileNotFoundError(
                    f"coco:FOLDER needs {ROBOFLOW_COCO_FILE} in the folder (or use "
                    f"coco:IMAGES_DIR:ANNOTATIONS_JSON): not found: {annotations}"
                )
        return CocoDataset(
            images_dir, annotations, classes=classes, split=split, val_fraction=val_fraction
        )
    if kind == "yolo" and rest:
        if part is not None and part not in SPLITS:
            raise ValueError(f"yolo:DATA_YAML:SPLIT needs SPLIT in {SPLITS}, got {spec!r}")
        yaml_path = source.partition(":")[2]
        return YoloDataset(
            yaml_path, split=part or split, val_fraction=val_fraction, classes=classes
        )
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
    raise ValueError(f"data spec must be one of {SPEC_FORMS}, got {spec!r}")
