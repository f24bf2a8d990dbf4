"""``python -m model.predict``: detect objects in files, folders and globs, in batches.

    python -m model.predict --weights W SOURCE [SOURCE ...] --out DIR [--format json|coco]
        [--draw] [--score-threshold 0.3] [--max-detections 100] [--classes a,b]

Writes, under ``--out``:

* ``--format json`` (the default): one ``NAME.json`` per image, in the service's ``/detect``
  answer (``detections``, ``image``, ``model``);
* ``--format coco``: one ``results.json`` in COCO's results format (``image_id``,
  ``category_id``, ``bbox`` as x, y, width, height, ``score``), ready for pycocotools'
  ``loadRes``; ``--coco-ids ANNOTATIONS.json`` takes the image and category ids from that file
  (by file name and class name), else images are numbered from 1 in order and classes by id;
* ``--draw``: ``NAME.jpg`` with the boxes drawn (``model.inference.drawing``, as the service's
  ``format=jpeg``).

Images are read as displayed (EXIF orientation applied). Unreadable files are skipped, named in
the log, and counted in the summary; the exit status is 0 when some image was read, 2 when none
could be (or bad arguments). Works offline with any weight source ``SSD_WEIGHTS`` takes.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from model.inference.detector import Detector
from model.inference.drawing import draw_detections
from model.network.postprocess import Detections
from model.weights.published import is_published, weights_version

logger = logging.getLogger("model.predict")

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
BOX_KEYS = ("x_min", "y_min", "x_max", "y_max")


def image_paths(sources: Sequence[str]) -> list[Path]:
    """Every image file the sources name: files as given, folders searched recursively for
    ``SUFFIXES``, globs (``**`` included) expanded; each file once, in order."""
    found: dict[Path, None] = {}
    for source in sources:
        path = Path(source)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES)
        elif path.exists():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(source, recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                logger.warning("%s: no such file, folder or glob match", source)
        found.update(dict.fromkeys(matches))
    return list(found)


def read_image(path: Path) -> Image.Image | None:
    """The image as displayed, or None (logged) when it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        logger.warning("%s: skipped, not a readable image (%s)", path, exc)
        return None


def answer(detections: Detections, size: tuple[int, int], model: dict[str, str]) -> dict:
    """The service's ``/detect`` answer for one image (``app.schemas.DetectResponse``)."""
    return {
        "detections": [
            {
                "label": label,
                "class_id": class_id,
                "score": round(score, 4),
                "box": dict(zip(BOX_KEYS, (round(v, 2) for v in box), strict=True)),
            }
            for box, score, class_id, label in detections.rows()
        ],
        "image": {"width": size[0], "height": size[1]},
        "model": model,
    }


def coco_results(
    detections: Detections, image_id: int, category_ids: dict[str, int], file_name: str
) -> list[dict[str, Any]]:
    """One image's detections in COCO's results format (bbox x, y, width, height); labels
    without a category id are left out."""
    return [
        {
            "image_id": image_id,
            "category_id": category_ids[label],
            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
            "score": round(score, 5),
            "file_name": file_name,
        }
        for (x0, y0, x1, y1), score, _, label in detections.rows()
        if label in category_ids
    ]


def _batches(paths: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def _coco_ids(path: Path | None, class_names: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Image ids by file name and category ids by class name: from a COCO annotations file,
    or (without one) none and the model's own class ids."""
    if path is None:
        return {}, {name: i for i, name in enumerate(class_names, start=1)}
    data = json.loads(path.read_text())
    images = {Path(image["file_name"]).name: int(image["id"]) for image in data["images"]}
    categories = {c["name"]: int(c["id"]) for c in data["categories"]}
    missing = [name for name in class_names if name not in categories]
    if len(missing) == len(class_names):
        raise ValueError(f"{path}: no category of this model's {class_names}")
    if missing:
        logger.warning("%s has no category %s: those detections are left out", path, missing)
    return images, categories


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.predict", description=__doc__)
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="files, folders or globs")
    parser.add_argument("--weights", required=True, help="a checkpoint or published weights")
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--format", choices=("json", "coco"), default="json")
    parser.add_argument("--coco-ids", type=Path, help="COCO annotations to take ids from")
    parser.add_argument("--draw", action="store_true", help="also write annotated JPEGs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--max-detections", type=int, default=100)
    parser.add_argument("--classes", help="comma-separated class names to keep")
    parser.add_argument("--iou-threshold", type=float, help="per-class NMS (default 0.45)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        detector = Detector.load(args.weights, device=args.device, precision=args.precision)
        classes = args.classes.split(",") if args.classes else None
        cut = detector.cut(args.score_threshold, args.max_detections, classes, args.iou_threshold)
        image_ids, category_ids = _coco_ids(args.coco_ids, detector.class_names)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = args.weights if is_published(args.weights) else Path(args.weights).stem
    model = {"name": name, "version": weights_version(args.weights)}
    paths = image_paths(args.sources)
    args.out.mkdir(parents=True, exist_ok=True)
    skipped, written, results = [], 0, []
    stems: dict[str, int] = {}  # a name met again (in another folder) gets -2, -3, ...
    with tqdm(total=len(paths), unit="image", disable=None) as bar:
        for batch in _batches(paths, args.batch_size):
            loaded = [(path, read_image(path)) for path in batch]
            skipped += [path for path, image in loaded if image is None]
            good = [(path, image) for path, image in loaded if image is not None]
            found = detector.predict(
                [image for _, image in good],
                score_threshold=cut.score_threshold,
                max_detections=cut.max_detections,
                classes=classes,
                nms_iou=cut.nms_iou,
            )
            for (path, image), detections in zip(good, found, strict=True):
                stems[path.stem] = stems.get(path.stem, 0) + 1
                repeat = stems[path.stem]
                stem = args.out / (path.stem if repeat == 1 else f"{path.stem}-{repeat}")
                if args.format == "json":
                    body = answer(detections, image.size, model)
                    stem.with_suffix(".json").write_text(json.dumps(body, indent=1) + "\n")
                else:
                    image_id = image_ids.get(path.name, written + 1)
                    results += coco_results(detections, image_id, category_ids, path.name)
                if args.draw:
                    draw_detections(image, detections).save(
                        stem.with_suffix(".jpg"), quality=90, subsampling=0
                    )  # 4:4:4, or thin coloured lines blur
                written += 1
            bar.update(len(batch))
    if args.format == "coco":
        (args.out / "results.json").write_text(json.dumps(results) + "\n")
    summary = f"{written} images detected into {args.out}; {len(skipped)} skipped"
    if skipped:
        summary += f" ({', '.join(str(p) for p in skipped[:10])}{' ...' * (len(skipped) > 10)})"
    logger.info("%s", summary)
    return 0 if written else 2


if __name__ == "__main__":
    raise SystemExit(main())
