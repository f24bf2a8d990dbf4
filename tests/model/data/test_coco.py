"""model.data.coco: coco128 from ../shared/datasets, and bad COCO JSON built in tmp_path."""

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from model.data import CocoDataset, load_dataset
from tests.model.data.support import check_sample, write_image


def _coco_spec(coco128: Path) -> str:
    return f"coco:{coco128 / 'images'}:{coco128 / 'annotations' / 'instances.json'}"


def test_coco128_classes_crowd_and_empty_images(coco128):
    dataset = load_dataset(_coco_spec(coco128), split="all")
    assert isinstance(dataset, CocoDataset)
    assert len(dataset.class_names) == 80  # all categories, though only 71 are used
    assert len(dataset) == 128  # including the two images without objects
    targets = [dataset.target(i) for i in range(len(dataset))]
    assert sum(len(t["boxes"]) for t in targets) == 939 - 10
    assert sum(len(t["crowd_boxes"]) for t in targets) == 10
    assert sum(len(t["boxes"]) == 0 and len(t["crowd_boxes"]) == 0 for t in targets) == 2
    assert set(dataset.report().values()) == {0}


def test_one_coco_file_splits_into_train_and_a_held_out_val(coco128):
    spec = _coco_spec(coco128)
    names = {
        split: [load_dataset(spec, split=split).records[i].file_name for i in range(n)]
        for split, n in (("train", 115), ("val", 13), ("test", 128))
    }
    for split in ("train", "val"):
        part = load_dataset(spec, split=split)
        assert len(part) == len(names[split])
        # The other part's annotations are not counted as bad data.
        assert set(part.report().values()) == {0}
    # round(128 * 0.1) = 13 held out; the two parts are disjoint and make up the file.
    assert not set(names["train"]) & set(names["val"])
    assert sorted(names["train"] + names["val"]) == sorted(names["test"])
    assert [r.file_name for r in load_dataset(spec, split="val").records] == names["val"]
    # A larger fraction holds out a superset (the same ordering as a VOC folder's holdout).
    wider = load_dataset(spec, split="val", val_fraction=0.25)
    assert len(wider) == 32 and set(names["val"]) < {r.file_name for r in wider.records}
    assert len(load_dataset(spec, split="train", val_fraction=0.0)) == 128


def test_coco128_crowd_labels_and_areas_match_the_json(coco128):
    dataset = load_dataset(_coco_spec(coco128), split="all")
    data = json.loads((coco128 / "annotations" / "instances.json").read_text())
    # (image id, category id, area) of each annotation, crowd and not, as the JSON has them.
    expected = {True: Counter(), False: Counter()}
    for ann in data["annotations"]:
        expected[bool(ann["iscrowd"])][ann["image_id"], ann["category_id"], ann["area"]] += 1
    found = {True: Counter(), False: Counter()}
    for i, record in enumerate(dataset.records):
        target = dataset.target(i)
        assert target["areas"].dtype == target["crowd_areas"].dtype == torch.float64
        for crowd, prefix in ((False, ""), (True, "crowd_")):
            labels, areas = target[f"{prefix}labels"], target[f"{prefix}areas"]
            assert labels.dtype == torch.int64 and labels.shape == areas.shape
            assert ((labels >= 1) & (labels <= 80)).all()
            for label, area in zip(labels.tolist(), areas.tolist(), strict=True):
                category = dataset.label_to_category_id[label]
                found[crowd][record.image_id, category, area] += 1
    # The 10 crowd regions each carry their own annotation's class and area; so do the rest.
    assert found[True] == expected[True] and sum(found[True].values()) == 10
    assert found[False] == expected[False] and sum(found[False].values()) == 929


def test_coco128_category_mapping_round_trip(coco128):
    dataset = load_dataset(_coco_spec(coco128), split="test")
    assert sorted(dataset.label_to_category_id) == list(range(1, 81))
    for label, category_id in dataset.label_to_category_id.items():
        assert dataset.category_id_to_label[category_id] == label
    # COCO ids skip 12, 26, 29, 30, ...: "dog" is id 18 but label 17; id 90 is the last label.
    assert dataset.class_names[dataset.category_id_to_label[18] - 1] == "dog"
    assert dataset.category_id_to_label[18] == 17
    assert dataset.label_to_category_id[80] == 90 and dataset.class_names[-1] == "toothbrush"
    # instances.json, annotation 1774: image 74, category 18, bbox [x, y, w, h] =
    # [61.87, 276.25, 296.42, 103.18] -> xyxy [61.87, 276.25, 358.29, 379.43].
    index = next(i for i, r in enumerate(dataset.records) if r.image_id == 74)
    image, target = dataset[index]
    check_sample(image, target)
    rows = (target["boxes"] - torch.tensor([61.87, 276.25, 358.29, 379.43])).abs().sum(1) < 1e-3
    assert rows.sum() == 1 and target["labels"][rows].item() == 17


