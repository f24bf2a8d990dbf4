"""Convert published detector weights into this project's self-describing checkpoint.

Command::

    python -m model.convert torchvision:coco --out weights/coco.safetensors
    python -m model.convert ssd.pytorch:ssd300_mAP_77.43_v2.pth --out weights/voc.safetensors

The sources are ``model.weights.published``'s. The checkpoint holds the weights, the architecture,
the class names, the normalization (mean, size, resize) and, under ``recipe["source"]``,
where the weights came from (URL, file, sha256, whether it is the published file) and under
which licence. An air-gapped host can then be handed the one file and serve it
(``SSD_WEIGHTS=FILE``); loading it needs no network and no torch cache.

Given your own images (``--calibration-data``, any ``--data`` form of ``model.data``), it
also writes the checkpoint's INT8 artifact beside it (``<out stem>.int8.safetensors``):
calibrated on the first ``--calibration`` images of their train part and held to the mAP
guard on ``--guard-data``'s val part (by default the calibration data's own val part), as
``model.train`` does for the checkpoints it writes (``model.evaluation.int8_guard``)::

    python -m model.convert torchvision:coco --out weights/coco.safetensors \
        --calibration-data coco:photos/:photos/labels.json [--calibration 256]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from model.data import SPEC_FORMS
from model.evaluation.int8_guard import CALIBRATION_IMAGES, ImageSet, make_int8_artifact
from model.weights.checkpoint import save_checkpoint
from model.weights.published import NAMES, convert, is_published

log = logging.getLogger("model.convert")


def convert_to_file(source: str, out: str | os.PathLike[str]) -> Path:
    """Convert ``source`` (a ``model.weights.published`` name) and write it to ``out`` as a
    checkpoint.

    Raises:
        FileNotFoundError: the source's file is missing (offline: the message says where to
            place it), or ``out``'s folder does not exist.
        ValueError: ``source`` is no published name, or its file has another layout.
    """
    out = Path(out)
    if not is_published(source):
        raise ValueError(f"{source!r} names no published weights; known: {', '.join(NAMES)}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"no folder {out.parent} to write {out.name} into")
    converted = convert(source)
    save_checkpoint(
        out,
        converted.network,
        converted.class_names,
        recipe=converted.recipe,
        normalization=converted.normalization,
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Convert as the arguments say; returns the exit status (0 written, 2 bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m model.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help=f"published weights: {', '.join(NAMES)}")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint to write")
    int8 = parser.add_argument_group("INT8 artifact (written only with --calibration-data)")
    int8.add_argument(
        "--calibration-data", metavar="SPEC", help=f"images to calibrate on; {SPEC_FORMS}"
    )
    int8.add_argument(
        "--calibration",
        type=int,
        default=CALIBRATION_IMAGES,
        help="train-part images to calibrate on",
    )
    int8.add_argument(
        "--guard-data",
        metavar="SPEC",
        help="scored on its val part for the mAP guard (default: --calibration-data); its "
        "classes must be among the weights' (COCO's 80 for torchvision:coco)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        # The images are read first, so that a wrong spec fails before anything is written.
        calibration = guard = None
        if args.calibration_data:
            calibration = ImageSet.load(args.calibration_data, "train")
            guard = ImageSet.load(args.guard_data or args.calibration_data, "val")
        started = time.perf_counter()
        out = convert_to_file(args.source, args.out)
        seconds = time.perf_counter() - started
        print(f"wrote {out} ({out.stat().st_size:,} bytes) from {args.source} in {seconds:.1f} s")
        if calibration is not None and guard is not None:
            result = make_int8_artifact(out, calibration, guard, count=args.calibration)
            print(result.summary())
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
