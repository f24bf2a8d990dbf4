"""Evaluate a checkpoint on a dataset: VOC AP@0.5 (all-point and 11-point) and COCO AP.

    python -m model.evaluate --weights W --data D [--json OUT] [--save-detections OUT]
        [--plot PNG]

``--data`` takes the training module's forms (``model.data.SPEC_FORMS``: VOC, COCO, Roboflow's
COCO folder, YOLO's data.yaml, synthetic). Detections are made by the same ``Detector`` the
service uses, at the evaluation score threshold of the paper and torchvision (0.01), and scored
in each image's own pixels.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.data import SPEC_FORMS, SPLITS, load_dataset
from model.evaluation.average_precision import Detection, PRCurve, coco_metrics, voc_pr_curves
from model.evaluation.curves import plot_precision_recall
from model.inference.detector import Detector
from model.inference.runtime import INT8, PRECISIONS
from model.network.boxes import xyxy_to_xywh

logger = logging.getLogger(__name__)

EVAL_SCORE_THRESHOLD = 0.01  # torchvision's SSD and the authors' test prototxt (0.01)


@dataclass
class EvaluationReport:
    """Scores of one evaluation; APs are in 0..1, NaN for a class with no ground truth."""

    map50: float
    map50_voc07: float
    coco: dict[str, float]
    per_class: dict[str, dict[str, float]]
    num_images: int
    # Each class's precision-recall curve at IoU 0.5 (for plots; not part of the JSON form).
    curves: dict[str, PRCurve] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form: NaN becomes null."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            return value

        return clean({k: v for k, v in asdict(self).items() if k != "curves"})


def check_classes(checkpoint_names: Sequence[str], data_names: Sequence[str], data: str) -> None:
    """Refuse a dataset whose classes the checkpoint does not know, naming the difference."""
    unknown = sorted(set(data_names) - set(checkpoint_names))
    if unknown:
        raise ValueError(
            f"the classes of {data} do not match the checkpoint's: {unknown} are not among the "
            f"checkpoint's {list(checkpoint_names)} (--classes scores only some of them)"
        )


def _collate(batch: list[Any]) -> list[Any]:
    return batch


def predict_dataset(
    detector: Detector,
    dataset: Dataset,
    *,
    batch_size: int = 8,
    workers: int = 0,
    score_threshold: float = EVAL_SCORE_THRESHOLD,
    progress: bool = False,
) -> tuple[list[Detection], list[dict[str, Any]]]:
    """Run ``detector`` over ``dataset``; returns per-image detections and ground truths."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    detections: list[Detection] = []
    truths: list[dict[str, Any]] = []
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        images = [image for image, _ in batch]
        for result in detector.predict(images, score_threshold=score_threshold):
            detections.append((result.boxes, result.scores, result.class_ids))
        for image, target in batch:
            truths.append({**target, "width": int(image.shape[2]), "height": int(image.shape[1])})
    return detections, truths


def score(
    detections: Sequence[Detection], truths: Sequence[dict[str, Any]], class_names: list[str]
) -> EvaluationReport:
    """VOC and COCO numbers for detections against ground truths
    (``model.evaluation.average_precision``)."""
    curves = voc_pr_curves(detections, truths, len(class_names) + 1)
    aps = {cls: curve.ap() for cls, curve in curves.items()}
    per_class = {
        name: {"ap": aps[i + 1][0], "ap07": aps[i + 1][1]} for i, name in enumerate(class_names)
    }
    present = [v for v in per_class.values() if not math.isnan(v["ap"])]
    return EvaluationReport(
        map50=sum(v["ap"] for v in present) / len(present) if present else math.nan,
        map50_voc07=sum(v["ap07"] for v in present) / len(present) if present else math.nan,
        coco=coco_metrics(detections, truths, len(class_names) + 1),
        per_class=per_class,
        num_images=len(truths),
        curves={name: curves[i + 1] for i, name in enumerate(class_names)},
    )


