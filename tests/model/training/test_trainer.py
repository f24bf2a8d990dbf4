"""The training loop built from typed parts, without the command line."""

import json
import re
from pathlib import Path

import pytest
import torch

from model import ssd300_vgg16
from model.data import load_dataset
from model.data.loader import AugmentedDataset
from model.data.transforms import EvalTransform
from model.network.loss import MultiBoxLoss
from model.training.distributed import Processes
from model.training.trainer import Optimisation, StepPlan, Trainer, TrainingData
from model.weights.checkpoint import RunFiles, load_checkpoint, load_training_state


def _trainer(
    out: Path, *, total: int, stop_at: int | None = None, ema: float | None = None
) -> Trainer:
    torch.manual_seed(0)
    processes = Processes.start("cpu", "fp32")
    train_set = load_dataset("synthetic:8", split="train")
    network = ssd300_vgg16(len(train_set.class_names) + 1, batch_norm=True, width=0.125)
    processes.runtime.place(network)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
    halving = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5**s)
    return Trainer(
        network,
        loss=MultiBoxLoss(network.default_boxes),
        optimisation=Optimisation(
            optimizer, halving, processes.runtime.grad_scaler(), ema_decay=ema
        ),
        data=TrainingData(
            AugmentedDataset(train_set, EvalTransform(300), seed=0), batch_size=2, seed=0, workers=0
        ),
        plan=StepPlan(total=total, per_epoch=4, log_every=1, eval_every=0, stop_at=stop_at),
        files=RunFiles(out),
        class_names=list(train_set.class_names),
        processes=processes,
    )


def test_runs_the_plan_and_writes_its_files(tmp_path):
    out = tmp_path / "run.safetensors"
    trainer = _trainer(out, total=6, stop_at=5)
    assert trainer.run() == 5
    log = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in log] == [1, 1, 1, 1, 2]
    # The schedule steps once per optimiser step: the logged rate halves every step.
    assert [r["lr"] for r in log] == pytest.approx([0.01 * 0.5**s for s in range(1, 6)])
    assert load_checkpoint(out).recipe["step"] == 4  # written at the end of epoch 1
    assert trainer.files.curves == out.with_suffix(".png") and out.with_suffix(".png").is_file()
    state = load_training_state(trainer.files.state)
    assert state.step == 5  # --stop-at mid-epoch saves the state where it stopped

    resumed = _trainer(out, total=6)
    resumed.restore(state, trainer.files.state)
    assert resumed.run() == 6
    assert resumed.optimisation.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**6)


def test_restore_refuses_another_run(tmp_path):
    trainer = _trainer(tmp_path / "a.safetensors", total=1)
    state = trainer.state()
    state.class_names = ["cat"]
    with pytest.raises(ValueError, match=re.escape("a.state.safetensors: trained on classes")):
        trainer.restore(state, trainer.files.state)
    state = trainer.state()
    state.architecture = {**state.architecture, "width": 1.0}
    with pytest.raises(ValueError, match="architecture"):
        trainer.restore(state, trainer.files.state)


def test_evaluate_needs_validation_data(tmp_path):
    with pytest.raises(RuntimeError, match="no validation data"):
        _trainer(tmp_path / "b.safetensors", total=1).evaluate()


def _weights(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Float parameters and buffers (BatchNorm statistics included), copied."""
    return {k: v.detach().clone() for k, v in network.state_dict().items() if v.is_floating_point()}


def test_moving_average_follows_its_formula_and_is_what_is_saved(tmp_path):
    out = tmp_path / "ema.safetensors"
    trainer = _trainer(out, total=4, ema=0.75)
    batches = trainer.data.batches(0, trainer.processes)
    expected = None
    for _ in range(3):
        trainer.train_step(*next(batches))
        now = _weights(trainer.network)
        # The first update copies the weights; then average = 0.75 average + 0.25 weights.
        expected = now if expected is None else {k: 0.75 * expected[k] + 0.25 * now[k] for k in now}
    averaged = _weights(trainer.result)
    assert averaged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(averaged[key], expected[key])
    assert not torch.equal(averaged["stages.0.0.weight"], now["stages.0.0.weight"])
    assert trainer.result is not trainer.network

    # The checkpoint an epoch's end writes holds the average, not the trained weights; the
    # training state holds both, and a restored run carries the average on.
    trainer = _trainer(out, total=4, ema=0.75)
    trainer.run()
    saved = _weights(load_checkpoint(out).network)
    for key, value in _weights(trainer.result).items():
        torch.testing.assert_close(saved[key], value)
    state = load_training_state(trainer.files.state)
    resumed = _trainer(out, total=4, ema=0.75)
    resumed.restore(state, trainer.files.state)
    for key, value in _weights(trainer.result).items():
        torch.testing.assert_close(_weights(resumed.result)[key], value)
    for key, value in _weights(trainer.network).items():
        torch.testing.assert_close(_weights(resumed.network)[key], value)


def test_a_state_without_an_average_cannot_resume_with_one(tmp_path):
    plain = _trainer(tmp_path / "plain.safetensors", total=1)
    with pytest.raises(ValueError, match=r"plain.state.safetensors: was trained without --ema"):
        _trainer(tmp_path / "plain.safetensors", total=1, ema=0.9).restore(
            plain.state(), plain.files.state
        )
