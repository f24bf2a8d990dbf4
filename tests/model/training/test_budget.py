"""The time budget: golden plans by hand, the keeper on a fake clock, and --minutes end to end
(with --recipe small-scratch, the command the README leads with)."""

import json
import math

import pytest

from model.train import main
from model.training.budget import (
    CALIBRATION_STEPS,
    OVERRUN_SLACK,
    WRITE_MARGIN_S,
    WRITES_ESTIMATE_S,
    BudgetKeeper,
    TimeBudget,
)
from model.weights.checkpoint import load_checkpoint, load_training_state
from tests.fake_clock import FakeClock


def test_steps_that_fit_golden():
    # 100 s deadline, at 10 s after step 10: 100 - 10 - 4 (final epoch end) - 2 (margin)
    # = 84 s; each step 0.5 s plus an 8th of a 4 s epoch end = 1 s: 84 more steps.
    assert WRITE_MARGIN_S == 2.0
    budget = TimeBudget(deadline=100.0, step_s=0.5, epoch_end_s=4.0)
    assert budget.steps_that_fit(10, 10.0, ends_per_step=0.125, end_estimate_s=99.0) == 94
    # Until an epoch end is timed, the estimate stands in for it.
    budget.epoch_end_s = None
    assert budget.steps_that_fit(10, 10.0, ends_per_step=0.125, end_estimate_s=4.0) == 94
    # Past the point of no return, the run ends where it is, never earlier.
    assert budget.steps_that_fit(10, 99.0, ends_per_step=0.0, end_estimate_s=0.0) == 10
    with pytest.raises(ValueError, match="measured step time"):
        TimeBudget(deadline=1.0).steps_that_fit(0, 0.0, ends_per_step=0, end_estimate_s=0)


def test_out_of_time_keeps_room_for_the_final_epoch_end():
    budget = TimeBudget(deadline=100.0, step_s=1.0, epoch_end_s=10.0)
    assert not budget.out_of_time(86.9)
    assert budget.out_of_time(87.0)  # 87 + 1 (one more step) + 10 + 2


def test_keeper_plans_after_calibration_then_again_after_every_timed_epoch_end():
    clock = FakeClock(tick=0.5)  # every step takes 0.5 s
    budget = TimeBudget(deadline=200.0, clock=clock)
    keeper = BudgetKeeper(budget, ends_per_step=0.0, eval_images=0, batch_size=4, agree=lambda v: v)
    provisional = 10**6
    totals = [keeper.after_step(step, provisional) for step in range(1, CALIBRATION_STEPS + 1)]
    assert totals[:-1] == [None] * (CALIBRATION_STEPS - 1)
    assert budget.step_s == pytest.approx(0.5)
    # At step 10 the clock reads 5.5 s; no evaluation, so an epoch end is estimated at the
    # writes' 1 s: (200 - 5.5 - 1 - 2) / 0.5 = 383 more steps.
    assert WRITES_ESTIMATE_S == 1.0
    assert totals[-1] == CALIBRATION_STEPS + 383
    # Planned once; re-planned by an evaluation, or when the plan stops fitting (below).
    assert keeper.after_step(11, totals[-1]) is None
    total = keeper.after_epoch_end(11, seconds=20.0)
    # clock 6.5 s: (200 - 6.5 - 20 - 2) / 0.5 = 343 more steps
    assert budget.epoch_end_s == 20.0 and total == 11 + 343
    # Each timed end re-plans with the latest figures. The trainer restarts the clock after
    # a timed end (reads 7.0 s); step 12 ends at 7.5 s (0.5 s); the plan reads 8.0 s and an
    # end of 10 s leaves (200 - 8 - 10 - 2) / 0.5 = 360 more steps.
    keeper.restart_clock()
    assert keeper.after_step(12, total) is None
    assert keeper.after_epoch_end(12, seconds=10.0) == 12 + 360
    assert keeper.after_epoch_end(12, seconds=None) is None  # not timed: no new plan


