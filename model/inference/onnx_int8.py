"""ONNX Runtime static INT8: a graph from ``model.export``, quantized in QDQ form.

``onnxruntime.quantization.quantize_static`` puts QuantizeLinear/DequantizeLinear pairs
around the convolutions, their ReLUs and the max-pools (int8 weights per output channel,
uint8 activations per tensor, ranges from the min and max seen on calibration images); ONNX
Runtime's CPU provider then fuses each pair with its convolution into an int8 kernel. The
L2Norm, the heads' reshapes and the ``full`` graph's decoding and NMS stay fp32. Calibration
images are prepared exactly as the service prepares a request on the ``onnxruntime``
backend (``model.network.pixels.prepare_image``, with the file's size, mean and resize), so
the ranges are those the served file will see.

The result is a graph like its source (``full``, or ``raw`` for consumers who decode
themselves), with the same inputs, outputs and metadata, plus ``precision`` = ``"int8"`` and
``int8`` (JSON: the calibration data, the guard's figures). ``OnnxDetector``
(``SSD_BACKEND=onnxruntime``) serves a ``full`` one as it serves the fp32 file. No torch is
needed here. Figures against PyTorch's INT8: docs/performance.md.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

from model.network.pixels import prepare_image

# The ops given int8 kernels: convolutions, the ReLUs after them (folded into the
# convolutions' output ranges) and the max-pools between them. Everything else (the L2Norm,
# the heads' reshapes, decoding, NMS) stays fp32. Quantizing every op ONNX Runtime can
# (Transpose, Reshape, Concat too) ran no faster here (docs/performance.md).
QUANTIZED_OPS = ("Conv", "Relu", "MaxPool")
CALIBRATION_BATCH = 8
ONNX_SUFFIX = ".int8.onnx"


class _Batches(CalibrationDataReader):
    """Feeds ``quantize_static`` the ``images`` input, one prepared batch at a time."""

    def __init__(self, batches: Iterator[np.ndarray]) -> None:
        self.batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch}


def _prepared(
    images: Iterable[Image.Image], size: int, mean: tuple[float, ...], resize: str
) -> Iterator[np.ndarray]:
    """``images`` prepared as the service prepares them, ``CALIBRATION_BATCH`` at a time:
    float32 arrays [n, 3, S, S]."""
    batch: list[np.ndarray] = []
    for image in images:
        batch.append(prepare_image(image, size, mean, resize)[0])
        if len(batch) == CALIBRATION_BATCH:
            yield np.stack(batch)  # n x [3, S, S] -> [n, 3, S, S]
            batch = []
    if batch:
        yield np.stack(batch)


def onnx_int8_path(model: str | os.PathLike[str]) -> Path:
    """The INT8 file of an fp32 export: ``m.onnx`` -> ``m.int8.onnx``."""
    path = Path(model)
    return path.with_name(path.name.removesuffix(".onnx") + ONNX_SUFFIX)


def quantize_onnx(
    model: str | os.PathLike[str],
    images: Iterable[Image.Image],
    out: str | os.PathLike[str] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Quantize the graph at ``model`` (``full``, or ``raw`` for consumers who decode
    themselves) on ``images`` (PIL, any mode and size) and
    write it to ``out`` (default ``onnx_int8_path(model)``); ``info`` (JSON-able) goes into
    its ``int8`` metadata. Returns ``out``.

    Raises:
        ValueError: ``model`` is not an fp32 graph of ``model.export``, or ``images`` was
            empty.
    """
    model, out = Path(model), Path(out) if out is not None else onnx_int8_path(model)
    meta = onnx_metadata(model)
    if meta.get("graph") not in ("full", "raw") or meta.get("precision", "fp32") != "fp32":
        raise ValueError(
            f"{model}: expected an fp32 graph from python -m model.export, its metadata "
            f"says graph={meta.get('graph')!r}, precision={meta.get('precision', 'fp32')!r}"
        )
    mean = tuple(float(m) for m in json.loads(meta["pixel_mean"]))
    batches = _prepared(images, int(meta["input_size"]), mean, meta["resize"])
    first = next(batches, None)
    if first is None:
        raise ValueError("calibration needs at least one image, got none")
    reader = _Batches(itertools.chain([first], batches))
    with tempfile.TemporaryDirectory() as scratch:
        # ONNX Runtime's pre-processing (its basic graph optimisations, saved) turns the
        # folded BatchNorms' biases into initializers; without it the quantizer leaves those
        # convolutions in fp32 ("Expected bias ... to be an initializer") and the full-width
        # network ran no faster than fp32 (docs/performance.md). Symbolic shape inference is
        # skipped: it cannot follow the NMS part of the graph.
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_providers=["CPUExecutionProvider"],
        )
    _set_props(out, {**meta, "precision": "int8"})
    write_int8_info(out, info or {})
    return out


def write_int8_info(path: str | os.PathLike[str], info: dict[str, Any]) -> None:
    """Put ``info`` (JSON-able: calibration, guard) into the file's ``int8`` metadata."""
    _set_props(path, {**onnx_metadata(path), "int8": json.dumps(info, sort_keys=True)})


def _set_props(path: str | os.PathLike[str], props: dict[str, str]) -> None:
    """Rewrite the file with exactly ``props`` as its ``metadata_props``."""
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ONNX file's ``metadata_props`` as a dict."""
    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}
