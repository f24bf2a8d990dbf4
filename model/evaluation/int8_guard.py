"""The INT8 artifact of a checkpoint, calibrated on training images and held to the mAP guard.

One implementation for the three commands that make the artifact: ``model.quantize`` (any
checkpoint, by hand), ``model.train`` (beside its final and best checkpoints) and
``model.convert`` (imported weights, given calibration images). Activation ranges are
calibrated on images prepared exactly as ``Detector.prepare`` prepares a request (the
checkpoint's mean, size and resize); the fp32 network and the int8 network rebuilt from the
stored parameters (as loading will rebuild it) are then scored on held-out images, and both
mAP@0.5 figures go into the artifact's metadata (``model.inference.int8``).
``make_onnx_int8`` does the same for an exported ONNX graph with ONNX Runtime's quantizer
(``model.inference.onnx_int8``), for the torch-free backend.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from model.data import load_dataset
from model.evaluation.evaluate import (
    EVAL_SCORE_THRESHOLD,
    check_classes,
    predict_dataset,
    score,
)
from model.inference.detector import Detector
from model.inference.int8 import (
    MAP50_GUARD,
    QuantizableSSD,
    activation_qparams,
    int8_artifact_path,
    prepare_observed,
    rebuild,
    save_int8,
    torch_ao_quiet,
)
from model.inference.onnx_detector import OnnxDetector
from model.inference.onnx_int8 import onnx_int8_path, quantize_onnx, write_int8_info
from model.network.preprocessing import PIXEL_MEAN, preprocess
from model.network.ssd import SSD

# Calibration images by default: as many as the shipped artifact was calibrated on, which
# kept int8 within the guard (weights/README.md).
CALIBRATION_IMAGES = 256


@dataclass
class ImageSet:
    """Images for calibration or for the guard: a dataset and where it came from.

    ``dataset`` yields ``(image Tensor[3, H, W] uint8, target)`` as ``model.data``'s do;
    ``data`` is its ``--data`` spec and ``split`` the part taken, recorded in the artifact.
    """

    dataset: Any
    data: str
    split: str

    @classmethod
    def load(cls, data: str, split: str, **kwargs: Any) -> ImageSet:
        """``load_dataset(data, split=split, **kwargs)`` with its description."""
        return cls(load_dataset(data, split=split, **kwargs), data, split)


@dataclass
class Int8Result:
    """What ``make_int8_artifact`` did: the artifact's path, the guard's mAP@0.5 per
    precision, the images calibrated on and the seconds it took."""

    path: Path
    map50: dict[str, float]
    calibrated: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Whether int8 stayed within ``MAP50_GUARD`` of fp32."""
        return self.map50["fp32"] - self.map50["int8"] <= MAP50_GUARD

    def summary(self) -> str:
        """One line for logs: where, the two figures, the verdict and the cost."""
        verdict = "within" if self.passed else "outside (auto will not choose int8)"
        fp32, int8 = self.map50["fp32"], self.map50["int8"]
        return (
            f"wrote {self.path}: mAP@0.5 fp32 {fp32:.4f}, int8 {int8:.4f} "
            f"({verdict} the {MAP50_GUARD:.2f} guard; {self.calibrated} calibration images, "
            f"{self.seconds:.1f} s)"
        )


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
    dataset: Any,
    count: int,
    batch_size: int,
    input_size: int,
    mean: Sequence[float] = PIXEL_MEAN,
    resize: str = "antialias",
) -> Iterator[Tensor]:
    """Prepared Tensors[n, 3, S, S] of the first ``count`` images of ``dataset`` (fewer if it
    is smaller), ``batch_size`` at a time, resized as ``resize`` says
    (``model.network.preprocessing``)."""
    count = min(count, len(dataset))
    for start in range(0, count, batch_size):
        images = [dataset[i][0] for i in range(start, min(start + batch_size, count))]
        yield preprocess(images, input_size, tuple(mean), resize)


def guard_dataset(images: ImageSet, class_names: Sequence[str]) -> Any:
    """``images``' dataset with the checkpoint's classes, in its order, for scoring.

    Raises:
        ValueError: the data has classes the checkpoint lacks (``check_classes``).
    """
    check_classes(list(class_names), images.dataset.class_names, images.data)
    if list(images.dataset.class_names) == list(class_names):
        return images.dataset
    return load_dataset(images.data, split=images.split, classes=list(class_names))