def test_keeper_replans_at_once_when_steps_slow_down_past_the_margin():
    clock = FakeClock(tick=0.5)
    budget = TimeBudget(deadline=200.0, clock=clock)
    keeper = BudgetKeeper(budget, ends_per_step=0.0, eval_images=0, batch_size=4, agree=lambda v: v)
    for step in range(1, CALIBRATION_STEPS):
        keeper.after_step(step, 10**6)
    total = keeper.after_step(CALIBRATION_STEPS, 10**6)
    assert total == CALIBRATION_STEPS + 383  # as in the test above
    # Step 11 takes 3 s (ends at 8.5 s). The timed steps (the first two left out) are eight
    # of 0.5 s and this one: 7 s / 9. Without the margin, (200 - 8.5 - 1) * 9 / 7 = 244.9,
    # so 11 + 244 = 255 < 393 steps fit: the plan would overrun the deadline itself. Made
    # again with the 2 s margin: (200 - 8.5 - 1 - 2) * 9 / 7 = 242.4, total 11 + 242.
    clock.tick = 3.0
    total = keeper.after_step(11, total)
    assert total == 11 + 242
    # Step 12 is quick again (9.0 s; 7.5 s / 10 steps): (200 - 9 - 1) / 0.75 = 253.3 more
    # steps fit without the margin, 12 + 253 >= 253: within the margin, so no new plan.
    clock.tick = 0.5
    assert keeper.after_step(12, total) is None
    # Step 13 takes 1.2 s (10.2 s; 8.7 s / 11 steps): (200 - 10.2 - 1) * 11 / 8.7 = 238.7,
    # so 13 + 238 = 251 fit without the margin, 2 fewer than planned: within the slack of 1 %
    # of the 240 steps left (2.4), so no new plan (a creeping step time re-plans now and then).
    assert OVERRUN_SLACK == 0.01
    clock.tick = 1.2
    assert keeper.after_step(13, total) is None
    # Step 14 takes 3 s (13.2 s; 11.7 s / 12 steps = 0.975 s): 14 + 190 = 204 fit, 49 short.
    # Made again: (200 - 13.2 - 1 - 2) / 0.975 = 188.5, total 14 + 188.
    clock.tick = 3.0
    assert keeper.after_step(14, total) == 14 + 188


def test_keeper_stops_the_run_when_time_is_up():
    clock = FakeClock(tick=4.0)
    budget = TimeBudget(deadline=20.0, clock=clock)
    keeper = BudgetKeeper(budget, ends_per_step=0.0, eval_images=0, batch_size=4, agree=lambda v: v)
    # Steps end at 8, 12, 16 and 20 s (the keeper read 4 s when made): 16 + 2 < 20, so the
    # run ends at step 4, where 20 + 2 >= 20.
    assert [keeper.after_step(s, 100) for s in (1, 2, 3, 4)] == [None, None, None, 4]


def test_minutes_with_the_recipe_trains_what_fits_and_fits_the_schedule_to_it(tmp_path):
    # On a fake clock, so that what fits depends on the plan's arithmetic, not on how busy the
    # machine is: every reading of the run's time moves it on by 0.5 s, so a step "takes"
    # 0.5 s (one reading at its end) and a timed epoch end 0.5 s (one at each side of it).
    out = tmp_path / "run.safetensors"
    clock = FakeClock(tick=0.5)
    code = main(
        [
            "--data", "synthetic:24", "--val-data", "synthetic:4", "--out", str(out),
            "--minutes", "0.25", "--batch-size", "2", "--width", "0.125",
            "--batch-norm", "--workers", "0", "--log-every", "1", "--warmup-steps", "5",
            "--lr", "0.005", "--recipe", "small-scratch", "--calibration", "0",
        ],
        clock=clock,
    )  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    plans = [r["planned_steps"] for r in records if "planned_steps" in r]
    steps = [r for r in records if "loss" in r]
    # The readings: 0.5 (start: the deadline is 0.5 + 15 = 15.5), 1.0 (the keeper), 1.5 (the
    # loop), then step 1 ends at 2.0 and step 10 at 6.5. The recipe evaluates every 5 epochs
    # of 12 steps, so an epoch end is estimated at 4 images x (0.5 s / 2) / 3 + 1 s = 4/3 s,
    # and one falls on every 60 steps: (15.5 - 6.5 - 4/3 - 2) / (0.5 + 4/3 / 60) = 10.85, so
    # 10 more steps. Step 13 takes 1 s (step 12's untimed epoch end reads the clock once):
    # the plan still fits (22 steps at the new 0.545 s average), so it stands.
    assert plans == [20]
    assert [r["step"] for r in steps] == list(range(1, 21))  # the run ended where planned
    # The cosine curve ends with the run: its last rate is the curve's end, not the 1000-epoch
    # provisional plan's (which would still be the base rate).
    assert steps[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    # Up to the plan at step 10 the rate was the provisional curve's, still at its base. Then
    # the 20-step curve's: its asked 5-step warm-up fits (re-pointed, issue #23: it used to be
    # cut to a tenth of the run, 2 steps), so the rate logged after step 11 is step 12's, 6 of
    # 15 steps into the cosine.
    assert steps[9]["lr"] == pytest.approx(0.005, rel=1e-5)
    assert steps[10]["lr"] == pytest.approx(0.005 * 0.5 * (1 + math.cos(math.pi * 6 / 15)))
    assert clock.now == 13.5  # the final epoch end read it twice, the loop's restart once
    assert any("val_map50" in r for r in records)
    assert out.with_suffix(".best.safetensors").is_file() and out.with_suffix(".png").is_file()
    # The recipe's flags reached the run, and the ones given here won over it.
    recipe = load_checkpoint(out).recipe
    assert (recipe["ema"], recipe["mosaic"], recipe["clip_grad_norm"]) == (0.99, 0.5, 5.0)
    assert (recipe["lr"], recipe["batch_size"], recipe["width"]) == (0.005, 2, 0.125)
    # The recipe's --precision auto was measured, and the checkpoint says what it ran in.
    assert recipe["precision"] in ("fp32", "bf16")
    assert load_training_state(out.with_suffix(".state.safetensors")).ema is not None