def detection_records(
    detections: Sequence[Detection],
    truths: Sequence[dict[str, Any]],
    class_names: list[str],
    category_ids: dict[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Detections as COCO-results records, with the file name and class name added.

    ``category_ids`` maps our contiguous labels back to a COCO file's category ids.
    """
    records = []
    for (boxes, scores, classes), truth in zip(detections, truths, strict=True):
        xywh = xyxy_to_xywh(boxes.double()).tolist()  # float64: w and h exact
        for box, s, c in zip(xywh, scores.tolist(), classes.tolist(), strict=True):
            records.append(
                {
                    "image_id": truth["image_id"],
                    "file_name": truth["file_name"],
                    "category_id": category_ids[c] if category_ids else c,
                    "label": class_names[c - 1],
                    "bbox": box,
                    "score": s,
                }
            )
    return records


def evaluate(
    detector: Detector,
    data: str,
    *,
    split: str = "all",
    val_fraction: float = 0.1,
    classes: Sequence[str] | None = None,
    batch_size: int = 8,
    workers: int = 0,
    progress: bool = False,
) -> tuple[EvaluationReport, list[dict[str, Any]]]:
    """Evaluate ``detector`` on the dataset spec ``data`` (its ``split``; ``val_fraction`` as
    in ``load_dataset``); returns the report and records. ``classes`` keeps only the objects of
    those classes (as ``model.train --classes`` does), for a checkpoint trained on them."""
    dataset = load_dataset(
        data, split=split, val_fraction=val_fraction, classes=list(classes) if classes else None
    )
    check_classes(detector.class_names, dataset.class_names, data)
    if list(dataset.class_names) != detector.class_names:  # a subset, in another order
        dataset = load_dataset(
            data, split=split, val_fraction=val_fraction, classes=detector.class_names
        )
    detections, truths = predict_dataset(
        detector, dataset, batch_size=batch_size, workers=workers, progress=progress
    )
    report = score(detections, truths, detector.class_names)
    records = detection_records(
        detections, truths, detector.class_names, getattr(dataset, "label_to_category_id", None)
    )
    return report, records


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__)
    parser.add_argument(
        "--weights",
        required=True,
        type=Path,
        help="checkpoint (.safetensors), or published weights: torchvision:coco, ssd.pytorch:PATH",
    )
    parser.add_argument("--data", required=True, help=SPEC_FORMS)
    parser.add_argument(
        "--split",
        default="all",
        choices=SPLITS,
        help="which part of --data (default: every image; a part the spec names wins, as "
        "voc:PATH:val; docs/training.md, 'Splits')",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="the part held out as 'val' where --data has no split files (as in training)",
    )
    parser.add_argument(
        "--classes",
        help="comma-separated class names to score, the others' objects left out (as in "
        "training with --classes; default: every class of --data)",
    )
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    parser.add_argument("--save-detections", type=Path, help="write every detection here")
    parser.add_argument(
        "--plot", type=Path, metavar="PNG", help="draw each class's precision-recall curve here"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--precision", default="fp32", choices=[*sorted(PRECISIONS), INT8])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate as the arguments say and print the report; returns the exit status (0 done,
    2 bad input such as an unreadable checkpoint or data)."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        detector = Detector.load(args.weights, device=args.device, precision=args.precision)
        report, records = evaluate(
            detector,
            args.data,
            split=args.split,
            val_fraction=args.val_fraction,
            classes=args.classes.split(",") if args.classes else None,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=sys.stderr.isatty(),
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{report.num_images} images, {len(records)} detections at score > {EVAL_SCORE_THRESHOLD}"
    )
    print(f"{'class':24s} {'AP50':>7s} {'AP50 07':>8s}")
    for name, values in report.per_class.items():
        print(f"{name:24s} {values['ap']:7.4f} {values['ap07']:8.4f}")
    print(f"{'mean':24s} {report.map50:7.4f} {report.map50_voc07:8.4f}")
    print("COCO " + "  ".join(f"{k} {v:.4f}" for k, v in report.coco.items()))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if args.plot:
        plot_precision_recall(report.curves, args.plot, title=f"{args.weights.name} on {args.data}")
        print(f"precision-recall curves: {args.plot}")
    if args.save_detections:
        args.save_detections.write_text(json.dumps(records) + "\n")
    return 0