def make_int8_artifact(
    checkpoint: str | os.PathLike[str],
    calibration: ImageSet,
    guard: ImageSet,
    *,
    count: int = CALIBRATION_IMAGES,
    batch_size: int = 8,
    out: str | os.PathLike[str] | None = None,
) -> Int8Result:
    """Calibrate ``checkpoint``'s INT8 network on the first ``count`` images of
    ``calibration``, score fp32 and int8 on ``guard`` (mAP@0.5) and write the artifact to
    ``out`` (default ``int8_artifact_path(checkpoint)``) with both figures. An artifact more
    than ``MAP50_GUARD`` below fp32 is written too, for ``precision="int8"`` by choice, but
    ``auto`` leaves it out (``model.inference.int8.guard_shortfall``).

    Raises:
        ValueError: ``count`` < 1, no calibration images, or the guard data has classes the
            checkpoint lacks.
        FileNotFoundError: no checkpoint, or no folder for ``out``.
    """
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else int8_artifact_path(checkpoint)
    if count < 1:
        raise ValueError(f"calibration needs at least 1 image, got {count}")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"no folder {out.parent} to write {out.name} into")
    fp32 = Detector.load(checkpoint, device="cpu", precision="fp32")
    names, mean, resize = fp32.class_names, fp32.pixel_mean, fp32.resize
    network = cast(SSD, fp32.network)  # an fp32 Detector's network is the SSD, on the CPU
    scored = guard_dataset(guard, names)
    batches = calibration_batches(
        calibration.dataset, count, batch_size, network.input_size, mean, resize
    )
    params = activation_qparams(quantize_network(network, batches))
    # The guard scores the network as loading will rebuild it from the stored parameters.
    int8 = Detector(
        rebuild(network, params), names, device="cpu", precision="int8", pixel_mean=mean,
        resize=resize,
    )  # fmt: skip
    map50 = {}
    for name, detector in (("fp32", fp32), ("int8", int8)):
        detections, truths = predict_dataset(detector, scored, batch_size=batch_size)
        map50[name] = score(detections, truths, names).map50
    calibrated = min(count, len(calibration.dataset))
    info = {
        "calibration": {"data": calibration.data, "split": calibration.split, "images": calibrated},
        "guard": {"data": guard.data, "split": guard.split, "map50": map50},
    }
    save_int8(out, params, checkpoint, info)
    return Int8Result(out, map50, calibrated, time.perf_counter() - started, info)


def make_onnx_int8(
    model: str | os.PathLike[str],
    calibration: ImageSet,
    guard: ImageSet,
    *,
    count: int = CALIBRATION_IMAGES,
    batch_size: int = 8,
    out: str | os.PathLike[str] | None = None,
) -> Int8Result:
    """``make_int8_artifact`` for ONNX Runtime: quantize the fp32 ``full`` graph at ``model``
    (``model.export``) on the first ``count`` images of ``calibration``
    (``model.inference.onnx_int8.quantize_onnx``), score both files through ``OnnxDetector``
    on ``guard`` (mAP@0.5) and write the int8 file to ``out`` (default ``m.int8.onnx``) with
    the calibration and both figures in its ``int8`` metadata.

    Raises:
        ValueError: ``count`` < 1, ``model`` is no fp32 full graph, or the guard data has
            classes the model lacks.
        FileNotFoundError: no file at ``model``.
    """
    started = time.perf_counter()
    model = Path(model)
    out = Path(out) if out is not None else onnx_int8_path(model)
    if count < 1:
        raise ValueError(f"calibration needs at least 1 image, got {count}")
    fp32 = OnnxDetector(model)
    scored = guard_dataset(guard, fp32.class_names)
    dataset = calibration.dataset
    calibrated = min(count, len(dataset))
    quantize_onnx(model, (_pil(dataset[i][0]) for i in range(calibrated)), out)
    map50 = {}
    for name, detector in (("fp32", fp32), ("int8", OnnxDetector(out))):
        map50[name] = _onnx_map50(detector, scored, batch_size)
    info = {
        "calibration": {"data": calibration.data, "split": calibration.split, "images": calibrated},
        "guard": {"data": guard.data, "split": guard.split, "map50": map50},
    }
    write_int8_info(out, info)
    return Int8Result(out, map50, calibrated, time.perf_counter() - started, info)


def _pil(image: Tensor) -> Image.Image:
    """A dataset's uint8 Tensor[3, H, W] RGB as the PIL image a request would decode to."""
    return Image.fromarray(image.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)


def _onnx_map50(detector: OnnxDetector, dataset: Any, batch_size: int) -> float:
    """mAP@0.5 of ``detector`` on ``dataset``, scored as ``predict_dataset`` and ``score``
    score the torch Detector (the same threshold, the same ground truths)."""
    detections, truths = [], []
    for start in range(0, len(dataset), batch_size):
        batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        found = detector.predict([_pil(image) for image, _ in batch], EVAL_SCORE_THRESHOLD)
        for result in found:
            arrays = (result.boxes, result.scores, result.class_ids)
            detections.append(tuple(torch.from_numpy(np.asarray(a)) for a in arrays))
        for image, target in batch:
            truths.append({**target, "width": int(image.shape[2]), "height": int(image.shape[1])})
    return score(detections, truths, detector.class_names).map50
