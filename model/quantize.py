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
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from model.convert import convert_to_file
from model.data import SPEC_FORMS, load_dataset
from model.evaluation.evaluate import evaluate
from model.inference.detector import Detector
from model.inference.int8 import (
    ARTIFACT_SUFFIX,
    QuantizableSSD,
    activation_qparams,
    int8_artifact_path,
    prepare_observed,
    rebuild,
    save_int8,
    torch_ao_quiet,
)
from model.network.preprocessing import PIXEL_MEAN, preprocess
from model.network.ssd import SSD
from model.weights.checkpoint import load_checkpoint
from model.weights.published import is_published

log = logging.getLogger(__name__)


@torch.inference_mode()
def quantize_network(network: SSD, batches: Iterable[Tensor]) -> QuantizableSSD:
    """Calibrate on ``batches`` (each Tensor[N, 3, S, S], prepared as ``Detector.prepare``
    makes them) and convert: a quantized network with the ``SSD.forward`` contract.

    Raises:
        ValueError: ``batches`` was empty.
    """
    prepared = prepare_observed(network)
    seen = 0
    for batch in batches:
        prepared(batch.contiguous(memory_format=torch.channels_last))
        seen += int(batch.shape[0])
    if seen == 0:
        raise ValueError("calibration needs at least one image, got none")
    with torch_ao_quiet():
        return torch.ao.quantization.convert(prepared)


def calibration_batches(
    data: str,
    count: int,
    batch_size: int,
    input_size: int,
    mean: Sequence[float],
    resize: str = "antialias",
) -> Iterator[Tensor]:
    """Prepared Tensors[n, 3, S, S] of the first ``count`` images of ``data``'s train split
    (fewer if it is smaller), ``batch_size`` at a time, resized as ``resize`` says
    (``model.network.preprocessing``)."""
    dataset = load_dataset(data, split="train")
    count = min(count, len(dataset))
    for start in range(0, count, batch_size):
        images = [dataset[i][0] for i in range(start, min(start + batch_size, count))]
        yield preprocess(images, input_size, tuple(mean), resize)


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
        "--calibration", type=int, default=256, help="train-split images to calibrate on"
    )
    parser.add_argument("--guard-data", default="synthetic:500", help="scored on its test split")
    parser.add_argument("--out", type=Path, help=f"default: beside --weights, *{ARTIFACT_SUFFIX}")
    parser.add_argument("--batch-size", type=int, default=8)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if is_published(args.weights):
            if args.out is None:
                raise ValueError(
                    f"--weights {args.weights} needs --out: the artifact and the converted "
                    "checkpoint are written there"
                )
            checkpoint = args.out.with_name(
                args.out.name.removesuffix(ARTIFACT_SUFFIX).removesuffix(".safetensors")
                + ".safetensors"
            )
            args.weights = convert_to_file(str(args.weights), checkpoint)
            log.info("converted the published weights into %s", checkpoint)
        out = args.out or int8_artifact_path(args.weights)
        if not args.weights.is_file():
            raise FileNotFoundError(f"no checkpoint at {args.weights}")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"no folder {out.parent} to write {out.name} into")
        if args.calibration < 1:
            raise ValueError(f"--calibration must be >= 1, got {args.calibration}")
        loaded = load_checkpoint(args.weights)
        mean = loaded.normalization.get("mean", PIXEL_MEAN)
        resize = loaded.normalization.get("resize", "antialias")
        network = loaded.network.float().eval()
        batches = calibration_batches(
            args.data, args.calibration, args.batch_size, network.input_size, mean, resize
        )
        quantized = quantize_network(network, batches)
        calibrated = min(args.calibration, len(load_dataset(args.data, split="train")))
        params = activation_qparams(quantized)
        # The guard scores the network as loading will rebuild it from the stored parameters.
        rebuilt = rebuild(network, params)
        fp32 = Detector.load(args.weights, device="cpu", precision="fp32")
        int8 = Detector(
            rebuilt,
            loaded.class_names,
            device="cpu",
            precision="int8",
            pixel_mean=mean,
            resize=resize,
        )
        guard = {}
        for name, detector in (("fp32", fp32), ("int8", int8)):
            report, _ = evaluate(detector, args.guard_data, split="test")
            guard[name] = report.map50
            log.info("%s mAP@0.5 on %s test: %.4f", name, args.guard_data, report.map50)
        info = {
            "calibration": {"data": args.data, "split": "train", "images": calibrated},
            "guard": {"data": args.guard_data, "split": "test", "map50": guard},
        }
        save_int8(out, params, args.weights, info)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}: fp32 mAP@0.5 {guard['fp32']:.4f}, int8 {guard['int8']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
