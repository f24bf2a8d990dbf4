"""INT8 quantization (model.inference.int8, model.quantize): the artifact, its loading, the
command and the shipped artifact against the accuracy guard."""

import pickle
from pathlib import Path

import pytest
import torch

from model import Detector, ssd300_vgg16
from model.data.synthetic import SyntheticShapes
from model.evaluation.evaluate import score
from model.evaluation.int8_guard import quantize_network
from model.inference.int8 import (
    MAP50_GUARD,
    QuantizableSSD,
    activation_qparams,
    guard_shortfall,
    int8_artifact_for,
    int8_artifact_path,
    load_int8,
    read_int8_info,
    rebuild,
    save_int8,
)
from model.inference.runtime import resolve_precision
from model.network.postprocess import MAX_DETECTIONS, Cut, postprocess_each
from model.network.preprocessing import preprocess
from model.quantize import main
from model.weights.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "weights" / "ssd300_shapes.safetensors"
NAMES = SyntheticShapes.class_names


def _images(count: int, split: str = "train") -> torch.Tensor:
    """``count`` synthetic images as the network's input, Tensor[count, 3, 300, 300]."""
    data = SyntheticShapes(count, split=split)
    return preprocess([data[i][0] for i in range(count)], 300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A width-0.125 BatchNorm SSD300 checkpoint with random weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("int8") / "tiny.safetensors"
    save_checkpoint(path, ssd300_vgg16(len(NAMES) + 1, batch_norm=True, width=0.125), NAMES)
    return path


@pytest.fixture(scope="module")
def calibrated(tiny):
    """The tiny network quantized on 8 images, and the fp32 network."""
    network = Detector.load(tiny, device="cpu", precision="fp32").network.float().eval()
    return quantize_network(network, _images(8).split(4)), network


def test_quantized_outputs_follow_fp32(calibrated):
    quantized, network = calibrated
    inputs = _images(4, split="test").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        (loc, conf), (loc32, conf32) = quantized(inputs), network(inputs)
    assert loc.dtype == conf.dtype == torch.float32
    assert loc.shape == loc32.shape and conf.shape == conf32.shape
    for ours, reference in ((loc, loc32), (conf, conf32)):
        # int8 rounding moves each output by a small part of its spread, not more
        assert (ours - reference).abs().mean() < 0.1 * reference.std()
        assert torch.corrcoef(torch.stack([ours.flatten(), reference.flatten()]))[0, 1] > 0.98


def test_artifact_round_trip_without_pickle(calibrated, tiny, tmp_path, monkeypatch):
    quantized, _ = calibrated
    checkpoint = tmp_path / "copy.safetensors"
    checkpoint.write_bytes(tiny.read_bytes())
    path = int8_artifact_path(checkpoint)
    assert path == tmp_path / "copy.int8.safetensors"
    save_int8(path, activation_qparams(quantized), checkpoint, {"note": "test"})
    assert int8_artifact_for(checkpoint) == path
    assert read_int8_info(path)["info"] == {"note": "test"}

    def refuse(*args, **kwargs):
        raise AssertionError("the INT8 artifact must load without unpickling")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    detector = Detector.load(checkpoint, device="cpu", precision="int8")
    assert detector.precision == "int8"
    inputs = _images(2, split="test")
    with torch.inference_mode():
        expected = quantized(inputs.contiguous(memory_format=torch.channels_last))
    with torch.inference_mode():
        loc, conf = detector.network(detector.runtime.inputs(inputs))
    assert torch.equal(loc, expected[0]) and torch.equal(conf, expected[1])
    # the same detections through the public path as through the calibrated network
    images = [SyntheticShapes(2, split="test")[i][0] for i in range(2)]
    sizes = [(int(image.shape[2]), int(image.shape[1])) for image in images]
    ours = detector.predict(images, score_threshold=0.01)
    prepared = torch.stack([detector.prepare(image)[0] for image in images])
    with torch.inference_mode():
        outputs = quantized(prepared.contiguous(memory_format=torch.channels_last))
    default_boxes = quantized.get_buffer("default_boxes")
    reference = postprocess_each(*outputs, default_boxes, sizes, [Cut(0.01, MAX_DETECTIONS)] * 2)
    for a, (boxes, _, class_ids) in zip(ours, reference, strict=True):
        assert torch.equal(a.boxes, boxes) and torch.equal(a.class_ids, class_ids)


def test_int8_without_artifact_names_the_expected_file(tiny):
    with pytest.raises(FileNotFoundError, match=r"tiny\.int8\.safetensors"):
        Detector.load(tiny, device="cpu", precision="int8")
    assert int8_artifact_for(tiny) is None


def test_artifact_of_other_weights_is_refused(calibrated, tiny, tmp_path):
    quantized, _ = calibrated
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, ssd300_vgg16(len(NAMES) + 1, batch_norm=True, width=0.125), NAMES)
    artifact = tmp_path / "tiny.int8.safetensors"
    save_int8(artifact, activation_qparams(quantized), other, {})
    with pytest.raises(ValueError, match="other weights"):
        load_int8(tiny, artifact)


