"""model.data.yolo: YOLO copies of raccoon and coco128 made here from ../shared/datasets, a
hand-written case with golden boxes, bad lines, and the training and evaluation commands on a
YOLO spec."""

import json
import logging
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.data import YoloDataset, load_dataset
from model.data.base import holdout
from model.data.yolo import TOLERANCE, label_path
from model.train import main as train
from model.weights.checkpoint import load_checkpoint
from tests.model.data.support import check_sample, count_boxes, write_image

ROOT = Path(__file__).resolve().parents[3]


def _link(source: Path, target: Path) -> None:
    """The shared image at ``target``, linked rather than copied."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(source, target)


def _voc_to_yolo_line(obj: ET.Element, width: int, height: int) -> str:
    """A VOC object as a YOLO line, worked out here from the XML (not by model.data.voc):
    1-based inclusive pixel indices -> pixel edges (xmin - 1, ymin - 1, xmax, ymax)."""
    box = obj.find("bndbox")
    x0, y0, x1, y1 = (float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
    x0, y0 = x0 - 1, y0 - 1
    cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
    return f"0 {cx:.6f} {cy:.6f} {(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}"


@pytest.fixture(scope="module")
def raccoon_yolo(raccoon: Path, tmp_path_factory) -> Path:
    """raccoon as a YOLO export: images/{train,val}/ (the published split) and
    labels/{train,val}/, no data.yaml (each test writes its own)."""
    root = tmp_path_factory.mktemp("raccoon_yolo")
    for split in ("train", "val"):
        stems = (raccoon / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        for stem in stems:
            image = raccoon / "JPEGImages" / f"{stem}.jpg"
            _link(image, root / "images" / split / image.name)
            width, height = Image.open(image).size
            xml = ET.parse(raccoon / "Annotations" / f"{stem}.xml").getroot()
            lines = [_voc_to_yolo_line(obj, width, height) for obj in xml.iter("object")]
            label = root / "labels" / split / f"{stem}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(f"{line}\n" for line in lines))
    return root


def _yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _file_names(dataset) -> list[str]:
    return [dataset.target(i)["file_name"] for i in range(len(dataset))]


# data.yaml's forms, on the raccoon copy --------------------------------------------------------


def _txt_lists(root: Path) -> None:
    """train.txt with ./-relative lines (relative to the list), val.txt with absolute ones."""
    train = sorted((root / "images" / "train").iterdir())
    (root / "train.txt").write_text("".join(f"./images/train/{p.name}\n" for p in train))
    val = sorted((root / "images" / "val").iterdir())
    (root / "val.txt").write_text("".join(f"{p}\n" for p in val))


@pytest.mark.parametrize(
    ("where", "text", "sizes"),
    [
        ("data.yaml", "names: [raccoon]\ntrain: images/train\nval: images/val\n", (160, 40)),
        ("data.yaml", "nc: 1\nnames: {0: raccoon}\ntrain: train.txt\nval: val.txt\n", (160, 40)),
        # A list of a folder and a .txt list: every image of both, each once.
        ("data.yaml", "names: [raccoon]\ntrain: [images/val, train.txt]\nval: val.txt\n",
         (200, 40)),
        # path: relative to the yaml's folder, the entries relative to it.
        ("elsewhere/d.yaml", "path: ..\nnames: [raccoon]\ntrain: images/train\nval: val.txt\n",
         (160, 40)),
        # Roboflow's data.yaml sits in the dataset's folder yet says ../train/images.
        ("data.yaml", "names: ['raccoon']\ntrain: ../images/train\nval: ../images/val\n",
         (160, 40)),
    ],
    ids=["folders", "txt-lists", "list-of-both", "path-key", "roboflow-dotdot"],
)  # fmt: skip
def test_data_yaml_path_forms(raccoon_yolo, tmp_path, where, text, sizes):
    _txt_lists(raccoon_yolo)
    data_yaml = _yaml(raccoon_yolo / where, text)
    train = load_dataset(f"yolo:{data_yaml}", split="train")
    val = load_dataset(f"yolo:{data_yaml}", split="val")
    assert (len(train), len(val)) == sizes
    assert train.class_names == val.class_names == ["raccoon"]
    assert set(train.report().values()) == set(val.report().values()) == {0}
    assert count_boxes(load_dataset(f"yolo:{data_yaml}", split="all")) == 217
    if sizes == (160, 40):
        assert set(_file_names(train)).isdisjoint(_file_names(val))
    # path: absolute works the same.
    moved = _yaml(tmp_path / "abs.yaml", f"path: {raccoon_yolo}\n{text.split('path: ..')[-1]}")
    assert len(load_dataset(f"yolo:{moved}", split="val")) == 40


def test_yolo_copy_gives_the_voc_boxes_within_a_pixel(raccoon, raccoon_yolo):
    data_yaml = _yaml(raccoon_yolo / "data.yaml", "names: [raccoon]\ntrain: images\n")
    yolo = load_dataset(f"yolo:{data_yaml}", split="all")
    voc = load_dataset(f"voc:{raccoon}", split="all")
    assert len(yolo) == len(voc) == 200
    voc_boxes = {Path(t["file_name"]).stem: t["boxes"] for t in map(voc.target, range(200))}
    for i in range(len(yolo)):
        target = yolo.target(i)
        expected = voc_boxes[Path(target["file_name"]).stem]
        assert target["boxes"].shape == expected.shape
        assert (target["boxes"] - expected).abs().max() < 1.0  # 6 decimals: well under
        assert target["labels"].tolist() == [1] * len(expected)
    check_sample(*yolo[0])


def test_val_without_a_val_entry_is_the_shared_holdout(raccoon_yolo):
    data_yaml = _yaml(raccoon_yolo / "only_train.yaml", "names: [raccoon]\ntrain: images\n")
    train = load_dataset(f"yolo:{data_yaml}", split="train")
    val = load_dataset(f"yolo:{data_yaml}", split="val")
    everything = _file_names(load_dataset(f"yolo:{data_yaml}", split="all"))
    # The same deterministic holdout as VOC and COCO, of the images' paths under the root.
    assert set(_file_names(val)) == holdout(everything, 0.1) and len(val) == 20
    assert sorted(_file_names(train) + _file_names(val)) == sorted(everything)
    assert len(load_dataset(f"yolo:{data_yaml}", split="test")) == 200  # no test entry: all
    # :SPLIT in the spec fixes the part, whatever the caller asks for.
    assert _file_names(load_dataset(f"yolo:{data_yaml}:val", split="train")) == _file_names(val)
    # Image ids do not depend on the split: an image has the one id in every part.
    ids = {t["file_name"]: t["image_id"] for t in map(val.target, range(len(val)))}
    whole = load_dataset(f"yolo:{data_yaml}", split="all")
    assert ids == {n: whole.target(everything.index(n))["image_id"] for n in ids}


# Segments, on a YOLO copy of coco128 ----------------------------------------------------------


def test_coco128_segments_give_the_coco_boxes(coco128, tmp_path):
    data = json.loads((coco128 / "annotations" / "instances.json").read_text())
    categories = sorted(data["categories"], key=lambda c: c["id"])
    class_of = {c["id"]: k for k, c in enumerate(categories)}
    lines: dict[int, list[str]] = {image["id"]: [] for image in data["images"]}
    size = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    for ann in data["annotations"]:
        if ann["iscrowd"]:  # RLE regions: YOLO has no crowd
            continue
        width, height = size[ann["image_id"]]
        # Every polygon of the object in one segment line: its bounding box is the object's.
        points = [p for polygon in ann["segmentation"] for p in polygon]
        xy = [v / (width if k % 2 == 0 else height) for k, v in enumerate(points)]
        line = " ".join([str(class_of[ann["category_id"]]), *(f"{v:.6f}" for v in xy)])
        lines[ann["image_id"]].append(line)
    for image in data["images"]:
        _link(coco128 / "images" / image["file_name"], tmp_path / "images" / image["file_name"])
        if lines[image["id"]]:  # the two images without objects get no label file
            label = tmp_path / "labels" / (Path(image["file_name"]).stem + ".txt")
            label.parent.mkdir(exist_ok=True)
            label.write_text("\n".join(lines[image["id"]]) + "\n")
    names = "".join(f"  {k}: {c['name']}\n" for k, c in enumerate(categories))
    data_yaml = _yaml(tmp_path / "data.yaml", f"train: images\nval: images\nnames:\n{names}")

    yolo = load_dataset(f"yolo:{data_yaml}:all", split="all")
    coco = load_dataset(f"coco:{coco128 / 'images'}:{coco128 / 'annotations' / 'instances.json'}",
                        split="all")  # fmt: skip
    assert yolo.class_names == coco.class_names and len(yolo.class_names) == 80
    assert len(yolo) == 128 and count_boxes(yolo) == 929
    coco_by_name = {r.file_name: i for i, r in enumerate(coco.records)}
    for i in range(len(yolo)):
        ours, theirs = yolo.target(i), coco.target(coco_by_name[Path(yolo.records[i].path).name])
        pairs = zip(_objects(ours), _objects(theirs), strict=True)
        for (label_a, box_a), (label_b, box_b) in pairs:
            assert label_a == label_b
            assert max(abs(a - b) for a, b in zip(box_a, box_b, strict=True)) < 1.0
    assert yolo.report()["clipped_boxes"] == 0 and set(yolo.report().values()) == {0}


def _objects(target: dict) -> list[tuple[int, list[float]]]:
    """(label, box) of each object of a target, in a canonical order."""
    return sorted(zip(target["labels"].tolist(), target["boxes"].tolist(), strict=True))


# A hand-written case: golden boxes, negatives, bad lines ---------------------------------------


def _hand_written(root: Path) -> Path:
    """Four 200x100 images: a box and a segment, a negative without a label file, one with an
    empty label file, and one with every kind of bad line."""
    for name in ("good", "no_label", "empty", "bad"):
        write_image(root / "images" / f"{name}.png", size=(200, 100))
    labels = root / "labels"
    labels.mkdir()
    # cx 0.5 * 200 = 100, w 0.2 * 200 = 40 -> x 80..120; cy 0.5 * 100 = 50, h 0.4 * 100 = 40
    # -> y 30..70. The segment's x: 0.1, 0.3, 0.2 of 200 -> 20..60; y: 0.2, 0.2, 0.6 of 100.
    (labels / "good.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.1 0.2 0.3 0.2 0.2 0.6\n")
    (labels / "empty.txt").write_text("")
    (labels / "bad.txt").write_text(
        "0 0.5 0.5 0.2\n"  # 1: four fields
        "5 0.5 0.5 0.2 0.2\n"  # 2: class 5 of 2
        "0 1.5 0.5 0.2 0.2\n"  # 3: not normalised
        "0 0.5 0.5 0 0.2\n"  # 4: zero width
        "0 abc 0.5 0.2 0.2\n"  # 5: not a number
        "\n"  # 6: blank, nothing to say
        "1 1.005 0.5 0.2 0.2\n"  # 7: within the tolerance: x 181..221, clipped to 200
        "1 0.5 0.5 0.2 0.2 0.9\n"  # 8: six fields
        "0 0.25 0.5 0.1 0.2\n"  # 9: fine: x 40..60, y 40..60
    )
    return _yaml(root / "data.yaml", "names: {0: cat, 1: dog}\nnc: 2\ntrain: images\n")


def test_golden_boxes_and_negatives(tmp_path):
    dataset = YoloDataset(_hand_written(tmp_path), split="all")
    assert dataset.class_names == ["cat", "dog"]
    by_name = {t["file_name"]: t for t in map(dataset.target, range(len(dataset)))}
    assert sorted(by_name) == ["images/bad.png", "images/empty.png", "images/good.png",
                               "images/no_label.png"]  # fmt: skip
    good = by_name["images/good.png"]
    assert good["boxes"].tolist() == [[80, 30, 120, 70], [20, 20, 60, 60]]
    assert good["labels"].tolist() == [1, 2]
    for negative in ("images/no_label.png", "images/empty.png"):
        assert by_name[negative]["boxes"].shape == (0, 4)
    image, target = dataset[sorted(by_name).index("images/good.png")]
    assert image.shape == (3, 100, 200)
    check_sample(image, target)


def test_bad_lines_are_counted_and_logged_with_file_and_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        dataset = YoloDataset(_hand_written(tmp_path), split="all")
    assert dataset.report() == {
        "missing_annotations": 0,
        "unreadable_annotations": 0,
        "missing_images": 0,
        "unreadable_images": 0,
        "malformed_objects": 4,  # lines 1, 3, 5, 8
        "unknown_classes": 1,  # line 2
        "clipped_boxes": 1,  # line 7
        "zero_area_boxes": 1,  # line 4
        "size_mismatches": 0,
    }
    bad = str(tmp_path / "labels" / "bad.txt")
    messages = {
        int(r.getMessage().split(f"{bad}:")[1].split(":")[0]): r.getMessage()
        for r in caplog.records
        if f"{bad}:" in r.getMessage()
    }
    assert sorted(messages) == [1, 2, 3, 4, 5, 7, 8]
    assert "4 fields" in messages[1] and "6 fields" in messages[8]
    assert "class 5 not in 0..1" in messages[2]
    assert f"1.5 outside 0-1 by more than {TOLERANCE}" in messages[3]
    assert "no area" in messages[4] and "'0 abc 0.5 0.2 0.2'" in messages[5]
    assert "clipped" in messages[7]
    target = dataset.target(_file_names(dataset).index("images/bad.png"))
    assert target["boxes"].tolist() == [[181, 40, 200, 60], [40, 40, 60, 60]]
    assert target["labels"].tolist() == [2, 1]


def test_fixed_classes_leave_the_others_out(tmp_path):
    dataset = YoloDataset(_hand_written(tmp_path), split="all", classes=["dog"])
    good = dataset.target(_file_names(dataset).index("images/good.png"))
    assert good["boxes"].tolist() == [[20, 20, 60, 60]] and good["labels"].tolist() == [1]
    # good.txt's cat, bad.txt's class 5 (line 2) and its cats on lines 3, 4 and 9: the class
    # is read before the numbers are judged; lines 1 and 5 stay malformed.
    assert dataset.report()["unknown_classes"] == 1 + 1 + 3
    assert dataset.report()["malformed_objects"] == 3  # lines 1, 5, 8


def test_label_path_rule():
    path = os.path.join("d", "images", "x", "images", "a.b.jpg")
    assert label_path(path) == os.path.join("d", "images", "x", "labels", "a.b.txt")
    assert label_path(os.path.join("d", "a.png")) == os.path.join("d", "a.txt")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("names: [a, b]\nnc: 3\ntrain: images\n", "nc is 3 but names has 2"),
        ("names: {0: a, 2: b}\ntrain: images\n", "names ids must be 0..1"),
        ("names: [a, a]\ntrain: images\n", "distinct"),
        ("train: images\n", "names must be a list"),
        ("names: [a]\nval: images\n", "has no train entry"),
        ("names: [a]\ntrain: nowhere\n", "train entry 'nowhere' not found"),
        ("- just a list\n", "must hold a mapping"),
    ],
)
def test_bad_data_yaml_says_what(tmp_path, text, message):
    write_image(tmp_path / "images" / "a.png")
    data_yaml = _yaml(tmp_path / "data.yaml", text)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_dataset(f"yolo:{data_yaml}", split="train")


# The commands on a YOLO spec ------------------------------------------------------------------


def test_train_and_evaluate_on_a_yolo_spec(raccoon_yolo, tmp_path):
    # Six training and two validation photos of the raccoon copy, under a class name that is
    # not VOC's: the checkpoint must carry the yaml's name.
    for split, n in (("train", 6), ("val", 2)):
        for image in sorted((raccoon_yolo / "images" / split).iterdir())[:n]:
            _link(image.resolve(), tmp_path / "images" / split / image.name)
            label = tmp_path / "labels" / split / f"{image.stem}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text((raccoon_yolo / "labels" / split / f"{image.stem}.txt").read_text())
    data_yaml = _yaml(
        tmp_path / "data.yaml",
        "names: {0: Procyon lotor}\ntrain: images/train\nval: images/val\n",
    )
    out = tmp_path / "yolo.safetensors"
    args = ["--data", f"yolo:{data_yaml}", "--out", str(out), "--steps", "2", "--batch-size",
            "2", "--width", "0.125", "--batch-norm", "--workers", "0",
            "--eval-every", "0", "--calibration", "0"]  # fmt: skip
    assert train(args) == 0
    assert load_checkpoint(out).class_names == ["Procyon lotor"]
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "model.evaluate", "--weights", str(out), "--data",
         f"yolo:{data_yaml}", "--split", "val", "--json", str(report), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    scored = json.loads(report.read_text())
    assert scored["num_images"] == 2 and list(scored["per_class"]) == ["Procyon lotor"]
    assert torch.isfinite(torch.tensor(scored["map50"]))
