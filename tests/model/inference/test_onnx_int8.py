"""ONNX Runtime static INT8 (``model.inference.onnx_int8``, ``model.quantize --format onnx``):
the QDQ graph it writes, its metadata, serving it through ``OnnxDetector``, and the shipped
model's int8 graph against the mAP guard, its fp32 figure cross-checked against torch's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from model import ssd300_vgg16
from model.data.synthetic import SyntheticShapes
from model.evaluation.evaluate import score
from model.evaluation.int8_guard import ImageSet, make_onnx_int8
from model.export import export_onnx
from model.inference.int8 import MAP50_GUARD
from model.inference.onnx_detector import OnnxDetector
from model.inference.onnx_int8 import onnx_int8_path, onnx_metadata, quantize_onnx
from model.quantize import main
from model.weights.checkpoint import save_checkpoint
from tests.app.support import SHIPPED_WEIGHTS
from tests.model.conftest import TEST_SUBSET

NAMES = SyntheticShapes.class_names


def _pil(count: int, split: str) -> list[Image.Image]:
    samples = SyntheticShapes(count, split=split)
    return [Image.fromarray(samples[i][0].permute(1, 2, 0).numpy()) for i in range(count)]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    """A width-0.125 BatchNorm SSD300 with random weights, exported as a full graph."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("onnx_int8")
    checkpoint = folder / "tiny.safetensors"
    save_checkpoint(checkpoint, ssd300_vgg16(len(NAMES) + 1, batch_norm=True, width=0.125), NAMES)
    return export_onnx(checkpoint, folder / "tiny.onnx")


def test_every_convolution_runs_on_int8_weights_and_the_metadata_carries_over(tiny_onnx):
    out = quantize_onnx(tiny_onnx, _pil(4, "train"), info={"note": "test"})
    assert out == onnx_int8_path(tiny_onnx) == tiny_onnx.with_name("tiny.int8.onnx")
    graph = onnx.load(str(out)).graph
    producers = {output: node for node in graph.node for output in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert convs  # a Conv's weight comes from a DequantizeLinear of an int8 initializer
    for conv in convs:
        weight = producers[conv.input[1]]
        assert weight.op_type == "DequantizeLinear", conv.name
        stored = next(i for i in graph.initializer if i.name == weight.input[0])
        assert stored.data_type == onnx.TensorProto.INT8
    before, after = onnx_metadata(tiny_onnx), onnx_metadata(out)
    assert {k: after[k] for k in before} == before
    assert after["precision"] == "int8" and json.loads(after["int8"]) == {"note": "test"}
    served = OnnxDetector(out)
    assert served.precision == "int8" and OnnxDetector(tiny_onnx).precision == "fp32"
    [found] = served.predict(_pil(1, "test"), score_threshold=0.0, max_detections=5)
    assert len(found) == 5 and set(found.labels) <= set(NAMES)


def test_wrong_inputs_are_refused_naming_the_file(tiny_onnx, tmp_path):
    int8 = quantize_onnx(tiny_onnx, _pil(2, "train"), tmp_path / "a.int8.onnx")
    with pytest.raises(ValueError, match=r"a\.int8\.onnx.*precision='int8'"):
        quantize_onnx(int8, _pil(2, "train"))
    with pytest.raises(ValueError, match="at least one image"):
        quantize_onnx(tiny_onnx, [], tmp_path / "b.int8.onnx")
    assert not (tmp_path / "b.int8.onnx").exists()


def test_command_exports_quantizes_and_guards(tiny_onnx, tmp_path, capsys):
    checkpoint = tmp_path / "m.safetensors"
    torch.manual_seed(1)
    save_checkpoint(checkpoint, ssd300_vgg16(len(NAMES) + 1, batch_norm=True, width=0.125), NAMES)
    argv = ["--weights", str(checkpoint), "--data", "synthetic:8", "--calibration", "4",
            "--guard-data", "synthetic:4", "--format", "onnx"]  # fmt: skip
    assert main(argv) == 0
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    assert f"wrote {int8}" in capsys.readouterr().out
    info = json.loads(onnx_metadata(int8)["int8"])
    assert info["calibration"] == {"data": "synthetic:8", "split": "train", "images": 4}
    assert set(info["guard"]["map50"]) == {"fp32", "int8"}
    assert OnnxDetector(fp32).precision == "fp32" and OnnxDetector(int8).precision == "int8"
    # an exported file is taken as it is
    out = tmp_path / "again.int8.onnx"
    argv = ["--weights", str(tiny_onnx), "--data", "synthetic:8", "--calibration", "2",
            "--guard-data", "synthetic:2", "--format", "onnx", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0 and OnnxDetector(out).precision == "int8"


def test_shipped_int8_graph_meets_the_guard(shipped_on_test_split, tmp_path):
    if not SHIPPED_WEIGHTS.is_file():
        pytest.skip(f"no shipped model at {SHIPPED_WEIGHTS}")
    fp32 = export_onnx(SHIPPED_WEIGHTS, tmp_path / "shapes.onnx")
    result = make_onnx_int8(
        fp32,
        ImageSet.load("synthetic:64", "train"),
        ImageSet.load(f"synthetic:{TEST_SUBSET}", "test"),
        count=64,
    )
    # ONNX Runtime's fp32 figure is torch's on the same images, scored by another path (both
    # backends prepare pixels with model.network.pixels; the graphs' scores differ by float
    # rounding only)
    detector, detections, truths = shipped_on_test_split("fp32")
    torch_map = score(detections, truths, detector.class_names).map50
    assert result.map50["fp32"] == pytest.approx(torch_map, abs=1e-3)
    assert result.map50["fp32"] - result.map50["int8"] <= MAP50_GUARD, result.map50
    recorded = json.loads(onnx_metadata(result.path)["int8"])["guard"]["map50"]
    assert recorded == result.map50
    assert np.isfinite(list(recorded.values())).all()
