"""``python -m model.predict`` on real files with the shipped model: the service's answer per
image, COCO results scored by pycocotools, annotated images whose drawn pixels lie on the boxes,
and unreadable files skipped and named."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from app.schemas import DetectResponse
from model import Detector
from model.inference.drawing import COLOURS, draw_detections
from model.network.postprocess import Detections
from model.predict import main
from tests.app.support import CIRCLE_BOX, SHIPPED_WEIGHTS, SQUARE_BOX, shapes_image

pytestmark = pytest.mark.skipif(not SHIPPED_WEIGHTS.is_file(), reason="needs the shipped model")


def _photos(root: Path) -> Path:
    """A folder of the test scene twice (one in a subfolder, one EXIF-less PNG), a file that
    is not an image, and a text file the folder search leaves alone."""
    (root / "sub").mkdir(parents=True)
    shapes_image().save(root / "scene.jpg", quality=95)
    shapes_image().resize((960, 720)).save(root / "sub" / "big.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_json_per_image_is_the_services_answer_and_broken_files_are_named(tmp_path, caplog):
    photos, out = _photos(tmp_path / "photos"), tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="model.predict"):
        code = main([str(photos), str(photos / "*.jpg"), "--weights", str(SHIPPED_WEIGHTS),
                     "--out", str(out), "--batch-size", "2", "--precision", "fp32"])  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["big.json", "scene.json"]
    assert f"{photos / 'broken.jpg'}: skipped, not a readable image" in caplog.text
    assert "2 images detected" in caplog.text and "1 skipped" in caplog.text
    detector = Detector.load(SHIPPED_WEIGHTS, device="cpu", precision="fp32")
    for name, image, scale in (("scene", shapes_image(), 1), ("big", None, 2)):
        body = json.loads((out / f"{name}.json").read_text())
        DetectResponse.model_validate(body)  # the service's schema
        assert body["model"]["name"] == "ssd300_shapes" and len(body["model"]["version"]) == 12
        if image is not None:
            [expected] = detector.predict([Image.open(photos / "scene.jpg")], score_threshold=0.3)
            assert [d["label"] for d in body["detections"]] == expected.labels
        labels = {d["label"]: d["box"] for d in reversed(body["detections"])}
        circle = [labels["circle"][k] / scale for k in ("x_min", "y_min", "x_max", "y_max")]
        assert np.allclose(circle, CIRCLE_BOX, atol=12), circle
    assert body["image"] == {"width": 960, "height": 720}


def test_coco_results_score_with_pycocotools(tmp_path):
    photos, out = _photos(tmp_path / "photos"), tmp_path / "out"
    assert main([str(photos / "scene.jpg"), "--weights", str(SHIPPED_WEIGHTS), "--out", str(out),
                 "--format", "coco", "--precision", "fp32"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert {r["image_id"] for r in results} == {1}
    # Ground truth written by hand: the scene's circle (category 1) and square (2).
    truth = {
        "images": [{"id": 1, "file_name": "scene.jpg", "width": 480, "height": 360}],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"},
                       {"id": 3, "name": "triangle"}],
        "annotations": [
            {"id": i, "image_id": 1, "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0],
             "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
            for i, (c, (x0, y0, x1, y1)) in enumerate([(1, CIRCLE_BOX), (2, SQUARE_BOX)], 1)
        ],
    }  # fmt: skip
    annotations = tmp_path / "truth.json"
    annotations.write_text(json.dumps(truth))
    gt = COCO(str(annotations))
    scored = COCOeval(gt, gt.loadRes(str(out / "results.json")), "bbox")
    scored.params.catIds = [1, 2]
    scored.evaluate()
    scored.accumulate()
    scored.summarize()
    assert scored.stats[1] > 0.99  # AP at IoU 0.5
    # With the ids of an annotations file: its image id, by file name.
    truth["images"][0]["id"] = 42
    annotations.write_text(json.dumps(truth))
    assert main([str(photos / "scene.jpg"), "--weights", str(SHIPPED_WEIGHTS), "--out", str(out),
                 "--format", "coco", "--coco-ids", str(annotations)]) == 0  # fmt: skip
    assert {r["image_id"] for r in json.loads((out / "results.json").read_text())} == {42}


def test_drawn_boxes_lie_where_the_json_says(tmp_path):
    photos, out = _photos(tmp_path / "photos"), tmp_path / "out"
    assert main([str(photos / "sub"), "--weights", str(SHIPPED_WEIGHTS), "--out", str(out),
                 "--draw", "--max-detections", "2", "--precision", "fp32"]) == 0  # fmt: skip
    body = json.loads((out / "big.json").read_text())
    drawn = np.asarray(Image.open(out / "big.jpg").convert("RGB")).astype(int)
    assert drawn.shape == (720, 960, 3)
    for detection in body["detections"]:
        colour = np.array(COLOURS[detection["class_id"] % len(COLOURS)])
        box = detection["box"]
        # The left and right edges, below the label: pixels of the class colour (JPEG-close).
        rows = range(int(box["y_min"]) + 40, int(box["y_max"]) - 10, 7)
        # The line runs inside the box from its edges (written 4:4:4, so thin lines keep their
        # colour).
        for x in (int(box["x_min"]), int(box["x_max"]) - 1):
            close = [np.abs(drawn[y, x] - colour).max() < 60 for y in rows]
            assert np.mean(close) > 0.9, (detection["label"], x)


@pytest.mark.parametrize("side", [300, 4000])
def test_labels_are_readable_on_small_and_large_photos(side):
    box = [0.1 * side, 0.3 * side, 0.6 * side, 0.8 * side]
    detections = Detections(
        torch.tensor([box]), torch.tensor([0.93]), torch.tensor([2]), ["square"]
    )
    image = Image.new("RGB", (side, side), (255, 255, 255))
    drawn = np.asarray(draw_detections(image, detections))
    # The label's filled background sits just above the box, as tall as about 2 % of the side
    # (at least 12 px): readable on a thumbnail and on a camera photo alike.
    column = drawn[: int(box[1]), int(box[0]) + 2]
    label_rows = np.nonzero(np.abs(column - np.array(COLOURS[2])).max(axis=1) < 10)[0]
    assert len(label_rows) >= max(12, 0.02 * side), len(label_rows)
    assert label_rows.max() >= int(box[1]) - 2  # touching the box's top edge


def test_nothing_readable_is_exit_status_2(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"nope")
    out = tmp_path / "out"
    assert (
        main([str(tmp_path / "a.jpg"), "--weights", str(SHIPPED_WEIGHTS), "--out", str(out)]) == 2
    )
    assert main([str(tmp_path), "--weights", str(tmp_path / "missing.safetensors"),
                 "--out", str(out)]) == 2  # fmt: skip
