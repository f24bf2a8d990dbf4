"""``precision="auto"``: how candidates are timed and when one stops being timed (fake
clocks), and for training a timed training step per candidate, the network given back
untouched. (The inference side through ``Detector.load`` is in test_detector.py.)"""

from collections import Counter

import pytest
import torch

from model.inference import autotune
from model.inference.runtime import Runtime
from model.network.loss import MultiBoxLoss
from model.network.ssd import ssd300_vgg16
from tests.fake_clock import FakeClock

CPU = torch.device("cpu")


def test_training_precision_is_the_fastest_step_and_the_network_is_given_back_as_it_was():
    torch.manual_seed(0)
    network = Runtime(CPU, "fp32").place(ssd300_vgg16(2, batch_norm=True, width=0.125)).eval()
    before = {name: value.clone() for name, value in network.state_dict().items()}
    loss = MultiBoxLoss(network.default_boxes)

    choice = autotune.choose_training_precision(network, loss, CPU, batch_size=2)

    assert set(choice.images_per_s) == set(autotune.candidates(CPU)) == {"fp32", "bf16"}
    passing = {k: v for k, v in choice.images_per_s.items() if k not in choice.rejected}
    assert choice.precision == max(passing, key=passing.__getitem__)
    # bf16 keeps a BatchNorm network's loss terms within the guard's tolerance.
    assert choice.rejected == () and 0 < choice.error["bf16"] <= autotune.LOSS_TOLERANCE
    # Eight training-mode passes moved the BatchNorm statistics; they are restored, the
    # gradients cleared and the mode kept.
    after = network.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(p.grad is None for p in network.parameters()) and not network.training
    # (Which they would not be unless restored: one training-mode pass moves them.)
    network.train()(50 * torch.randn(2, 3, 300, 300))
    moved = network.state_dict()["stages.0.1.running_mean"]
    assert not torch.equal(moved, before["stages.0.1.running_mean"])


def test_loss_error_is_the_largest_relative_difference_and_fails_what_is_not_finite():
    reference = torch.tensor([10.0, 2.0, 8.0])
    # 0.5 / 10 and 0.4 / 8 (0.05 each), then 0.1 / 2 (0.05): the largest of the three terms.
    assert autotune.loss_error(reference, torch.tensor([10.5, 2.0, 7.6])) == pytest.approx(0.05)
    assert autotune.loss_error(reference, torch.tensor([10.0, 2.1, 8.0])) == pytest.approx(0.05)
    assert autotune.loss_error(reference, torch.tensor([10.2, 2.0, 8.0])) == pytest.approx(0.02)
    for broken in (float("inf"), float("nan")):
        error = autotune.loss_error(reference, torch.tensor([broken, 2.0, 8.0]))
        assert not error <= autotune.LOSS_TOLERANCE


def test_a_training_step_that_overflows_is_rejected_however_fast():
    clock = FakeClock()

    def step(name: str, batch: torch.Tensor) -> torch.Tensor:
        if name == "bf16":
            clock.advance(0.1)
            return torch.tensor([float("nan"), 1.0, float("nan")])
        clock.advance(0.2)  # fp32 is the slower one here
        return torch.tensor([3.0, 1.0, 2.0])

    choice = autotune.choose_precision(
        step,
        torch.zeros(1, 3, 8, 8),
        ["fp32", "bf16"],
        tolerance=autotune.LOSS_TOLERANCE,
        error=autotune.loss_error,
        timer=clock,
    )
    assert choice.images_per_s == pytest.approx({"fp32": 5.0, "bf16": 10.0})  # 0.2 s, 0.1 s
    assert choice.rejected == ("bf16",) and choice.precision == "fp32"
    assert "difference from fp32 bf16 nan; rejected by the accuracy guard: bf16" in choice.summary()
    assert choice.summary(rate="training images/s").startswith("precision auto: measured training")


def _timed(seconds: dict[str, float], wrong: tuple[str, ...] = ()):
    """A fake clock and a forward that advances it by each precision's ``seconds`` per pass,
    counting the passes; the ``wrong`` precisions turn every box into background."""
    clock, calls = FakeClock(), Counter()

    def forward(name: str, batch: torch.Tensor) -> torch.Tensor:
        calls[name] += 1
        clock.advance(seconds[name])
        scores = torch.zeros(len(batch), 4, 3)
        if name in wrong:
            scores[..., 0] = 10.0
        return scores

    return clock, calls, forward


def test_a_candidate_ten_times_slower_is_timed_once():
    clock, calls, forward = _timed({"fp32": 0.2, "bf16": 2.0})
    choice = autotune.choose_precision(
        forward, torch.zeros(1, 3, 8, 8), ["fp32", "bf16"], timer=clock
    )
    # One untimed pass each (the guard's data), one timed pass each: bf16 is then dropped,
    # and with one candidate left nothing remains to decide.
    assert calls == {"fp32": 2, "bf16": 2}
    assert choice.precision == "fp32" and choice.stopped == ("bf16",) and choice.rejected == ()
    assert choice.images_per_s == pytest.approx({"fp32": 5.0, "bf16": 0.5})  # 0.2 s, 2 s
    assert "timed once, being over 3x slower: bf16; chose fp32" in choice.summary()
    assert choice.seconds == pytest.approx(2 * (0.2 + 2.0))


def test_the_close_candidates_go_on_being_timed_when_a_slow_one_stops():
    clock, calls, forward = _timed({"fp32": 0.2, "int8": 0.1, "bf16": 2.0})
    choice = autotune.choose_precision(
        forward, torch.zeros(1, 3, 8, 8), ["fp32", "bf16", "int8"], timer=clock
    )
    # The budget (2 s of fake time) is spent after the first round: MIN_ROUNDS rounds.
    rounds = autotune.MIN_ROUNDS
    assert calls == {"fp32": 1 + rounds, "int8": 1 + rounds, "bf16": 2}
    assert choice.precision == "int8" and choice.stopped == ("bf16",)
    assert choice.images_per_s == pytest.approx({"fp32": 5.0, "bf16": 0.5, "int8": 10.0})


def test_a_candidate_within_the_factor_is_timed_every_round():
    assert autotune.SLOWER_BY == 3.0
    clock, calls, forward = _timed({"fp32": 0.2, "bf16": 0.59})  # 2.95x: not clearly slower
    choice = autotune.choose_precision(
        forward, torch.zeros(1, 3, 8, 8), ["fp32", "bf16"], timer=clock
    )
    assert calls == {"fp32": 1 + autotune.MIN_ROUNDS, "bf16": 1 + autotune.MIN_ROUNDS}
    assert choice.stopped == () and choice.precision == "fp32"


def test_only_a_candidate_that_passes_the_guard_sets_the_pace():
    # bf16 is 4x faster but wrong: fp32 is compared with no one faster that passes, so it is
    # timed every round and chosen.
    clock, calls, forward = _timed({"fp32": 0.2, "bf16": 0.05}, wrong=("bf16",))
    choice = autotune.choose_precision(
        forward, torch.zeros(1, 3, 8, 8), ["fp32", "bf16"], timer=clock
    )
    assert choice.stopped == () and choice.rejected == ("bf16",) and choice.precision == "fp32"
    assert calls["fp32"] == calls["bf16"] > 2
    assert choice.images_per_s == pytest.approx({"fp32": 5.0, "bf16": 20.0})
