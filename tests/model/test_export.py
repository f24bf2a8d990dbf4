"""``model.export``: the ONNX files it writes, checked by the ONNX checker and run by ONNX
Runtime against torch on the same inputs: the raw graph's outputs within a stated tolerance,
the full graph's detections equal to the ``Detector``'s (labels equal, boxes within 0.5 px),
on coco128 photos and synthetic shapes images, at batch 1 and in mixed batches, for the
shipped model and for published weights (torchvision's COCO SSD300, the suite's stand-in)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from model import Detector
from model.data.synthetic import SyntheticShapes
from model.export import export_onnx, main
from model.inference.onnx_detector import OnnxDetector, OnnxModelError
from model.network.detections import Cut, Detections
from tests.app.support import SHIPPED_WEIGHTS, shapes_image
from tests.conftest import SHARED
from tests.support.matching import assert_same_detections

# Boxes of the two runtimes may differ by float rounding only; the bar the issue sets.
BOX_PX = 0.5
# Raw outputs: ONNX Runtime's convolutions sum in another order than oneDNN's, so fp32
# outputs differ by rounding; measured at most 2.5e-5 here (docs/export.md). The bound leaves
# room for other CPUs' kernels, and is far below what changes a detection.
RAW_ATOL = 5e-3
# Scores closer than this may swap places between the runtimes (tests/support/matching.py).
TIE = 1e-4
PHOTOS = 3  # coco128 photos per test: the full-width network takes ~1 s an image here


def _photos(count: int = PHOTOS) -> list[Image.Image]:
    """The first ``count`` coco128 photos, or none where the shared data is absent (the
    synthetic images still run)."""
    folder = SHARED / "coco128" / "images"
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.jpg"))[:count]]


def _synthetic(count: int) -> list[Image.Image]:
    """Synthetic shapes images of the test split, as PIL images."""
    samples = SyntheticShapes(count, split="test")
    return [Image.fromarray(samples[i][0].permute(1, 2, 0).numpy()) for i in range(count)]


def _same(ours: Detections, theirs: Detections) -> None:
    """The same detections: labels equal, boxes within ``BOX_PX``, in score order (near-ties
    of score, below ``TIE``, in either order)."""
    assert_same_detections(
        (ours.labels, np.asarray(ours.boxes), np.asarray(ours.scores)),
        (theirs.labels, theirs.boxes.numpy(), theirs.scores.numpy()),
        box_px=BOX_PX,
        tie=TIE,
    )


def _compare(detector: Detector, served: OnnxDetector, images: list, cuts: list[Cut]) -> int:
    """Both runtimes on the same prepared inputs (the torch ``prepare``'s, so only the graph
    is compared here) with the same cuts; returns the detections found."""
    prepared = [detector.prepare(image) for image in images]
    sizes = [size for _, size in prepared]
    theirs = detector.run_batch([x for x, _ in prepared], sizes, cuts).detections
    ours = served.run_batch([x.numpy() for x, _ in prepared], sizes, cuts).detections
    assert len(ours) == len(theirs) == len(images)
    for mine, reference in zip(ours, theirs, strict=True):
        _same(mine, reference)
    return sum(len(d) for d in theirs)


@pytest.fixture(scope="module")
def shipped() -> Detector:
    if not SHIPPED_WEIGHTS.is_file():
        pytest.skip(f"no shipped model at {SHIPPED_WEIGHTS}")
    return Detector.load(SHIPPED_WEIGHTS, device="cpu", precision="fp32")


def test_the_full_graph_passes_the_checker_and_says_what_it_holds(shapes_onnx: Path, shipped):
    model = onnx.load(str(shapes_onnx))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["graph"] == "full" and meta["opset"] == "17"
    assert json.loads(meta["class_names"]) == shipped.class_names
    assert int(meta["input_size"]) == 300 and meta["resize"] == "antialias"
    assert json.loads(meta["pixel_mean"]) == list(shipped.pixel_mean)
    assert model.opset_import[0].version == 17
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["images", "image_sizes", "score_threshold", "class_mask", "nms_iou"]
    defaults = {i.name for i in model.graph.initializer} & set(inputs)
    assert defaults == {"image_sizes", "score_threshold", "class_mask", "nms_iou"}
    shapes = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in model.graph.output
    }
    assert shapes == {
        "boxes": ["batch", 200, 4],
        "scores": ["batch", 200],
        "class_ids": ["batch", 200],
        "counts": ["batch"],
    }


def test_full_graph_gives_the_detectors_detections_one_image_at_a_time(shapes_onnx, shipped):
    served = OnnxDetector(shapes_onnx)
    images = [shapes_image(), *_synthetic(3), *_photos()]
    found = 0
    for image in images:
        found += _compare(shipped, served, [image], [shipped.cut(0.05, 200)])
    assert found > 20  # a low threshold: many detections to compare, photos included


def test_full_graph_honours_each_images_cut_in_a_mixed_batch(shapes_onnx, shipped):
    served = OnnxDetector(shapes_onnx)
    images = [shapes_image(), *_synthetic(4), *_photos(), shapes_image((200, 300))]
    cuts = [
        shipped.cut(0.3, 100),
        shipped.cut(0.05, 200),
        shipped.cut(0.1, 3),
        shipped.cut(0.05, 200, ["circle", "star"]),
        shipped.cut(0.2, 50, None, nms_iou=0.7),
        *[shipped.cut(0.02, 150, None, nms_iou=0.2)] * (len(images) - 6),
        shipped.cut(0.0, 1, ["square"]),
    ]
    assert _compare(shipped, served, images, cuts) > 10


def test_the_batch_size_is_dynamic(shapes_onnx: Path):
    session = ort.InferenceSession(str(shapes_onnx), providers=["CPUExecutionProvider"])
    served = OnnxDetector(shapes_onnx)
    images = np.stack([served.prepare(image)[0] for image in [shapes_image(), *_synthetic(4)]])
    alone = [session.run(None, {"images": images[i : i + 1]}) for i in range(len(images))]
    for size in (2, 5):
        together = session.run(None, {"images": images[:size]})
        assert together[0].shape == (size, 200, 4) and together[3].shape == (size,)
        for i in range(size):
            assert together[3][i] == alone[i][3][0]
            np.testing.assert_allclose(together[0][i], alone[i][0][0], atol=1e-4)
            np.testing.assert_array_equal(together[2][i], alone[i][2][0])


def test_defaults_give_relative_boxes_and_padding_rows_are_zero(shapes_onnx, shipped):
    session = ort.InferenceSession(str(shapes_onnx), providers=["CPUExecutionProvider"])
    image = shapes_image()
    inputs, (width, height) = shipped.prepare(image)
    boxes, scores, class_ids, counts = session.run(None, {"images": inputs[None].numpy()})
    reference = shipped.predict([image])[0]  # the Detector's defaults: 0.3, IoU 0.45
    count = int(counts[0])
    assert count == len(reference) >= 2
    scale = np.array([width, height, width, height], np.float32)
    np.testing.assert_allclose(boxes[0, :count] * scale, reference.boxes.numpy(), atol=BOX_PX)
    assert not boxes[0, count:].any() and not scores[0, count:].any()
    assert not class_ids[0, count:].any()  # 0 is background: never a detection


def test_raw_graph_equals_the_network_and_carries_its_default_boxes(tmp_path, shipped):
    path = export_onnx(SHIPPED_WEIGHTS, tmp_path / "raw.onnx", graph="raw", opset=13)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["graph"] == "raw" and model.opset_import[0].version == 13
    priors = shipped.network.get_buffer("default_boxes")
    assert torch.equal(torch.tensor(json.loads(meta["default_boxes"])), priors)
    assert json.loads(meta["variances"]) == [0.1, 0.2]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = [shapes_image(), *_synthetic(2), *_photos()]
    batch = torch.stack([shipped.prepare(image)[0] for image in images])
    with torch.inference_mode():
        loc, conf = shipped.network(batch)
    for rows in (slice(0, 1), slice(0, len(images))):  # batch 1 and the whole batch
        offsets, logits = session.run(None, {"images": batch[rows].numpy()})
        assert offsets.shape == (len(batch[rows]), priors.shape[0], 4)
        np.testing.assert_allclose(offsets, loc[rows].numpy(), atol=RAW_ATOL, rtol=0)
        np.testing.assert_allclose(logits, conf[rows].numpy(), atol=RAW_ATOL, rtol=0)


def test_a_raw_graph_is_refused_for_serving(tmp_path: Path):
    path = export_onnx(SHIPPED_WEIGHTS, tmp_path / "raw.onnx", graph="raw")
    with pytest.raises(OnnxModelError, match=r"raw\.onnx: not a full graph"):
        OnnxDetector(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_file_gives_an_error_naming_it(shapes_onnx: Path, tmp_path: Path, damage):
    path = tmp_path / "broken.onnx"
    data = shapes_onnx.read_bytes()
    path.write_bytes(b"not an onnx file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(OnnxModelError, match=rf"{path}: not a readable ONNX model"):
        OnnxDetector(path)
    with pytest.raises(FileNotFoundError, match="no ONNX file at"):
        OnnxDetector(tmp_path / "absent.onnx")


def test_wrong_arguments_are_named(tmp_path: Path):
    with pytest.raises(ValueError, match="graph must be one of"):
        export_onnx(SHIPPED_WEIGHTS, tmp_path / "x.onnx", graph="nms")
    with pytest.raises(ValueError, match=r"opset must be in 11\.\.20, got 9"):
        export_onnx(SHIPPED_WEIGHTS, tmp_path / "x.onnx", opset=9)


def test_more_detections_than_the_file_keeps_are_refused(shapes_onnx: Path):
    served = OnnxDetector(shapes_onnx)
    with pytest.raises(ValueError, match="max_detections 201 is more than the 200"):
        served.cut(0.3, 201)


def test_published_weights_export_from_the_command_line(seeded_cache, tmp_path, capsys):
    # torchvision's COCO SSD300 (the suite's stand-in, full width, "bilinear" resize).
    out = tmp_path / "coco.onnx"
    assert main(["torchvision:coco", "--format", "onnx", "--out", str(out)]) == 0
    assert f"wrote {out} (full graph, opset 17," in capsys.readouterr().out
    detector = Detector.load("torchvision:coco", device="cpu", precision="fp32")
    served = OnnxDetector(out)
    assert served.class_names == detector.class_names and served.resize == "bilinear"
    images = [*_photos(2), shapes_image()]
    cuts = [detector.cut(0.1, 100), detector.cut(0.05, 200, None, 0.6), detector.cut(0.2, 20)]
    assert _compare(detector, served, images, cuts) > 5


def test_the_comparison_allows_swapped_near_ties_and_nothing_else():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32)
    scores = np.array([0.9, 0.5, 0.5 - 1e-6], np.float32)
    labels = ["a", "b", "b"]
    swapped = (labels, boxes[[0, 2, 1]], scores)
    assert assert_same_detections(swapped, (labels, boxes, scores), box_px=0.5, tie=TIE) == 0
    moved = boxes.copy()
    moved[1, 0] += 0.6
    with pytest.raises(AssertionError, match="detection 1"):
        assert_same_detections(
            (labels, moved, scores), (labels, boxes, scores), box_px=0.5, tie=TIE
        )
    with pytest.raises(AssertionError):
        assert_same_detections(
            (["a", "c", "b"], boxes, scores), (labels, boxes, scores), box_px=0.5, tie=TIE
        )
    with pytest.raises(AssertionError):  # not a near-tie: order matters
        assert_same_detections(
            (labels, boxes[[1, 0, 2]], scores), (labels, boxes, scores), box_px=0.5, tie=TIE
        )


def test_without_defaults_every_input_is_required_and_means_the_same(shapes_onnx, tmp_path):
    path = export_onnx(SHIPPED_WEIGHTS, tmp_path / "plain.onnx", defaults=False)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in plain.get_inputs()] == [
        "images", "image_sizes", "score_threshold", "class_mask", "nms_iou",
    ]  # fmt: skip
    served = OnnxDetector(shapes_onnx)
    images = np.stack([served.prepare(image)[0] for image in [shapes_image(), *_synthetic(2)]])
    feed = {
        "images": images,
        "image_sizes": np.array([[480, 360], [300, 300], [300, 300]], np.float32),
        "score_threshold": np.array([0.3, 0.05, 0.1], np.float32),
        "class_mask": np.array([[True] * 6, [True] * 6, [False, True] * 3]),
        "nms_iou": np.array([0.5], np.float32),
    }
    with pytest.raises(ValueError, match="image_sizes"):
        plain.run(None, {"images": images})
    for ours, theirs in zip(plain.run(None, feed), served.session.run(None, feed), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_the_command_names_a_bad_source(tmp_path: Path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert main([str(bad), "--out", str(tmp_path / "x.onnx")]) == 2
    assert f"error: {bad}: not a readable safetensors checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
