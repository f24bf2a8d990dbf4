"""python -m model.evaluate against the Python API, on a checkpoint trained on raccoon."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import Detector, ssd300_vgg16
from model.data import load_dataset
from model.evaluation.evaluate import detection_records, evaluate, main
from model.train import main as train
from model.weights.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def raccoon_checkpoint(raccoon: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raccoon") / "raccoon.safetensors"
    code = train(
        [
            "--data",
            f"voc:{raccoon}:train",
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--width",
            "0.125",
            "--batch-norm",
            "--workers",
            "0",
            "--eval-every",
            "0",
            "--calibration",
            "0",
        ]
    )
    assert code == 0
    return out


def test_cli_and_python_api_give_the_same_numbers(raccoon, raccoon_checkpoint, tmp_path):
    data = f"voc:{raccoon}:val"
    report_path, detections_path = tmp_path / "report.json", tmp_path / "detections.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "model.evaluate",
            "--weights",
            str(raccoon_checkpoint),
            "--data",
            data,
            "--json",
            str(report_path),
            "--save-detections",
            str(detections_path),
            "--plot",
            str(tmp_path / "pr.png"),
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "raccoon" in result.stdout and "COCO" in result.stdout

    # In the CLI's precision (--precision fp32 by default): Detector.load's "auto" picks bf16
    # where it measures faster (a 2-core AMD EPYC), and bf16 scores rank detections differently.
    detector = Detector.load(raccoon_checkpoint, device="cpu", precision="fp32")
    report, records = evaluate(detector, data)
    from_cli = json.loads(report_path.read_text())
    assert from_cli == json.loads(json.dumps(report.to_json()))
    assert from_cli["num_images"] == 40
    assert (tmp_path / "pr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(from_cli) >= {"map50", "map50_voc07", "coco", "per_class"}
    assert set(from_cli["per_class"]["raccoon"]) == {"ap", "ap07"}
    assert set(from_cli["coco"]) == {"ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"}

    saved = json.loads(detections_path.read_text())
    assert saved == json.loads(json.dumps(records))
    assert len(saved) > 0
    first = saved[0]
    assert set(first) == {"image_id", "file_name", "category_id", "label", "bbox", "score"}
    assert first["label"] == "raccoon" and first["category_id"] == 1
    assert first["file_name"].endswith(".jpg")
    assert all(r["score"] > 0.01 and r["bbox"][2] >= 0 and r["bbox"][3] >= 0 for r in saved)


def test_classes_that_do_not_match_are_an_error(raccoon, tmp_path):
    path = tmp_path / "shapes.safetensors"
    save_checkpoint(path, ssd300_vgg16(3, width=0.125), ["circle", "square"])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "model.evaluate",
            "--weights",
            str(path),
            "--data",
            f"voc:{raccoon}:val",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "do not match" in result.stderr and "raccoon" in result.stderr


def test_a_checkpoint_of_some_classes_scores_those_on_a_held_out_coco_part(coco128, tmp_path):
    # A "person" detector (as model.train --classes person makes) on coco128's held-out
    # quarter: --classes leaves the other 79 classes' objects out instead of refusing them.
    detector = Detector(ssd300_vgg16(2, width=0.125), ["person"], device="cpu", precision="fp32")
    data = f"coco:{coco128 / 'images'}:{coco128 / 'annotations' / 'instances.json'}"
    with pytest.raises(ValueError, match=r"--classes scores only some of them"):
        evaluate(detector, data, split="val", val_fraction=0.25)
    report, _ = evaluate(detector, data, split="val", val_fraction=0.25, classes=["person"])
    assert report.num_images == 32 and list(report.per_class) == ["person"]


def test_a_missing_checkpoint_is_named(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "model.evaluate",
            "--weights",
            str(tmp_path / "nope.safetensors"),
            "--data",
            "synthetic:2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "nope.safetensors" in result.stderr


def test_records_use_coco_category_ids_and_xywh_boxes():
    detections = [
        (torch.tensor([[10.0, 20.0, 50.0, 80.0]]), torch.tensor([0.9]), torch.tensor([2]))
    ]
    truths = [{"image_id": 139, "file_name": "000000000139.jpg"}]
    records = detection_records(detections, truths, ["person", "bicycle"], {1: 1, 2: 2})
    assert records == [
        {
            "image_id": 139,
            "file_name": "000000000139.jpg",
            "category_id": 2,
            "label": "bicycle",
            "bbox": [10.0, 20.0, 40.0, 60.0],
            "score": pytest.approx(0.9),
        }
    ]
    coco_ids = detection_records(detections, truths, ["person", "bicycle"], {1: 1, 2: 90})
    assert coco_ids[0]["category_id"] == 90
    assert not math.isnan(records[0]["score"])


def test_a_split_named_in_the_spec_is_the_split_flags_part(raccoon_unsplit, tmp_path):
    # Issue #23: on a VOC folder without split files, --data voc:PATH:val failed ("image set
    # 'val' not found") while --data voc:PATH --split val scored the holdout; both score it.
    weights = tmp_path / "random.safetensors"
    torch.manual_seed(0)
    save_checkpoint(weights, ssd300_vgg16(2, width=0.125, batch_norm=True).eval(), ["raccoon"])
    spec, outputs = f"voc:{raccoon_unsplit}", []
    for form in ([f"{spec}:val"], [spec, "--split", "val"]):
        report, detections = tmp_path / f"report{len(outputs)}.json", tmp_path / "d.json"
        argv = ["--weights", str(weights), "--data", *form, "--device", "cpu", "--json",
                str(report), "--save-detections", str(detections)]  # fmt: skip
        assert main(argv) == 0
        outputs.append((json.loads(report.read_text()), json.loads(detections.read_text())))
    assert outputs[0] == outputs[1]
    held_out = load_dataset(spec, split="val")
    assert outputs[0][0]["num_images"] == len(held_out) == 20
    ids = {held_out.target(i)["image_id"] for i in range(20)}
    assert outputs[0][1] and {d["image_id"] for d in outputs[0][1]} <= ids
