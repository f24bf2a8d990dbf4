"""model.data.voc: the raccoon set from ../shared/datasets, and VOC layouts built in tmp_path."""

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.data import load_dataset
from model.data.base import holdout
from model.data.voc import VocDataset
from tests.model.data.support import check_sample, count_boxes, write_image

# Real data: raccoon ------------------------------------------------------------------------


def test_raccoon_published_split_and_box_count(raccoon):
    root = raccoon
    train = load_dataset(f"voc:{root}:train", split="train")
    val = load_dataset(f"voc:{root}:val", split="val")
    everything = load_dataset(f"voc:{root}", split="all")
    assert (len(train), len(val), len(everything)) == (160, 40, 200)
    assert count_boxes(train) + count_boxes(val) == count_boxes(everything) == 217
    assert {t["file_name"] for t in map(train.target, range(160))}.isdisjoint(
        val.target(i)["file_name"] for i in range(40)
    )
    # Without :SPLIT, "train" uses ImageSets/Main/train.txt because it exists.
    assert len(load_dataset(f"voc:{root}", split="train")) == 160
    assert train.class_names == ["raccoon"]
    assert set(train.report().values()) == {0}


def test_raccoon_greyscale_images_come_out_rgb(raccoon):
    dataset = load_dataset(f"voc:{raccoon}:train", split="train")
    names = [dataset.target(i)["file_name"] for i in range(len(dataset))]
    # These three are stored as 8-bit greyscale (PIL mode "L"), all in the train split.
    for stem in ("raccoon-150", "raccoon-152", "raccoon-161"):
        index = names.index(f"JPEGImages/{stem}.jpg")
        assert Image.open(dataset.records[index].path).mode == "L"
        image, target = dataset[index]
        check_sample(image, target)
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_raccoon_coordinates_against_the_xml_by_hand(raccoon):
    dataset = load_dataset(f"voc:{raccoon}:train", split="train")
    names = [dataset.target(i)["file_name"] for i in range(len(dataset))]
    image, target = dataset[names.index("JPEGImages/raccoon-119.jpg")]
    # Annotations/raccoon-119.xml: (xmin, ymin, xmax, ymax) = (16, 62, 362, 353),
    # (211, 359, 277, 402), (198, 392, 280, 473), 1-based inclusive -> minus one on the mins.
    expected = [[15, 61, 362, 353], [210, 358, 277, 402], [197, 391, 280, 473]]
    assert target["boxes"].tolist() == expected
    assert target["labels"].tolist() == [1, 1, 1]
    assert target["difficult"].tolist() == [False] * 3
    check_sample(image, target)


# VOC layouts built in tmp_path --------------------------------------------------------------


def _names(dataset) -> list[str]:
    return [dataset.target(i)["file_name"] for i in range(len(dataset))]


def test_split_names_are_the_holdouts_parts_without_split_files(raccoon_unsplit):
    # Issue #23: voc:PATH:train failed ("image set 'train' not found") where evaluate's
    # --split train worked; a part's name now means the same in the spec and in split=.
    spec = f"voc:{raccoon_unsplit}"
    everything = _names(load_dataset(spec, split="all"))
    parts = {}
    for part in ("train", "val"):
        parts[part] = _names(load_dataset(spec, split=part))
        # The spec's part wins over split=, as for yolo:DATA_YAML:SPLIT.
        for asked in ("all", "train", "val"):
            assert _names(load_dataset(f"{spec}:{part}", split=asked)) == parts[part]
    assert (len(parts["train"]), len(parts["val"]), len(everything)) == (180, 20, 200)
    assert set(parts["train"]).isdisjoint(parts["val"])
    assert sorted(parts["train"] + parts["val"]) == everything
    assert _names(load_dataset(f"{spec}:test", split="train")) == everything
    assert _names(load_dataset(f"{spec}:all", split="val")) == everything
    # The dataset's name says where its images come from.
    assert load_dataset(f"{spec}:val", split="all").name.endswith("(val: held out 0.1)")


