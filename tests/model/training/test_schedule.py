"""Learning-rate schedules: golden values by hand, and torch's own schedulers as a cross-check."""

import math

import pytest
import torch

from model.training.schedule import LrCurve, lr_factor


def test_linear_warmup_reaches_the_base_rate_at_its_last_step():
    factors = [lr_factor(s, total=100, warmup=4, schedule="cosine") for s in range(4)]
    assert factors == [0.25, 0.5, 0.75, 1.0]


def test_cosine_golden_values():
    # After 10 warm-up steps, 90 steps of cosine: half-way (step 55) is 0.5, the end is 0.
    assert lr_factor(10, total=100, warmup=10, schedule="cosine") == 1.0
    assert lr_factor(55, total=100, warmup=10, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(32, total=100, warmup=10, schedule="cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 22 / 90))
    )
    assert lr_factor(100, total=100, warmup=10, schedule="cosine") == pytest.approx(0.0)
    assert lr_factor(150, total=100, warmup=10, schedule="cosine") == pytest.approx(0.0)


def test_step_follows_the_authors_milestones():
    # ssd_pascal.py: x0.1 at 80k and 100k of 120k iterations.
    total = 120
    assert lr_factor(79, total=total, warmup=0, schedule="step") == 1.0
    assert lr_factor(80, total=total, warmup=0, schedule="step") == pytest.approx(0.1)
    assert lr_factor(99, total=total, warmup=0, schedule="step") == pytest.approx(0.1)
    assert lr_factor(100, total=total, warmup=0, schedule="step") == pytest.approx(0.01)


def _torch_factors(make_scheduler, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = make_scheduler(optimizer)
    factors = []
    for _ in range(steps):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


def test_without_warmup_equals_torchs_schedulers():
    total = 60
    cosine = _torch_factors(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total), total
    )
    ours = [lr_factor(s, total=total, warmup=0, schedule="cosine") for s in range(total)]
    assert ours == pytest.approx(cosine, abs=1e-9)
    steps = _torch_factors(
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[40, 50], gamma=0.1), total
    )
    ours = [lr_factor(s, total=total, warmup=0, schedule="step") for s in range(total)]
    assert ours == pytest.approx(steps, abs=1e-12)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="'linear'"):
        lr_factor(0, total=10, warmup=0, schedule="linear")


def _curve(total: int, warmup_limit: int) -> list[float]:
    curve = LrCurve(total=total, warmup_limit=warmup_limit, schedule="cosine")
    return [curve(step) for step in range(total)]


def test_a_4_step_run_keeps_a_2_step_warm_up():
    # Asked 500: a tenth of 4 steps is 0, the 10-step floor is capped at half the run: 2.
    # Warm-up 1/2, 2/2; then cosine over the other 2 steps: progress 0, then 1/2 -> 0.5.
    assert LrCurve(total=4, warmup_limit=500, schedule="cosine").warmup == 2
    assert _curve(4, 500) == pytest.approx([0.5, 1.0, 1.0, 0.5])


def test_a_40_step_run_warms_up_for_the_floor():
    # Asked 100: a tenth of 40 is 4, under the floor of 10 (at most half of 40): 10 steps of
    # 0.1 .. 1.0, then cosine over 30 steps: 0.5 * (1 + cos(pi * (step - 10) / 30)).
    factors = _curve(40, 100)
    assert factors[:11] == pytest.approx([0.1 * k for k in range(1, 11)] + [1.0])
    assert factors[20] == pytest.approx(0.75)  # progress 1/3: (1 + 1/2) / 2
    assert factors[25] == pytest.approx(0.5)  # progress 1/2
    assert factors[30] == pytest.approx(0.25)  # progress 2/3: (1 - 1/2) / 2
    assert factors[39] == pytest.approx(0.5 * (1 + math.cos(math.pi * 29 / 30)))


def test_warm_up_is_as_asked_when_the_run_has_room_and_a_tenth_of_a_long_run():
    assert LrCurve(total=40, warmup_limit=5, schedule="cosine").warmup == 5
    assert LrCurve(total=40, warmup_limit=0, schedule="cosine").warmup == 0
    assert LrCurve(total=1000, warmup_limit=500, schedule="step").warmup == 100
    assert LrCurve(total=1, warmup_limit=500, schedule="cosine").warmup == 1


def test_a_scaled_warm_up_says_so():
    assert LrCurve(total=40, warmup_limit=5, schedule="cosine").scaled_warmup() is None
    note = LrCurve(total=4, warmup_limit=500, schedule="cosine").scaled_warmup()
    assert note is not None
    assert "from 500 steps to 2" in note and "the run is 4 steps" in note
