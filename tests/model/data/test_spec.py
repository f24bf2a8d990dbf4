"""model.data.load_dataset: the --data spec forms and their errors."""

import re

import pytest
import torch

from model.data import SPEC_FORMS, SyntheticShapes, load_dataset


def test_synthetic_spec_lengths_and_streams():
    train, val = load_dataset("synthetic", split="train"), load_dataset("synthetic", split="val")
    assert isinstance(train, SyntheticShapes) and (len(train), len(val)) == (10_000, 500)
    test = load_dataset("synthetic:20", split="test")
    assert len(test) == 20 and (test.split, val.split) == ("test", "val")
    assert test.class_names == ["circle", "square", "triangle", "star", "cross", "bar"]
    _, target = test[0]
    assert target["crowd_labels"].dtype == torch.int64 and target["crowd_labels"].shape == (0,)


@pytest.mark.parametrize(
    "spec", ["", "voc", "coco", "synthetic:-3", "yolo", "yolo:nowhere.yaml:training", "x:y"]
)
def test_bad_specs_name_themselves(spec):
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        load_dataset(spec, split="train")


def test_bad_spec_errors_list_every_form():
    with pytest.raises(ValueError, match=re.escape(SPEC_FORMS)):
        load_dataset("yolo", split="train")
    assert "yolo:DATA.YAML[:SPLIT]" in SPEC_FORMS and "coco:FOLDER" in SPEC_FORMS


def test_bad_split_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="'training'"):
        load_dataset("synthetic", split="training")
    for kind in ("voc", "yolo", "coco"):
        with pytest.raises(FileNotFoundError, match="nowhere"):
            load_dataset(f"{kind}:{tmp_path / 'nowhere'}", split="train")
