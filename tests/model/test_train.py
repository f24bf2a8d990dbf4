"""The training module end to end, on the CPU, with small networks and few steps."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from model import Detector, ssd300_vgg16
from model.data.synthetic import CLASS_NAMES, SyntheticShapes
from model.evaluation.evaluate import evaluate
from model.inference.autotune import candidates
from model.inference.int8 import (
    MAP50_GUARD,
    QuantizableSSD,
    int8_artifact_for,
    int8_artifact_path,
    read_int8_info,
)
from model.network.default_boxes import box_spec, make_default_boxes, preset_spec
from model.train import RECIPES, SCRATCH_DEFAULTS, _datasets, _parse_args, main, split_summary
from model.weights.checkpoint import load_checkpoint, load_training_state, save_checkpoint
from model.weights.sources import file_sha256

ROOT = Path(__file__).resolve().parents[2]
# No INT8 artifacts (their calibration and guard cost seconds a run): the tests of them
# give --calibration after TINY.
TINY = ["--width", "0.125", "--batch-norm", "--workers", "0", "--log-every", "1",
        "--calibration", "0"]  # fmt: skip


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]


def _shapes_folder(root: Path) -> Path:
    """Four 300x300 VOC images with one or two plain shapes each, drawn here."""
    from PIL import ImageDraw

    layouts = [
        [("circle", (40, 50, 140, 150))],
        [("square", (150, 60, 260, 170)), ("circle", (30, 180, 110, 260))],
        [("square", (90, 90, 210, 210))],
        [("circle", (170, 20, 280, 130)), ("square", (20, 170, 120, 270))],
    ]
    root.mkdir()
    for i, objects in enumerate(layouts):
        image = Image.new("RGB", (300, 300), (235, 230, 220))
        draw = ImageDraw.Draw(image)
        xml = []
        for name, box in objects:
            colour = (200, 40, 40) if name == "circle" else (40, 60, 200)
            (draw.ellipse if name == "circle" else draw.rectangle)(box, fill=colour)
            # VOC's 1-based inclusive pixel indices for 0-based edges (x0, y0, x1 + 1, y1 + 1)
            xml.append(
                f"<object><name>{name}</name><bndbox><xmin>{box[0] + 1}</xmin>"
                f"<ymin>{box[1] + 1}</ymin><xmax>{box[2] + 1}</xmax>"
                f"<ymax>{box[3] + 1}</ymax></bndbox></object>"
            )
        image.save(root / f"{i}.png")
        (root / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.png</filename>{''.join(xml)}</annotation>"
        )
    return root


def test_overfits_a_few_images(tmp_path):
    # Matching, loss, decoding and NMS must fit together for a network to learn four images.
    # 80 steps: a third more than the fewest that reach mAP 1.0 on them (docs/test-suite.md).
    data = f"voc:{_shapes_folder(tmp_path / 'shapes')}"
    out = tmp_path / "overfit.safetensors"
    code = main(
        [
            "--data",
            data,
            "--val-fraction",
            "0",
            "--out",
            str(out),
            "--steps",
            "80",
            "--batch-size",
            "4",
            "--lr",
            "0.01",
            "--clip-grad-norm",
            "5",
            "--warmup-steps",
            "10",
            "--no-augment",
            "--eval-every",
            "0",
            "--seed",
            "1",
            *TINY,
        ]
    )
    assert code == 0
    detector = Detector.load(out, device="cpu", precision="fp32")
    report, _ = evaluate(detector, data)
    assert report.num_images == 4
    assert report.map50 >= 0.9, report.per_class


@pytest.mark.parametrize(
    ("optimizer", "lr", "mosaic"),
    [("sgd", "0.01", "0"), ("adamw", "0.002", "0.5")],
    ids=["sgd", "adamw-mosaic"],
)
def test_resume_reproduces_an_uninterrupted_run(tmp_path, optimizer, lr, mosaic):
    # The optimiser's state (momentum; AdamW's moments and step counts) goes through the
    # state file, and mosaics are drawn from the run's seed: a resumed run takes the very
    # steps an uninterrupted one takes.
    common = [
        "--data",
        "synthetic:16",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--optimizer",
        optimizer,
        "--lr",
        lr,
        "--mosaic",
        mosaic,
        "--eval-every",
        "0",
        "--seed",
        "3",
        *TINY,
    ]
    straight = tmp_path / "straight.safetensors"
    assert main([*common, "--out", str(straight)]) == 0
    split = tmp_path / "split.safetensors"
    assert main([*common, "--out", str(split), "--stop-at", "2"]) == 0
    state = tmp_path / "split.state.safetensors"
    moments = [set(p) for p in load_training_state(state).optimizer["state"].values()]
    assert moments and all(
        p == ({"step", "exp_avg", "exp_avg_sq"} if optimizer == "adamw" else {"momentum_buffer"})
        for p in moments
    )
    assert main([*common, "--out", str(split), "--resume", str(state)]) == 0
    expected = {r["step"]: r["loss"] for r in _log(straight)}
    resumed = {r["step"]: r["loss"] for r in _log(split)}
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4)
    a = load_checkpoint(straight).network.state_dict()
    b = load_checkpoint(split).network.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_init_fine_tunes_from_a_checkpoint_of_another_tiling(tmp_path, caplog):
    # A "coco" checkpoint, then one step at learning rate 0 on the "fine" tiling: every weight
    # must come out as it went in, and the new checkpoint must carry the new priors. Seed 1,
    # as the trainer's own initialisation uses --seed 0.
    torch.manual_seed(1)
    source = tmp_path / "coco.safetensors"
    save_checkpoint(
        source, ssd300_vgg16(7, batch_norm=True, width=0.125, preset="coco"), CLASS_NAMES
    )
    out = tmp_path / "fine.safetensors"
    args = ["--data", "synthetic:4", "--out", str(out), "--steps", "1", "--batch-size", "2"]
    with caplog.at_level("INFO", logger="model.train"):
        code = main([*args, "--lr", "0", "--eval-every", "0", "--preset", "fine", *TINY,
                     "--init", str(source)])  # fmt: skip
    assert code == 0
    assert f"initialised 163 tensors from {source}; 0 start fresh" in caplog.text
    tuned, original = load_checkpoint(out).network, load_checkpoint(source).network
    assert tuned.architecture.preset == "fine"
    weights = dict(original.named_parameters())
    for name, weight in tuned.named_parameters():
        assert torch.equal(weight, weights[name]), name
    assert not torch.equal(tuned.default_boxes, original.default_boxes)


def test_fitted_boxes_are_fitted_to_the_training_boxes_and_kept_by_init(tmp_path, caplog):
    # The shapes folder's 6 boxes, 80 to 120 px: the fit starts from "voc" (all covered) and
    # moves towards them; evaluate and a --init run use the recorded boxes, fitting nothing.
    data = f"voc:{_shapes_folder(tmp_path / 'shapes')}"
    out, tuned = tmp_path / "fitted.safetensors", tmp_path / "tuned.safetensors"
    args = ["--val-fraction", "0", "--steps", "1", "--batch-size", "2", "--eval-every", "0"]
    with caplog.at_level("INFO", logger="model.train"):
        assert main(["--data", data, "--out", str(out), "--preset", "fitted", *args, *TINY]) == 0
    assert "default boxes fitted to 6 boxes at 300 px: 100.0% have one" in caplog.text
    network = load_checkpoint(out).network
    assert network.architecture.preset == "fitted"
    spec = box_spec(300, "fitted", network.architecture.box_sizes)
    assert spec != preset_spec(300, "voc")
    assert torch.equal(network.default_boxes, make_default_boxes(spec, network.feature_map_sizes))
    report, _ = evaluate(Detector.load(out, device="cpu", precision="fp32"), data)
    assert report.num_images == 4
    caplog.clear()
    with caplog.at_level("INFO", logger="model.train"):
        assert main(["--data", "synthetic:4", "--out", str(tuned), "--init", str(out), *args,
                     *TINY]) == 0  # fmt: skip
    assert "default boxes fitted" not in caplog.text
    assert load_checkpoint(tuned).network.architecture.box_sizes == spec.sizes()


def test_checkpoints_every_epoch_and_keeps_the_best(tmp_path):
    out = tmp_path / "m.safetensors"
    assert (
        main(
            [
                "--data",
                "synthetic:8",
                "--val-data",
                "synthetic:4",
                "--out",
                str(out),
                "--epochs",
                "3",
                "--eval-every",
                "2",
                "--batch-size",
                "4",
                *TINY,
            ]
        )
        == 0
    )
    evaluations = [r for r in _log(out) if "val_map50" in r]
    # Due at epoch 2; the last epoch (3) is evaluated too, so that its weights can be the best.
    assert [r["epoch"] for r in evaluations] == [2, 3]
    best = load_checkpoint(tmp_path / "m.best.safetensors")
    assert best.recipe["val_map50"] == max(r["val_map50"] for r in evaluations)
    final = load_checkpoint(out)
    assert final.recipe["step"] == 6 and final.recipe["data"] == "synthetic:8"
    assert final.class_names == SyntheticShapes.class_names


def test_divergence_stops_with_the_step_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "nan.safetensors"
    code = main(
        [
            "--data",
            "synthetic:8",
            "--out",
            str(out),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--lr",
            "1e12",
            "--warmup-steps",
            "1",
            "--clip-grad-norm",
            "0",  # the loss's own check (clipping, a random start's default, is the next test)
            "--eval-every",
            "0",
            *TINY,
        ]
    )
    assert code == 3
    assert "non-finite loss at step" in capsys.readouterr().err
    assert not out.exists()


def test_divergence_under_clipping_stops_before_the_weights_turn_nan(tmp_path, capsys):
    # Clipping scales an infinite gradient by 0, so the weights would turn NaN under a finite
    # loss; the step is refused at once, and nothing is written (synthetic:8 in batches of 4
    # ends an epoch, and saves, every 2 steps).
    out = tmp_path / "nan.safetensors"
    args = ["--data", "synthetic:8", "--out", str(out), "--steps", "4", "--batch-size", "4",
            "--lr", "1e12", "--warmup-steps", "1", "--eval-every", "0", *TINY]  # fmt: skip
    assert main([*args, "--clip-grad-norm", "5"]) == 3
    assert "non-finite gradient norm at step 2" in capsys.readouterr().err
    assert not out.exists()


def test_bad_samples_do_not_stop_training(tmp_path, caplog):
    data = tmp_path / "voc"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(data / f"img{i}.jpg")
        boxes = [(5, 5, 30, 30), (40, 10, 90, 70), (100, 60, 120, 80)]  # fine, partly, wholly out
        objects = "".join(
            f"<object><name>thing</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
            f"<xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
            for a, b, c, d in boxes
        )
        (data / f"img{i}.xml").write_text(
            f"<annotation><filename>img{i}.jpg</filename>{objects}</annotation>"
        )
    (data / "img3.jpg").write_bytes((data / "img3.jpg").read_bytes()[:200])  # truncated
    out = tmp_path / "voc.safetensors"
    with caplog.at_level("INFO"):
        code = main(
            [
                "--data",
                f"voc:{data}",
                "--val-fraction",
                "0",
                "--out",
                str(out),
                "--steps",
                "4",
                "--batch-size",
                "2",
                "--eval-every",
                "0",
                *TINY,
            ]
        )
    assert code == 0
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in _log(out)])))
    text = caplog.text
    # The truncated image is skipped; the other three keep their in-image boxes, clipped.
    assert "3 images, 6 boxes" in text
    assert "'unreadable_images': 1, 'clipped_boxes': 3, 'zero_area_boxes': 3" in text


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["--data", "synthetic:8", "--out", str(out), "--batch-size", "1", *TINY]) == 2
    assert "--batch-norm needs --batch-size of at least 2" in capsys.readouterr().err
    assert main(["--data", "synthetic:2", "--out", str(out), "--batch-size", "4", *TINY]) == 2
    assert "fewer than one batch" in capsys.readouterr().err
    junk = tmp_path / "junk.state.pt"
    junk.write_bytes(b"nope")
    assert (
        main(
            [
                "--data",
                "synthetic:8",
                "--out",
                str(out),
                "--batch-size",
                "4",
                "--resume",
                str(junk),
                *TINY,
            ]
        )
        == 2
    )
    assert "junk.state.pt" in capsys.readouterr().err
    missing = tmp_path / "missing.safetensors"
    args = ["--data", "synthetic:8", "--out", str(out), "--batch-size", "4", *TINY]
    assert main([*args, "--init", str(missing)]) == 2
    assert f"{missing}: no such checkpoint file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--ema", "1.5"])
    assert "--ema must be between 0 and 1, got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--mosaic", "-0.1"])
    assert "--mosaic must be between 0 and 1, got -0.1" in capsys.readouterr().err


def test_two_process_ddp_on_cpu(tmp_path):
    out = tmp_path / "ddp.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "model.train",
            "--calibration",
            "0",
            "--data",
            "synthetic:8",
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--eval-every",
            "0",
            "--device",
            "cpu",
            *TINY,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(out)
    assert checkpoint.recipe["world_size"] == 2
    assert [r["step"] for r in _log(out)] == [1, 2]


def test_recipe_sets_defaults_and_flags_given_still_win():
    base = ["--data", "synthetic:8", "--out", "x.safetensors"]
    # Re-pointed (issue #23): the paper's defaults now hold from trained weights; a plain run
    # starts from random weights and takes small-scratch's stable start (the next test).
    plain = _parse_args([*base, "--init", "torchvision:coco"])
    assert (plain.batch_norm, plain.width, plain.ema, plain.recipe) == (False, 1.0, None, None)
    for name, values in RECIPES.items():
        assert set(values) <= set(vars(plain)), "a recipe names only real flags"
        init = ["--init", "torchvision:coco"] if name == "finetune" else []  # it needs one
        chosen = _parse_args([*base, "--recipe", name, *init])
        assert {k: getattr(chosen, k) for k in values} == values
    args = _parse_args([*base, "--recipe", "small-scratch", "--lr", "0.03", "--width", "0.5"])
    assert (args.lr, args.width, args.batch_norm, args.eval_every) == (0.03, 0.5, True, 5)


def test_a_random_start_defaults_to_a_stable_one_and_trained_weights_to_the_papers():
    base = ["--data", "synthetic:8", "--out", "x.safetensors"]
    scratch = _parse_args(base)
    assert {k: getattr(scratch, k) for k in SCRATCH_DEFAULTS} == SCRATCH_DEFAULTS
    assert (scratch.batch_norm, scratch.clip_grad_norm) == (True, 5.0)
    # Only the flags stability rests on: the width, mosaics and average stay the paper's.
    assert (scratch.width, scratch.mosaic, scratch.ema, scratch.recipe) == (1.0, 0.0, None, None)
    paper = {"batch_norm": False, "batch_size": 32, "lr": 1e-3, "clip_grad_norm": None,
             "warmup_steps": 500}  # fmt: skip
    for start in (["--init", "torchvision:coco"], ["--backbone-weights", "imagenet"]):
        trained = _parse_args([*base, *start])
        assert {k: getattr(trained, k) for k in paper} == paper
    given = _parse_args([*base, "--no-batch-norm", "--clip-grad-norm", "0", "--lr", "0.002"])
    assert (given.batch_norm, given.clip_grad_norm, given.lr) == (False, 0.0, 0.002)
    assert given.warmup_steps == SCRATCH_DEFAULTS["warmup_steps"]


def test_the_default_command_trains_stably_on_real_photos(tmp_path, raccoon, caplog):
    # Issue #23: only --data and --out, plus what keeps the run small (30 steps, an eighth of
    # the width, batches of 2, no loader processes, no evaluation) and --log-every 1 to read
    # every loss. The paper's defaults, the ones before, went 34.6, 194, 195, 1681, 9.5e5
    # and inf here (step 6). Single batches of 2 photos are noisy, so thirds of the run are
    # compared by their means; seeds 0, 1 and 2 gave a last third 0.34, 0.47 and 0.37 times the
    # first (2026-12-05), a run that does not learn stays near 1. The run is seeded, so the
    # same numbers on any machine up to rounding; about 10 s on one thread.
    out = tmp_path / "default.safetensors"
    with caplog.at_level("INFO", logger="model.train"):
        code = main(["--data", f"voc:{raccoon}", "--out", str(out), "--steps", "30",
                     "--width", "0.125", "--batch-size", "2", "--workers", "0",
                     "--eval-every", "0", "--log-every", "1", "--calibration", "0"])  # fmt: skip
    assert code == 0
    losses = [r["loss"] for r in _log(out) if "loss" in r]
    assert len(losses) == 30 and all(map(math.isfinite, losses)), losses
    third = len(losses) // 3
    first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
    assert last < 0.6 * first, losses
    assert "defaults: small-scratch's stable start (batch-norm True, batch-size 2" in caplog.text
    assert "warm-up scaled down from 100 steps to 10: the run is 30 steps" in caplog.text


def _file_names(dataset) -> set[str]:
    return {dataset.target(i)["file_name"] for i in range(len(dataset))}


def test_val_data_of_another_dataset_leaves_all_of_data_for_training(tmp_path):
    folder = f"voc:{_shapes_folder(tmp_path / 'shapes')}"
    other = f"voc:{_shapes_folder(tmp_path / 'other')}"
    held = _datasets(_parse_args(["--data", folder, "--out", "x.safetensors"]))
    assert (len(held[0]), len(held[1].dataset)) == (3, 1)  # round(4 * 0.1) -> at least one
    given = _datasets(
        _parse_args(["--data", folder, "--val-data", other, "--out", "x.safetensors"])
    )
    assert (len(given[0]), len(given[1].dataset)) == (4, 1)
    assert split_summary(*given) == (
        f"split: training on 4 images of {folder} (train: nothing held out); "
        f"validating on 1 images of {other} (val: held out 0.1)"
    )
    # A part named on purpose is taken as named, and images in both parts are counted.
    overlap = _datasets(_parse_args(["--data", f"{folder}:all", "--out", "x.safetensors"]))
    assert split_summary(*overlap).endswith("; 1 images in both")
    # Re-pointed (issue #23): --val-data naming --data's own folder used to leave all four
    # images for training, the validation image among them; one dataset now gives its two
    # parts, as without --val-data.
    same = _datasets(
        _parse_args(["--data", folder, "--val-data", folder, "--out", "x.safetensors"])
    )
    assert [_file_names(d) for d in (same[0], same[1].dataset)] == [
        _file_names(d) for d in (held[0], held[1].dataset)
    ]


def test_split_names_train_on_the_holdouts_parts_and_the_log_says_so(
    tmp_path, raccoon_unsplit, caplog
):
    # Issue #23: on a VOC folder without split files, --data voc:PATH:train failed ("image set
    # 'train' not found"), and --data voc:PATH --val-data voc:PATH:val trained on all of
    # PATH, validation images included. Every form below means the holdout's two parts.
    spec, everything = f"voc:{raccoon_unsplit}", 200
    forms = [
        [spec],
        [f"{spec}:train", "--val-data", f"{spec}:val"],
        [spec, "--val-data", f"{spec}:val"],
        [f"{spec}:train"],
    ]
    for form in forms:
        train, validation = _datasets(_parse_args(["--data", *form, "--out", "x.safetensors"]))
        names = (_file_names(train), _file_names(validation.dataset))
        assert (len(names[0]), len(names[1])) == (180, 20), form
        assert names[0].isdisjoint(names[1]) and len(names[0] | names[1]) == everything, form
    out = tmp_path / "split.safetensors"
    with caplog.at_level("INFO", logger="model.train"):
        code = main(["--data", spec, "--val-data", f"{spec}:val", "--out", str(out),
                     "--steps", "2", "--batch-size", "2", *TINY])  # fmt: skip
    assert code == 0 and out.is_file()
    assert (
        f"split: training on 180 images of voc:{raccoon_unsplit} (train: the rest of a holdout "
        f"of 0.1); validating on 20 images of voc:{raccoon_unsplit} (val: held out 0.1)\n"
    ) in caplog.text


def test_int8_artifacts_beside_final_and_best_load_and_compete_in_auto(tmp_path, caplog):
    out = tmp_path / "m.safetensors"
    argv = ["--data", "synthetic:8", "--val-data", "synthetic:4", "--out", str(out),
            "--epochs", "2", "--batch-size", "4", *TINY, "--calibration", "4"]  # fmt: skip
    with caplog.at_level("INFO", logger="model.train"):
        assert main(argv) == 0
    best = tmp_path / "m.best.safetensors"
    for checkpoint in (out, best):
        artifact = int8_artifact_path(checkpoint)
        info = read_int8_info(artifact)
        assert info["checkpoint_sha256"] == file_sha256(checkpoint)
        assert info["info"]["calibration"] == {"data": "synthetic:8", "split": "train", "images": 4}
        guard = info["info"]["guard"]
        assert (guard["data"], guard["split"]) == ("synthetic:4", "val")
        assert f"INT8 of {checkpoint.name}: wrote {artifact}" in caplog.text
        detector = Detector.load(checkpoint, device="cpu", precision="int8")
        assert detector.precision == "int8" and isinstance(detector.network, QuantizableSSD)
        assert len(detector.predict([SyntheticShapes(1, split="test")[0][0]])) == 1
    # The guard scored fp32 on the very images and with the very scoring the trainer's
    # validation used, by its own path: the best checkpoint's recorded mAP comes out again.
    recorded = read_int8_info(int8_artifact_path(best))["info"]["guard"]["map50"]
    assert recorded["fp32"] == pytest.approx(load_checkpoint(best).recipe["val_map50"], abs=1e-9)
    assert recorded["fp32"] - recorded["int8"] <= MAP50_GUARD
    # auto on the CPU times fp32, bf16 where offered, and int8 from the artifact
    choice = Detector.load(best, device="cpu", precision="auto").precision_choice
    assert set(choice.images_per_s) == {*candidates(torch.device("cpu")), "int8"}


def test_calibration_0_writes_no_int8_artifact(tmp_path):
    out = tmp_path / "m.safetensors"
    argv = ["--data", "synthetic:8", "--out", str(out), "--steps", "1", "--batch-size", "4",
            "--eval-every", "0", *TINY, "--calibration", "0"]  # fmt: skip
    assert main(argv) == 0
    assert out.is_file() and int8_artifact_for(out) is None
