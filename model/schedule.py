"""Learning-rate schedules: linear warm-up, then step or cosine decay, as a LambdaLR factor."""

from __future__ import annotations

import math

# The authors' VOC SSD300 schedule: lr x0.1 at 80k and again at 100k of 120k iterations, i.e.
# at 2/3 and 5/6 of the run (ssd_pascal.py: stepvalue [80000, 100000, 120000]).
STEP_MILESTONES = (2 / 3, 5 / 6)
STEP_GAMMA = 0.1
SCHEDULES = ("step", "cosine")


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    passed = sum(step >= m * total for m in STEP_MILESTONES)
    return STEP_GAMMA**passed