def test_split_files_win_over_the_holdout(tmp_path):
    for i in range(6):
        _xml(tmp_path / "Annotations" / f"{i:06d}.xml", f"{i:06d}.jpg", [("bird", 2, 2, 9, 9)])
        write_image(tmp_path / "JPEGImages" / f"{i:06d}.jpg")
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("000000\n000002\n000004\n")
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("000005\n")
    spec = f"voc:{tmp_path}"
    listed = [f"JPEGImages/{i:06d}.jpg" for i in (0, 2, 4)]
    assert _names(load_dataset(f"{spec}:train", split="val")) == listed
    assert _names(load_dataset(spec, split="train")) == listed
    # test.txt is used for "test" too (it used to be ignored: "test" took every image).
    assert _names(load_dataset(spec, split="test")) == ["JPEGImages/000005.jpg"]
    assert _names(load_dataset(f"{spec}:test", split="all")) == ["JPEGImages/000005.jpg"]
    assert load_dataset(spec, split="train").name.endswith("(ImageSets/Main/train.txt)")
    # Without val.txt, "val" is still the holdout of every image (and "all" every image);
    # it may share images with train.txt (here 000002), as before.
    held_out = sorted(holdout([f"{i:06d}" for i in range(6)], 0.2))
    assert _names(load_dataset(spec, split="val", val_fraction=0.2)) == [
        f"JPEGImages/{stem}.jpg" for stem in held_out
    ]
    assert len(load_dataset(f"{spec}:all", split="train")) == 6


def _xml(path: Path, filename: str | None, objects: list[tuple], size=(64, 48)) -> None:
    """objects: (name, xmin, ymin, xmax, ymax[, difficult]) in VOC's 1-based pixel indices."""
    parts = [f"<filename>{filename}</filename>" if filename is not None else ""]
    parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height></size>")
    for name, x0, y0, x1, y1, *difficult in objects:
        flag = f"<difficult>{int(difficult[0])}</difficult>" if difficult else ""
        box = f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
        parts.append(f"<object><name>{name}</name>{flag}<bndbox>{box}</bndbox></object>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation>{''.join(parts)}</annotation>")


def test_flat_folder_finds_images_by_filename_and_by_stem(tmp_path):
    _xml(tmp_path / "a.xml", "photo_of_a.png", [("dog", 1, 1, 10, 20)])
    write_image(tmp_path / "photo_of_a.png")
    _xml(tmp_path / "b.xml", None, [("cat", 5, 6, 64, 48, 1)])  # no filename tag: by stem
    write_image(tmp_path / "b.jpg", mode="L")
    _xml(tmp_path / "c.xml", "elsewhere/c.jpeg", [])  # tag with a path: by its name
    write_image(tmp_path / "c.jpeg")
    dataset = load_dataset(f"voc:{tmp_path}", split="test")
    assert dataset.class_names == ["cat", "dog"]
    by_name = {dataset.target(i)["file_name"]: dataset[i] for i in range(len(dataset))}
    assert sorted(by_name) == ["b.jpg", "c.jpeg", "photo_of_a.png"]
    image, target = by_name["photo_of_a.png"]
    assert target["boxes"].tolist() == [[0, 0, 10, 20]] and target["labels"].tolist() == [2]
    image, target = by_name["b.jpg"]
    assert image.shape == (3, 48, 64)
    assert target["boxes"].tolist() == [[4, 5, 64, 48]]  # the whole image's far edges
    assert target["difficult"].tolist() == [True]
    assert by_name["c.jpeg"][1]["boxes"].shape == (0, 4)
    for _, target in by_name.values():  # VOC has no crowd regions, nor COCO's areas
        assert target["crowd_labels"].dtype == torch.int64
        assert target["crowd_labels"].shape == (0,) and target["crowd_boxes"].shape == (0, 4)
        assert "areas" not in target and "crowd_areas" not in target
    assert set(dataset.report().values()) == {0}


def _two_folder_dataset(root: Path, n: int) -> None:
    for i in range(n):
        _xml(root / "labels" / f"img{i}.xml", f"img{i}.jpg", [("thing", 1, 1, 8, 8, i == 0)])
        write_image(root / "pictures" / f"img{i}.jpg")


def test_two_subfolder_layout_holds_out_a_deterministic_split(tmp_path):
    _two_folder_dataset(tmp_path, 10)
    spec = f"voc:{tmp_path}"
    val = load_dataset(spec, split="val", val_fraction=0.2)
    train = load_dataset(spec, split="train", val_fraction=0.2)
    val_names = {val.target(i)["file_name"] for i in range(len(val))}
    train_names = {train.target(i)["file_name"] for i in range(len(train))}
    # The stems' order under model.data.seeding, pinned: it must not change between runs.
    assert val_names == {"pictures/img2.jpg", "pictures/img8.jpg"}
    assert len(train_names) == 8 and train_names.isdisjoint(val_names)
    assert len(load_dataset(spec, split="all")) == len(load_dataset(spec, split="test")) == 10
    again = load_dataset(spec, split="val", val_fraction=0.2)
    assert [again.target(i)["file_name"] for i in range(2)] == sorted(val_names)
    # A larger fraction holds out a superset, so growing it never moves an image to train.
    assert holdout([f"img{i}" for i in range(10)], 0.3) >= {"img2", "img8"}


