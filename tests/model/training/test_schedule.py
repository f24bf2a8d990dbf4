"""Learning-rate schedules: golden values by hand, and torch's own schedulers as a cross-check."""

import math

import pytest
import torch

from model.training.schedule import lr_factor


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
