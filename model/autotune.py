"""``precision="auto"``: time each candidate precision on the real network, keep the fastest.

CPU flags do not say which precision is fastest: a CPU with AVX-512 BF16 but no AMX runs
SSD300 under bf16 autocast at about 0.6x of fp32 (issue #12), so the choice is measured on
this machine, on the network itself, once, when the ``Detector`` is built.

The candidates are interleaved (fp32, bf16, fp32, bf16, ...) and each one's median time is
kept, so a burst of load from another process slows every candidate alike rather than the one
that happened to run then. A reduced precision is kept only if its scores on the measured
batch stay close to fp32's (``SCORE_TOLERANCE``); the offline guard, mAP@0.5 on the synthetic
test split, is ``tests/model/test_precision_accuracy.py``.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

log = logging.getLogger("model.autotune")

# Which precisions may be chosen, in order of preference on a tie (fp32 first: it is the
# reference). Each entry says whether a device offers it. int8 is not listed: it needs its own
# quantized network, so the Detector adds it when it has one (model.int8, CPU only).
CANDIDATES: dict[str, Callable[[torch.device], bool]] = {
    "fp32": lambda device: True,
    "bf16": lambda device: device.type == "cpu" or torch.cuda.is_bf16_supported(),
    # fp16 autocast on the CPU is not a serving path (slower than fp32 on CPUs without
    # AVX-512 FP16 and unchecked for accuracy there), so it is a candidate on GPUs only.
    "fp16": lambda device: device.type == "cuda",
}
# Images per timed batch. The service batches up to 8 (SSD_MAX_BATCH_SIZE), but one pass of the
# full-width SSD300 on one image already takes about 0.3 s on this 2-core CPU, so a batch of
# 8 would not fit a 2 s budget; one image times the same kernels.
BATCH_SIZE = 1
# Timed passes per candidate: at least MIN_ROUNDS, more while the budget lasts (a median of
# three already ignores one disturbed pass).
MIN_ROUNDS, MAX_ROUNDS = 3, 7
BUDGET_S = 2.0  # issue #12: "a few batches, a second or two"
# Largest difference in any class probability (0..1) between a reduced precision and fp32 on
# the measured batch. bf16 keeps 8 significant bits (relative error 2**-8, about 0.004 per
# operation); 0.05 is room for that accumulated through the network, while a precision
# that breaks the network (overflow, NaN) is far off.
SCORE_TOLERANCE = 0.05

Forward = Callable[[str, Tensor], Tensor]


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``choose_precision`` measured and chose.

    ``images_per_s`` holds each timed candidate's median rate; ``score_error`` each reduced
    precision's largest class-probability difference from fp32; ``rejected`` the candidates
    the accuracy guard turned down; ``seconds`` what the whole measurement cost.
    """

    precision: str
    images_per_s: dict[str, float]
    score_error: dict[str, float] = field(default_factory=dict)
    rejected: tuple[str, ...] = ()
    seconds: float = 0.0

    def summary(self) -> str:
        """One log line: each candidate's images/s, the guard's verdicts and the choice."""
        rates = ", ".join(f"{name} {rate:.1f}" for name, rate in self.images_per_s.items())
        rejected = f"; rejected by the accuracy guard: {', '.join(self.rejected)}"
        return (
            f"precision auto: measured images/s {rates} in {self.seconds:.1f} s"
            f"{rejected if self.rejected else ''}; chose {self.precision}"
        )


def candidates(device: torch.device) -> list[str]:
    """The precisions ``auto`` may choose on ``device``, fp32 first."""
    return [name for name, offered in CANDIDATES.items() if offered(device)]


def choose_precision(
    forward: Forward,
    inputs: Tensor,
    names: list[str],
    *,
    budget_s: float = BUDGET_S,
    tolerance: float = SCORE_TOLERANCE,
) -> PrecisionChoice:
    """Time ``forward(name, inputs)`` for each of ``names`` and pick the fastest that passes.

    Args:
        forward: runs the network on ``inputs`` in the named precision; returns the class
            scores, float Tensor[N, A, K] of logits (synchronised: the values are read).
        inputs: a prepared batch Tensor[N, 3, S, S], as ``Detector.forward`` takes.
        names: candidate precisions, the reference (fp32) first.
        budget_s: after MIN_ROUNDS interleaved rounds, more rounds run while the time spent
            stays below this (seconds), up to MAX_ROUNDS.
        tolerance: largest class-probability difference from the reference that passes.

    Returns:
        The choice and what was measured. With one candidate nothing is timed.
    """
    if len(names) == 1:
        return PrecisionChoice(names[0], {})
    start = time.perf_counter()
    reference = forward(names[0], inputs).float().softmax(-1)  # also the first, untimed pass
    errors = {}
    for name in names[1:]:  # untimed first pass of each, which also gives the guard its data
        scores = forward(name, inputs).float().softmax(-1)
        errors[name] = float((scores - reference).abs().nan_to_num(nan=1.0).max())
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(MAX_ROUNDS):
        if round_ >= MIN_ROUNDS and time.perf_counter() - start > budget_s:
            break
        for name in names:
            began = time.perf_counter()
            forward(name, inputs)
            times[name].append(time.perf_counter() - began)
    rates = {name: len(inputs) / statistics.median(spent) for name, spent in times.items()}
    rejected = tuple(name for name, error in errors.items() if not error <= tolerance)
    passing = [name for name in names if name not in rejected]
    best = max(passing, key=lambda name: rates[name])  # max keeps the first on a tie
    return PrecisionChoice(best, rates, errors, rejected, time.perf_counter() - start)
