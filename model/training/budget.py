"""A wall-clock budget for training (``python -m model.train --minutes N``).

The run starts on a provisional plan; after a few timed steps, and again after every timed
epoch end (one with its evaluation, or every epoch end of a run without validation: checkpoint,
evaluation, training state, curves), the total is set to the steps that fit before the
deadline with the timed epoch ends on the way and one final one (``steps_that_fit``). Between
those, a plan that the latest step times say would run past the deadline itself (its margin
used up) by more than 1 % of the steps left is made again at once, so that a run that slows
down still ends where its curve does. The
epoch ends in between (writes only) count as part of the steps around them. The learning-rate curve
(``model.training.schedule.LrCurve``) is stretched or shrunk with it, so a cosine schedule still
ends at the end of the time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("model.train")

# Steps timed before the first plan. The first two are left out of the average: they pay for
# the data loader's workers starting and for first-call allocations.
CALIBRATION_STEPS = 10
UNTIMED_STEPS = 2
# Inference costs about a third of a training step per image (a forward pass against a
# forward and a backward, the backward about twice the forward): the evaluation estimate
# until one has been timed.
INFERENCE_SHARE = 1 / 3
# Seconds kept back at the end, beyond the final epoch end, for the noise in the estimates.
WRITE_MARGIN_S = 2.0
# The share of the steps left that a plan may overrun the deadline by before it is made again.
OVERRUN_SLACK = 0.01
# Writing a checkpoint, the training state and the curves, until an epoch end is timed.
WRITES_ESTIMATE_S = 1.0


@dataclass
class TimeBudget:
    """Train until ``deadline``, in seconds on ``clock`` (``time.monotonic`` unless a test
    injects another: every reading of the run's time goes through it). ``step_s`` and
    ``epoch_end_s`` are the measured seconds per optimiser step and per epoch end (with its
    evaluation), None until measured."""

    deadline: float
    step_s: float | None = None
    epoch_end_s: float | None = None
    clock: Callable[[], float] = time.monotonic

    def steps_that_fit(
        self,
        step: int,
        now: float,
        *,
        ends_per_step: float,
        end_estimate_s: float,
        margin_s: float = WRITE_MARGIN_S,
    ) -> int:
        """The total steps that leave time, from step ``step`` at ``now``, for each further
        step, the epoch ends on the way (``ends_per_step`` of them per step), one final
        epoch end and ``margin_s``. Never fewer than ``step``: out of time, the run ends
        where it is.

        Raises:
            ValueError: no step has been timed yet.
        """
        if self.step_s is None:
            raise ValueError("steps_that_fit needs a measured step time")
        epoch_end_s = self.epoch_end_s if self.epoch_end_s is not None else end_estimate_s
        left = self.deadline - now - epoch_end_s - margin_s
        per_step = self.step_s + epoch_end_s * ends_per_step
        return step + max(0, math.floor(left / per_step))

    def out_of_time(self, now: float) -> bool:
        """Whether one more step would leave too little time for the final epoch end before
        the deadline (unmeasured times count as 0)."""
        ahead = (self.step_s or 0.0) + (self.epoch_end_s or 0.0) + WRITE_MARGIN_S
        return now + ahead >= self.deadline


class BudgetKeeper:
    """Follows a ``TimeBudget`` through a run: times each step, plans the total once enough
    steps are timed and again after every timed epoch end, and ends the run when time is up.

    Args:
        budget: the deadline and its clock, and what has been measured so far.
        ends_per_step: timed epoch ends per optimiser step (1 / steps between evaluations;
            1 / steps per epoch without validation).
        eval_images: images per evaluation (0 without one), for the estimate of an epoch
            end until one is timed.
        batch_size: images per step and process.
        agree: the main process's value of an int on every process (``Processes.agree``),
            so that every process stops at the same step.
    """

    def __init__(
        self,
        budget: TimeBudget,
        *,
        ends_per_step: float,
        eval_images: int,
        batch_size: int,
        agree: Callable[[int], int],
    ) -> None:
        self.budget = budget
        self.ends_per_step = ends_per_step
        self.eval_images = eval_images
        self.batch_size = batch_size
        self.agree = agree
        self.clock = budget.clock
        self._seconds: list[float] = []
        self._last = self.clock()

    def restart_clock(self) -> None:
        """Leave the time since the last step (evaluation, checkpoints) out of the next."""
        self._last = self.clock()

    def after_step(self, step: int, total: int) -> int | None:
        """Note a step's end in a run planned for ``total`` steps; returns the new total when
        it changes, else None."""
        now = self.clock()
        self._seconds.append(now - self._last)
        self._last = now
        new_total, replan = None, False
        if len(self._seconds) >= CALIBRATION_STEPS:
            # The latest steps: the rate drifts (workers, caches) more than it is noisy.
            recent = self._seconds[UNTIMED_STEPS:][-5 * CALIBRATION_STEPS :]
            first_plan = self.budget.step_s is None
            self.budget.step_s = sum(recent) / len(recent)
            replan = first_plan or self._overruns(step, now, total)
        # One agreement per step for both decisions (a collective in a multi-process run).
        decided = self.agree(int(replan) | int(self.budget.out_of_time(now)) << 1)
        if decided & 1:
            new_total = self.plan(step, now)
        if decided & 2:
            new_total = step
        return new_total

    def _overruns(self, step: int, now: float, total: int) -> bool:
        """Whether ``total`` steps at the latest step time would end past the deadline itself
        (the margin used up) by more than ``OVERRUN_SLACK`` of the steps left. A step time
        that creeps up (caches, heat, a neighbour) then re-plans now and then, not at every
        step; the steps it may still overrun by are cut at the end by ``out_of_time``, where
        a cosine curve is flat (at 99 % of it the rate is 0.00025 of the base)."""
        fits = self.budget.steps_that_fit(
            step,
            now,
            ends_per_step=self.ends_per_step,
            end_estimate_s=self._end_estimate(),
            margin_s=0.0,
        )
        return total - fits > OVERRUN_SLACK * (total - step)

    def _end_estimate(self) -> float:
        """Seconds of an epoch end until one is timed: its evaluation and its writes."""
        assert self.budget.step_s is not None
        per_image = self.budget.step_s / self.batch_size
        return self.eval_images * per_image * INFERENCE_SHARE + WRITES_ESTIMATE_S

    def after_epoch_end(self, step: int, seconds: float | None) -> int | None:
        """Note a timed epoch end's duration (None on the other processes) and re-plan with
        it and the latest step time. Returns the new total when it changes, else None."""
        if not self.agree(int(seconds is not None)):
            return None
        if seconds is not None:
            self.budget.epoch_end_s = seconds
        return self.plan(step, self.clock()) if self.budget.step_s is not None else None

    def plan(self, step: int, now: float) -> int:
        """The total that fits, agreed by every process, and logged."""
        assert self.budget.step_s is not None
        estimate = self._end_estimate()
        total = self.agree(
            self.budget.steps_that_fit(
                step, now, ends_per_step=self.ends_per_step, end_estimate_s=estimate
            )
        )
        measured = self.budget.epoch_end_s is not None
        logger.info(
            "time budget: %.2f s per step, %.1f s per epoch end%s: %d steps in all",
            self.budget.step_s,
            self.budget.epoch_end_s if measured else estimate,
            "" if measured else " (estimated)",
            total,
        )
        return total
