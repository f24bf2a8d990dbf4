"""model.data.check (``python -m model.data check``): raccoon, and VOC folders built in tmp_path
whose boxes are default boxes or far smaller than any."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.data import load_dataset
from model.data.check import PERCENTILES, main
from model.data.synthetic import SyntheticShapes
from tests.model.data.support import count_boxes, write_image


def _voc(root: Path, objects: list[list[tuple]], size: int = 300) -> str:
    """A flat VOC folder of ``size`` x ``size`` grey images, one per entry of ``objects``
    ((name, xmin, ymin, xmax, ymax) in VOC's 1-based pixel indices); gives its spec."""
    for i, boxes in enumerate(objects):
        parts = [f"<filename>{i}.png</filename>"]
        for name, x0, y0, x1, y1 in boxes:
            box = f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
            parts.append(f"<object><name>{name}</name><bndbox>{box}</bndbox></object>")
        (root / f"{i}.xml").write_text(f"<annotation>{''.join(parts)}</annotation>")
        write_image(root / f"{i}.png", (size, size))
    return f"voc:{root}"


def _check(spec: str, out: Path, *flags: str) -> dict:
    assert main(["check", spec, "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_raccoon_report_counts_sizes_plot_and_json(raccoon, tmp_path, capsys):
    png = tmp_path / "sizes.png"
    result = _check(f"voc:{raccoon}", tmp_path / "r.json", "--plot", str(png))
    dataset = load_dataset(f"voc:{raccoon}", split="all")
    labels = Counter(
        dataset.class_names[k - 1]
        for i in range(len(dataset))
        for k in dataset.target(i)["labels"].tolist()
    )
    assert (result["images"], result["boxes"]) == (200, count_boxes(dataset)) == (200, 217)
    assert result["per_class"] == dict(labels) == {"raccoon": 217}
    assert set(result["bad_data"].values()) == {0}
    # Sizes at the 300 px input from each image's header (PIL) and its boxes, by numpy.
    wh = []
    for i, record in enumerate(dataset.records):
        width, height = Image.open(record.path).size
        boxes = dataset.target(i)["boxes"].numpy().astype(np.float64)
        wh += [((x1 - x0) * 300 / width, (y1 - y0) * 300 / height) for x0, y0, x1, y1 in boxes]
    wh = np.array(wh)
    expected = {
        "width": wh[:, 0],
        "height": wh[:, 1],
        "sqrt_area": np.sqrt(wh[:, 0] * wh[:, 1]),
    }
    for key, values in expected.items():
        np.testing.assert_allclose(result["box_sizes_px"][key], np.percentile(values, PERCENTILES))
    assert set(result["coverage"]) == {"300", "512"}
    assert all(0.99 <= share <= 1.0 for s in result["coverage"].values() for share in s.values())
    assert result["suggestions"] == []
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 500
    printed = capsys.readouterr().out
    assert "200 images, 217 boxes, 1 classes" in printed and "no change" in printed


def test_annotations_equal_the_decoded_samples(raccoon):
    dataset = load_dataset(f"voc:{raccoon}", split="all")
    annotations = list(dataset.annotations())
    assert len(annotations) == len(dataset)
    for i in range(0, len(dataset), 10):  # 20 images decoded: a few hundred ms
        image, target = dataset[i]
        width, height, boxes, labels = annotations[i]
        assert (height, width) == tuple(image.shape[1:])
        assert torch.equal(boxes, target["boxes"]) and torch.equal(labels, target["labels"])
    shapes = SyntheticShapes(3, split="test")
    for i, (width, height, boxes, labels) in enumerate(shapes.annotations()):
        image, target = shapes[i]
        assert (height, width) == tuple(image.shape[1:])
        assert torch.equal(boxes, target["boxes"]) and torch.equal(labels, target["labels"])


def test_boxes_that_are_default_boxes_and_one_far_smaller_give_the_exact_share(tmp_path):
    # SSD300 "voc": conv4_3 (step 8) has 30 px boxes, cell (5, 5) centred at 44 px; conv7
    # (step 16) has 60 px boxes, cell (5, 5) centred at 88 px. In 0-based pixel edges they are
    # [29, 29, 59, 59] and [58, 58, 118, 118], in VOC's 1-based indices (30, 30, 59, 59) and
    # (59, 59, 118, 118). The 4 px box has IoU at most 16 / 144 with the smallest default box
    # of any preset (12 px, "fine").
    spec = _voc(
        tmp_path, [[("a", 30, 30, 59, 59), ("a", 59, 59, 118, 118)], [("b", 101, 201, 104, 204)]]
    )
    result = _check(spec, tmp_path / "f.json")
    assert result["per_class"] == {"a": 2, "b": 1}
    assert result["coverage"]["300"]["voc"] == 2 / 3
    assert all(share == 2 / 3 for share in result["coverage"]["300"].values())
    assert result["box_sizes_px"]["sqrt_area"][2] == 30.0  # the median of 4, 30 and 60 px
    assert result["small_share"] == 1 / 3
    assert len(result["suggestions"]) == 2  # poor coverage, and a third of the boxes small


@pytest.mark.parametrize("size", ["300", "512"])
def test_tiny_boxes_get_a_suggestion(tmp_path, capsys, size):
    # 6 px boxes on 600 px images: 3 px at the 300 px input, 5 px at 512.
    tiny = [("dot", 101 + 50 * k, 101, 106 + 50 * k, 106) for k in range(4)]
    spec = _voc(tmp_path, [tiny, tiny], size=600)
    result = _check(spec, tmp_path / "t.json", "--size", size)
    assert result["small_share"] == 1.0
    assert all(share == 0.0 for s in result["coverage"].values() for share in s.values())
    printed = capsys.readouterr().out
    assert "Only 0% of the boxes have a default box" in printed
    if size == "300":
        assert "--size 512" in printed
    else:
        assert "No tiling fits" in printed and "512 is the largest input" in printed
