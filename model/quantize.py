"""Post-training static INT8 quantization of a checkpoint: the ``model.inference.int8`` artifact.

Calibrates activation ranges on train-split images of ``--data``, scores fp32 and the
rebuilt int8 network on the test split of ``--guard-data`` (mAP@0.5, the accuracy guard), and
writes the artifact beside the checkpoint (``model.inference.int8.int8_artifact_path``) with both
figures in its metadata.

Command::

    python -m model.quantize --weights weights/ssd300_shapes.safetensors \
        --data synthetic [--calibration 256] [--out PATH]

``--weights`` may name published weights (``torchvision:coco``, ``ssd.pytorch:PATH``); the
artifact belongs to a checkpoint file, so they are first converted into one
(``model.convert``), written beside ``--out`` (which is then required): ``--out
weights/coco.int8.safetensors`` writes ``weights/coco.safetensors`` too.

``--format onnx`` quantizes for ONNX Runtime instead (``model.inference.onnx_int8``, for
``SSD_BACKEND=onnxruntime`` and the torch-free image): the checkpoint is exported as a
``full`` graph (``model.export``) to ``<stem>.onnx`` beside it, unless ``--weights`` is such
an .onnx file already, and its INT8 graph written to ``<stem>.int8.onnx`` (or ``--out``),
calibrated and guarded on the same images::

    python -m model.quantize --weights weights/ssd300_shapes.safetensors \
        --data synthetic --format onnx
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from model.convert import convert_to_file
from model.data import SPEC_FORMS
from model.evaluation.int8_guard import (
    CALIBRATION_IMAGES,
    ImageSet,
    Int8Result,
    make_int8_artifact,
    make_onnx_int8,
)
from model.export import export_onnx
from model.inference.int8 import ARTIFACT_SUFFIX, int8_artifact_path
from model.inference.onnx_int8 import ONNX_SUFFIX, onnx_int8_path
from model.weights.published import is_published

log = logging.getLogger(__name__)
FORMATS = ("torch", "onnx")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.quantize", description=__doc__)
    parser.add_argument(
        "--weights",
        required=True,
        type=Path,
        help="checkpoint (.safetensors), or published weights (torchvision:coco, "
        "ssd.pytorch:PATH), converted beside --out",
    )
    parser.add_argument("--data", required=True, help=SPEC_FORMS)
    parser.add_argument(
        "--calibration",
        type=int,
        default=CALIBRATION_IMAGES,
        help="train-split images to calibrate on",
    )
    parser.add_argument("--guard-data", default="synthetic:500", help="scored on its test split")
    parser.add_argument("--out", type=Path, help=f"default: beside --weights, *{ARTIFACT_SUFFIX}")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="torch",
        help="torch: the artifact for PyTorch's int8 kernels; onnx: an INT8 ONNX graph for "
        "ONNX Runtime (--weights may then be an exported .onnx)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        suffix = ONNX_SUFFIX if args.format == "onnx" else ARTIFACT_SUFFIX
        if is_published(args.weights):
            if args.out is None:
                raise ValueError(
                    f"--weights {args.weights} needs --out: the artifact and the converted "
                    "checkpoint are written there"
                )
            checkpoint = args.out.with_name(
                args.out.name.removesuffix(suffix).removesuffix(".safetensors") + ".safetensors"
            )
            args.weights = convert_to_file(str(args.weights), checkpoint)
            log.info("converted the published weights into %s", checkpoint)
        calibration = ImageSet.load(args.data, "train")
        guard = ImageSet.load(args.guard_data, "test")
        result = (
            _onnx(args, calibration, guard)
            if args.format == "onnx"
            else make_int8_artifact(
                args.weights,
                calibration,
                guard,
                count=args.calibration,
                batch_size=args.batch_size,
                out=args.out or int8_artifact_path(args.weights),
            )
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


def _onnx(args: argparse.Namespace, calibration: ImageSet, guard: ImageSet) -> Int8Result:
    """``--format onnx``: export the checkpoint (unless it is an .onnx file), quantize it."""
    weights = Path(args.weights)
    if not weights.is_file():
        raise FileNotFoundError(f"no checkpoint at {weights}")
    if weights.suffix == ".onnx":
        fp32 = weights
    else:
        stem = weights.name.removesuffix(".safetensors")
        fp32 = export_onnx(weights, weights.with_name(f"{stem}.onnx"))
        log.info("exported %s to %s", weights, fp32)
    out = args.out or onnx_int8_path(fp32)
    return make_onnx_int8(
        fp32, calibration, guard, count=args.calibration, batch_size=args.batch_size, out=out
    )


if __name__ == "__main__":
    raise SystemExit(main())