def test_rebuild_names_mismatched_parameters(calibrated):
    quantized, network = calibrated
    params = activation_qparams(quantized)
    params.pop("quant_input")
    params["nowhere"] = torch.tensor([1.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"missing \['quant_input'\].*unexpected \['nowhere'\]"):
        rebuild(network, params, source="x.int8.safetensors")


def test_int8_needs_a_quantized_network_and_the_cpu(calibrated):
    quantized, network = calibrated
    with pytest.raises(ValueError, match="int8"):
        Detector(network, NAMES, precision="int8")
    with pytest.raises(ValueError, match="int8"):
        Detector(quantized, NAMES, precision="fp32")
    with pytest.raises(ValueError, match="CPU only"):
        resolve_precision("int8", torch.device("cuda"))


def test_command_writes_the_artifact_with_its_guard(tiny, tmp_path, capsys):
    out = tmp_path / "made.int8.safetensors"
    args = ["--weights", str(tiny), "--data", "synthetic:8", "--calibration", "4"]
    assert main([*args, "--guard-data", "synthetic:4", "--out", str(out)]) == 0
    info = read_int8_info(out)
    assert info["checkpoint_sha256"] and info["checkpoint"] == tiny.name
    assert info["info"]["calibration"] == {"data": "synthetic:8", "split": "train", "images": 4}
    assert set(info["info"]["guard"]["map50"]) == {"fp32", "int8"}
    assert str(out) in capsys.readouterr().out


def test_command_errors_name_files(tiny, tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert main(["--weights", str(missing), "--data", "synthetic:4"]) == 2
    assert str(missing) in capsys.readouterr().err
    nowhere = tmp_path / "no" / "such" / "x.int8.safetensors"
    assert main(["--weights", str(tiny), "--data", "synthetic:4", "--out", str(nowhere)]) == 2
    assert str(nowhere.parent) in capsys.readouterr().err


def test_shipped_artifact_meets_the_guard(shipped_on_test_split):
    if int8_artifact_for(SHIPPED) is None:
        pytest.skip(f"no shipped INT8 artifact beside {SHIPPED}")
    recorded = read_int8_info(int8_artifact_path(SHIPPED))["info"]["guard"]["map50"]
    assert recorded["fp32"] - recorded["int8"] <= MAP50_GUARD
    measured = {}
    for precision in ("fp32", "int8"):
        detector, detections, truths = shipped_on_test_split(precision)
        measured[precision] = score(detections, truths, detector.class_names).map50
    assert measured["fp32"] - measured["int8"] <= MAP50_GUARD, measured


def test_auto_lets_the_int8_artifact_compete_when_it_is_there(calibrated, tiny, tmp_path):
    quantized, _ = calibrated
    checkpoint = tmp_path / "copy.safetensors"
    checkpoint.write_bytes(tiny.read_bytes())
    # Without an artifact beside the checkpoint, int8 is no candidate.
    plain = Detector.load(checkpoint, device="cpu", precision="auto")
    assert "int8" not in plain.precision_choice.images_per_s
    # With one, it is timed and guarded like the others, and its network runs when chosen.
    save_int8(int8_artifact_path(checkpoint), activation_qparams(quantized), checkpoint, {})
    detector = Detector.load(checkpoint, device="cpu", precision="auto")
    choice = detector.precision_choice
    assert "int8" in choice.images_per_s and "int8" in choice.error
    passing = {k: v for k, v in choice.images_per_s.items() if k not in choice.rejected}
    assert detector.precision == max(passing, key=passing.get)
    assert isinstance(detector.network, QuantizableSSD) == (detector.precision == "int8")


def test_auto_leaves_out_an_artifact_that_failed_the_guard(calibrated, tiny, tmp_path, caplog):
    quantized, _ = calibrated
    checkpoint = tmp_path / "copy.safetensors"
    checkpoint.write_bytes(tiny.read_bytes())
    artifact = int8_artifact_path(checkpoint)
    # 0.50 against 0.52: 2 points down, 1 beyond the guard
    failed = {"guard": {"map50": {"fp32": 0.52, "int8": 0.50}}}
    save_int8(artifact, activation_qparams(quantized), checkpoint, failed)
    assert guard_shortfall(artifact) == pytest.approx(0.02 - MAP50_GUARD)
    with caplog.at_level("WARNING", logger="model.inference.detector"):
        choice = Detector.load(checkpoint, device="cpu", precision="auto").precision_choice
    assert "int8" not in choice.images_per_s and str(artifact) in caplog.text
    assert Detector.load(checkpoint, device="cpu", precision="int8").precision == "int8"
    # within the guard (or with no guard recorded, as the bench's artifacts) it competes
    save_int8(artifact, activation_qparams(quantized), checkpoint, {"guard": {"map50": {
        "fp32": 0.52, "int8": 0.515}}})  # fmt: skip
    assert guard_shortfall(artifact) is None
    assert "int8" in Detector.load(checkpoint, precision="auto").precision_choice.images_per_s
