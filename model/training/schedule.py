"""Learning-rate schedules: linear warm-up, then step or cosine decay, as a LambdaLR factor."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass
class LrCurve:
    """``lr_factor`` over a run of ``total`` steps, as a ``LambdaLR`` callable whose length can
    change mid-run (a time budget stretches or shrinks it). Warm-up is ``warmup_limit`` steps,
    but at most a tenth of the run, so that short runs are not all warm-up.
    """

    total: int
    warmup_limit: int
    schedule: str

    @property
    def warmup(self) -> int:
        """Warm-up steps of the current curve (at least 1)."""
        return min(self.warmup_limit, max(1, self.total // 10))

    def __call__(self, step: int) -> float:
        return lr_factor(step, total=self.total, warmup=self.warmup, schedule=self.schedule)
