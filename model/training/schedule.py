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


# A warm-up longer than the run would leave no run, so a short run's warm-up is scaled down:
# to a tenth of the run (the from-scratch recipe's 100 steps are about a tenth of its 20-minute
# runs of 650 to 680 steps, docs/training-experiments.md), but never below WARMUP_FLOOR steps,
# and never over half the run, so that the other half still decays. The floor: a linear ramp
# of 10 steps starts at a tenth of the base rate, an order of magnitude below it; a tenth of a
# 4-step run is no ramp at all, and a randomly initialised VGG diverged on its second step
# there (issue #23).
WARMUP_SHARE = 10  # the warm-up is at most 1/WARMUP_SHARE of the run, unless the floor rules
WARMUP_FLOOR = 10


@dataclass
class LrCurve:
    """``lr_factor`` over a run of ``total`` steps, as a ``LambdaLR`` callable whose length can
    change mid-run (a time budget stretches or shrinks it). Warm-up is ``warmup_limit`` steps,
    scaled down in a run too short for it (``warmup``).
    """

    total: int
    warmup_limit: int
    schedule: str

    @property
    def warmup(self) -> int:
        """Warm-up steps of the current curve: ``warmup_limit``, but at most the larger of a
        tenth of the run and ``WARMUP_FLOOR`` steps (the floor at most half the run; 1 if
        that is 0)."""
        short_run = min(WARMUP_FLOOR, self.total // 2)
        return min(self.warmup_limit, max(1, self.total // WARMUP_SHARE, short_run))

    def scaled_warmup(self) -> str | None:
        """Why the warm-up is shorter than asked, for the log; None when it is as asked."""
        if self.warmup >= self.warmup_limit:
            return None
        return (
            f"warm-up scaled down from {self.warmup_limit} steps to {self.warmup}: the run is "
            f"{self.total} steps, and a warm-up takes at most a tenth of a run, or "
            f"{WARMUP_FLOOR} steps if more, but never over half of it"
        )

    def __call__(self, step: int) -> float:
        return lr_factor(step, total=self.total, warmup=self.warmup, schedule=self.schedule)