def test_coco_bad_data_and_a_wrong_image_size(tmp_path):
    write_image(tmp_path / "a.jpg", size=(50, 40))
    write_image(tmp_path / "b.jpg", size=(50, 40))
    annotations = {
        "categories": [{"id": 7, "name": "cup"}, {"id": 3, "name": "car"}],
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},  # really 50 x 40
            {"id": 2, "file_name": "b.jpg", "width": 50, "height": 40},
            {"id": 3, "file_name": "gone.jpg", "width": 50, "height": 40},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [40, 30, 30, 30], "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [45, 0, 10, 10], "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 5, 0, 10], "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [0, 0, 20, 20], "iscrowd": 1},
            {"id": 5, "image_id": 2, "category_id": 3, "bbox": "oops", "iscrowd": 0},
            {"id": 6, "image_id": 3, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 0},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    dataset = load_dataset(f"coco:{tmp_path}:{tmp_path / 'ann.json'}", split="all")
    assert dataset.class_names == ["car", "cup"]  # category-id order: 3, then 7
    assert dataset.category_id_to_label == {3: 1, 7: 2}
    _, target = dataset[0]
    # Indexed against the JSON's 100 x 80, then clipped to the real 50 x 40 when loaded.
    assert target["boxes"].tolist() == [[40, 30, 50, 40]] and target["labels"].tolist() == [2]
    # Keys that go per object stay aligned with the boxes clipped away on loading.
    assert target["areas"].tolist() == [900.0]  # no "area" in this JSON: the indexed box's
    _, target = dataset[1]
    assert target["boxes"].tolist() == [[45, 0, 50, 10]]
    assert target["areas"].tolist() == [50.0]  # the clipped box's 5 x 10
    assert target["crowd_boxes"].tolist() == [[0, 0, 20, 20]]
    assert target["crowd_labels"].tolist() == [1] and target["crowd_areas"].tolist() == [400.0]
    report = dataset.report()
    assert (report["size_mismatches"], report["missing_images"]) == (1, 1)
    assert (report["clipped_boxes"], report["zero_area_boxes"]) == (1, 1)
    assert report["malformed_objects"] == 1
    dataset[0]
    assert dataset.report()["size_mismatches"] == 1  # counted once per image, not per load


def test_roboflow_folder_drops_its_placeholder_category(coco128, tmp_path, caplog):
    # Roboflow's COCO export: one folder per split, _annotations.coco.json beside the images,
    # and category 0 named after the dataset, the supercategory of every real class, unused.
    data = json.loads((coco128 / "annotations" / "instances.json").read_text())
    data["categories"] = [{"id": 0, "name": "coco128-things", "supercategory": "none"}] + [
        {**c, "supercategory": "coco128-things"} for c in data["categories"]
    ]
    folder = tmp_path / "train"
    folder.mkdir()
    for image in data["images"]:
        (folder / image["file_name"]).symlink_to(coco128 / "images" / image["file_name"])
    (folder / "_annotations.coco.json").write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="model.data.coco"):
        dataset = load_dataset(f"coco:{folder}", split="all")
    original = load_dataset(_coco_spec(coco128), split="all")
    # The 9 real categories no annotation uses stay: only the placeholder goes.
    assert dataset.class_names == original.class_names and len(dataset.class_names) == 80
    assert dataset.category_id_to_label == original.category_id_to_label
    assert sum(len(dataset.target(i)["boxes"]) for i in range(len(dataset))) == 929
    dropped = [r.getMessage() for r in caplog.records if "placeholder" in r.getMessage()]
    assert len(dropped) == 1 and "0 'coco128-things'" in dropped[0]
    # Its split folders hold the file; a folder without one is named.
    with pytest.raises(FileNotFoundError, match=r"_annotations\.coco\.json"):
        load_dataset(f"coco:{coco128 / 'images'}", split="all")


def test_placeholder_kept_when_used_or_fixed_by_classes(tmp_path):
    write_image(tmp_path / "a.jpg", size=(50, 40))
    categories = [
        {"id": 0, "name": "pets", "supercategory": "none"},
        {"id": 1, "name": "cat", "supercategory": "pets"},
        {"id": 2, "name": "dog", "supercategory": "pets"},
    ]
    images = [{"id": 1, "file_name": "a.jpg", "width": 50, "height": 40}]
    box = {"image_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0}
    for used in ([2], [0, 2]):
        annotations = [{"id": k, "category_id": c, **box} for k, c in enumerate(used)]
        (tmp_path / "_annotations.coco.json").write_text(
            json.dumps({"categories": categories, "images": images, "annotations": annotations})
        )
        dataset = load_dataset(f"coco:{tmp_path}", split="all")
        # Unused "cat" is a real class (nobody's supercategory); "pets" only while unused.
        expected = ["cat", "dog"] if used == [2] else ["pets", "cat", "dog"]
        assert dataset.class_names == expected
    fixed = load_dataset(f"coco:{tmp_path}", split="all", classes=["pets", "dog"])
    assert fixed.class_names == ["pets", "dog"]