def test_difficult_objects_are_flagged_and_optionally_left_out_of_training(tmp_path):
    _two_folder_dataset(tmp_path, 10)
    spec = f"voc:{tmp_path}"
    # img0 carries the only difficult object and falls in train (val is img2, img8).
    train = load_dataset(spec, split="train", val_fraction=0.2, use_difficult=True)
    assert sum(t["difficult"].sum().item() for t in map(train.target, range(8))) == 1
    train = load_dataset(spec, split="train", val_fraction=0.2, use_difficult=False)
    assert count_boxes(train) == 7
    evaluation = load_dataset(spec, split="test", use_difficult=False)
    assert count_boxes(evaluation) == 10


def test_voc_folder_with_image_sets(tmp_path):
    for i in range(4):
        _xml(tmp_path / "Annotations" / f"{i:06d}.xml", f"{i:06d}.jpg", [("bird", 2, 2, 9, 9)])
        write_image(tmp_path / "JPEGImages" / f"{i:06d}.jpg")
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000003\n")
    dataset = load_dataset(f"voc:{tmp_path}:trainval", split="train")
    assert [dataset.target(i)["file_name"] for i in range(2)] == [
        "JPEGImages/000001.jpg",
        "JPEGImages/000003.jpg",
    ]
    with pytest.raises(FileNotFoundError, match="nosuchset"):
        load_dataset(f"voc:{tmp_path}:nosuchset", split="train")


# Bad data -----------------------------------------------------------------------------------


def _truncated_jpeg(path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8, generator=generator)
    Image.fromarray(noise.numpy()).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, scan data cut off


def test_bad_voc_data_is_repaired_or_skipped_and_counted(tmp_path, caplog):
    _xml(tmp_path / "0_good.xml", "0_good.jpg", [
        ("dog", -20, 10, 30, 400),  # outside the image: clipped to (0, 9, 30, 48)
        ("dog", 10, 10, 9, 20),  # xmax < xmin: zero area once converted, dropped
        ("dog", 70, 10, 90, 20),  # entirely right of the 64 px image: zero area, dropped
        ("zebra", 1, 1, 5, 5),  # not in the fixed classes
        ("dog", "nan", 1, 5, 5),  # not a number
        ("dog", 3, 4, 13, 14),  # fine
    ])  # fmt: skip
    write_image(tmp_path / "0_good.jpg")
    _xml(tmp_path / "1_truncated.xml", "1_truncated.jpg", [("dog", 1, 1, 5, 5)])
    _truncated_jpeg(tmp_path / "1_truncated.jpg")
    _xml(tmp_path / "2_garbage.xml", "2_garbage.jpg", [("dog", 1, 1, 5, 5)])
    (tmp_path / "2_garbage.jpg").write_bytes(b"not an image at all")
    _xml(tmp_path / "3_missing.xml", "3_missing.jpg", [("dog", 1, 1, 5, 5)])
    (tmp_path / "4_broken.xml").write_text("<annotation><object>")
    _xml(tmp_path / "5_good.xml", "5_good.jpg", [("cat", 2, 2, 6, 6)])
    write_image(tmp_path / "5_good.jpg")

    with caplog.at_level(logging.INFO, logger="model.data.base"):
        dataset = VocDataset(tmp_path, split="all", classes=["cat", "dog"])
    summaries = [r for r in caplog.records if "bad data" in r.getMessage()]
    assert len(summaries) == 1 and summaries[0].levelno == logging.WARNING
    assert dataset.report() == {
        "missing_annotations": 0,
        "unreadable_annotations": 1,
        "missing_images": 1,
        "unreadable_images": 1,  # the garbage file, found when indexing
        "malformed_objects": 1,
        "unknown_classes": 1,
        "clipped_boxes": 1,
        "zero_area_boxes": 2,
        "size_mismatches": 0,
    }
    assert len(dataset) == 3  # good, truncated (not yet known to be bad), good
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[0, 9, 30, 48], [2, 3, 13, 14]]
    assert target["labels"].tolist() == [2, 2]
    # The truncated JPEG fails on decoding: counted once, the next good sample comes instead.
    image, target = dataset[1]
    assert target["file_name"] == "5_good.jpg" and target["labels"].tolist() == [1]
    check_sample(image, target)
    assert dataset[1][1]["file_name"] == "5_good.jpg"
    assert dataset.report()["unreadable_images"] == 2
    for i in range(len(dataset)):
        check_sample(*dataset[i])
