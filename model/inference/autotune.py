"""``precision="auto"``: time each candidate precision on the real network, keep the fastest.

CPU flags do not say which precision is fastest: a CPU with AVX-512 BF16 but no AMX runs
SSD300 under bf16 autocast slower than fp32 (issue #12; docs/performance-notes.md), so the
choice is measured on this machine, on the network itself, once, as a step of its own that
callers run explicitly: inference passes when ``Detector.load(..., precision="auto")`` loads a
network (``choose_inference_precision``; building a ``Detector`` never measures), whole
training steps when ``model.train --precision auto`` starts (``choose_training_precision``).

The candidates are interleaved (fp32, bf16, fp32, bf16, ...) and each one's median time is
kept, so a burst of load from another process slows every candidate alike rather than the one
that happened to run then. A candidate whose first timed pass is clearly slower than the best
(``SLOWER_BY``) is timed no more, and timing stops once one candidate is left, so a precision
that is far off (bf16 on a CPU without native bf16) costs one timed pass, not several. A
reduced precision is kept only if its results on the measured batch stay close to fp32's: for
inference its class scores (``SCORE_TOLERANCE``), for a training step its loss terms
(``LOSS_TOLERANCE``). The offline guard for inference, mAP@0.5 on the synthetic test split, is
``tests/model/inference/test_precision_accuracy.py``; for training, the README's measured
runs.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from model.inference.runtime import INT8, Runtime
from model.network.ssd import SSD

log = logging.getLogger("model.inference.autotune")

# Which precisions may be chosen, in order of preference on a tie (fp32 first: it is the
# reference). Each entry says whether a device offers it. int8 is not listed: it needs its own
# quantized network, so the Detector adds it when it has one (model.inference.int8, CPU only).
CANDIDATES: dict[str, Callable[[torch.device], bool]] = {
    "fp32": lambda device: True,
    "bf16": lambda device: device.type == "cpu" or torch.cuda.is_bf16_supported(),
    # fp16 autocast on the CPU is not a serving path (slower than fp32 on CPUs without
    # AVX-512 FP16 and unchecked for accuracy there), so it is a candidate on GPUs only.
    "fp16": lambda device: device.type == "cuda",
}
# Images per timed batch. The service batches up to 8 (SSD_MAX_BATCH_SIZE), but on a small CPU a
# full-width SSD300 pass on one image already takes a good part of BUDGET_S
# (docs/performance-notes.md), so a batch of 8 would not fit it; one image times the same
# kernels.
BATCH_SIZE = 1
# Timed passes per candidate: at least MIN_ROUNDS, more while the budget lasts (a median of
# three already ignores one disturbed pass).
MIN_ROUNDS, MAX_ROUNDS = 3, 7
BUDGET_S = 2.0  # issue #12: "a few batches, a second or two"
# A candidate whose first timed pass takes more than SLOWER_BY times the fastest first timed
# pass of a candidate that passes the guard is timed no more. A candidate truly faster than
# the best would be dropped only if outside load slowed that one pass more than threefold; the
# ratios recorded for this network (docs/performance-notes.md) are either within 2x, where
# timing must go on, or about 10x (bf16 on a CPU without native bf16), where one pass
# settles it.
SLOWER_BY = 3.0
# Largest difference in any class probability (0..1) between a reduced precision and fp32 on
# the measured batch. bf16 keeps 8 significant bits (relative error 2**-8, about 0.004 per
# operation); 0.05 is room for that accumulated through the network, while a precision
# that breaks the network (overflow, NaN) is far off.
SCORE_TOLERANCE = 0.05
# Largest relative difference in any loss term (total, loc, conf) of a training step between a
# reduced precision and fp32. Class scores are no guard there: an untrained BatchNorm network
# in training mode has logits of -14 to 10, and bf16 moved single probabilities among its
# 140,000 (8 images x 8,732 boxes x 2 classes) by up to 0.3, yet its loss terms by under 1 %
# (recipe network, batch of 8), and it trained as well as fp32 (README). Overflow or
# underflow is far off, or not finite.
LOSS_TOLERANCE = 0.05

# Spread of the noise images a training step is timed on: about that of mean-subtracted
# 0-255 pixels (the ImageNet means are 104 to 124, so inputs span roughly -124..151).
NOISE_STD = 50.0

Forward = Callable[[str, Tensor], Tensor]
Error = Callable[[Tensor, Tensor], float]


def score_error(reference: Tensor, scores: Tensor) -> float:
    """Largest class-probability difference (0..1) between two Tensor[N, A, K] of logits; a
    NaN counts as 1."""
    difference = scores.float().softmax(-1) - reference.float().softmax(-1)
    return float(difference.abs().nan_to_num(nan=1.0).max())


def loss_error(reference: Tensor, terms: Tensor) -> float:
    """Largest relative difference between two Tensor[T] of loss terms (NaN where not finite,
    which no tolerance passes)."""
    return float(((terms.float() - reference.float()).abs() / reference.float().abs()).max())


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``choose_precision`` measured and chose.

    ``images_per_s`` holds each timed candidate's median rate; ``error`` each reduced
    precision's difference from fp32 (``score_error`` or ``loss_error``); ``rejected`` the
    candidates the accuracy guard turned down; ``stopped`` those timed only once, being
    clearly slower (``SLOWER_BY``); ``seconds`` what the whole measurement cost.
    """

    precision: str
    images_per_s: dict[str, float]
    error: dict[str, float] = field(default_factory=dict)
    rejected: tuple[str, ...] = ()
    seconds: float = 0.0
    stopped: tuple[str, ...] = ()

    def summary(self, rate: str = "images/s") -> str:
        """One log line: each candidate's rate (named ``rate``), the guard's verdicts and the
        choice."""
        rates = ", ".join(f"{name} {rate:.1f}" for name, rate in self.images_per_s.items())
        errors = ", ".join(f"{name} {error:.3g}" for name, error in self.error.items())
        rejected = f"; rejected by the accuracy guard: {', '.join(self.rejected)}"
        stopped = f"; timed once, being over {SLOWER_BY:g}x slower: {', '.join(self.stopped)}"
        return (
            f"precision auto: measured {rate} {rates} in {self.seconds:.1f} s"
            f"{f'; difference from fp32 {errors}' if errors else ''}"
            f"{rejected if self.rejected else ''}{stopped if self.stopped else ''}"
            f"; chose {self.precision}"
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
    error: Error = score_error,
    timer: Callable[[], float] = time.perf_counter,
) -> PrecisionChoice:
    """Time ``forward(name, inputs)`` for each of ``names`` and pick the fastest that passes.

    Args:
        forward: runs the network on ``inputs`` in the named precision; returns what
            ``error`` compares, by default the class scores, float Tensor[N, A, K] of logits
            (synchronised: the values are read).
        inputs: a prepared batch Tensor[N, 3, S, S], as ``Detector.run_batch`` stacks it.
        names: candidate precisions, the reference (fp32) first.
        budget_s: after MIN_ROUNDS interleaved rounds, more rounds run while the time spent
            stays below this (seconds), up to MAX_ROUNDS.
        tolerance: largest ``error`` from the reference that passes.
        error: how far a candidate's result is from the reference's, (reference, result).
        timer: seconds, as ``time.perf_counter`` (tests give a fake one, so that which
            candidate is faster does not depend on the machine's load).

    Returns:
        The choice and what was measured. With one candidate nothing is timed. A candidate
        whose first timed pass took over ``SLOWER_BY`` times the fastest first timed pass of
        a candidate that passes the guard is timed no more (its rate is that one pass's);
        once fewer than two candidates are still timed, the rounds stop.
    """
    if len(names) == 1:
        return PrecisionChoice(names[0], {})
    start = timer()
    reference = forward(names[0], inputs)  # also the first, untimed pass
    # An untimed first pass of each, which also gives the guard its data.
    errors = {name: error(reference, forward(name, inputs)) for name in names[1:]}
    rejected = tuple(name for name, error in errors.items() if not error <= tolerance)
    times: dict[str, list[float]] = {name: [] for name in names}
    timing = list(names)  # the candidates still being timed
    stopped: tuple[str, ...] = ()
    for round_ in range(MAX_ROUNDS):
        if len(timing) < 2 or (round_ >= MIN_ROUNDS and timer() - start > budget_s):
            break
        for name in timing:
            began = timer()
            forward(name, inputs)
            times[name].append(timer() - began)
        if round_ == 0:  # the reference is never rejected, so a passing best exists
            best = min(times[name][0] for name in timing if name not in rejected)
            stopped = tuple(name for name in timing if times[name][0] > SLOWER_BY * best)
            timing = [name for name in timing if name not in stopped]
    rates = {name: len(inputs) / statistics.median(spent) for name, spent in times.items()}
    passing = [name for name in names if name not in rejected]
    best_name = max(passing, key=lambda name: rates[name])  # max keeps the first on a tie
    return PrecisionChoice(best_name, rates, errors, rejected, timer() - start, stopped)


def choose_inference_precision(
    network: nn.Module,
    device: torch.device,
    inputs: Tensor,
    int8_network: nn.Module | None = None,
) -> PrecisionChoice:
    """Time inference passes of ``network`` on ``device`` in each precision the device offers
    (``candidates``), and of ``int8_network`` (a CPU-only network quantized by
    ``model.quantize``) as ``int8`` when one is given; keep the fastest whose class scores stay
    within ``SCORE_TOLERANCE`` of fp32's (``choose_precision``). Logs the summary line.

    Args:
        network: an ``SSD``; it is placed on ``device`` in each candidate's layout, and left
            in the last one's (the ``Detector`` built at the winner places it again).
        device: where the network will run.
        inputs: prepared images Tensor[N, 3, S, S] float32 on the CPU, as
            ``Detector.prepare`` makes them (``BATCH_SIZE`` of them: see there).
        int8_network: the int8 candidate, or None.
    """

    @torch.inference_mode()
    def forward(name: str, batch: Tensor) -> Tensor:
        runtime = Runtime(device, name)
        chosen = runtime.place(int8_network if name == INT8 else network)
        with runtime.autocast():
            _, conf = chosen(runtime.inputs(batch))
        return conf.float().cpu()  # the copy waits for a GPU to finish

    names = candidates(device) + ([INT8] if int8_network is not None else [])
    choice = choose_precision(forward, inputs, names)
    log.info("%s", choice.summary())
    return choice


def choose_training_precision(
    network: SSD,
    loss: nn.Module,
    device: torch.device,
    batch_size: int,
) -> PrecisionChoice:
    """Time a training step (forward, MultiBox loss, backward) in each candidate precision on
    ``device`` and pick the fastest whose loss terms stay within ``LOSS_TOLERANCE`` of
    fp32's; see ``choose_precision``.

    The batch is seeded noise of ``batch_size`` images at the network's input size, each with
    one centred box of class 1, so every start measures the same work. The optimiser's update
    is left out: it costs the same in every precision, since the weights stay fp32 under
    autocast. Only the timing rounds ``MIN_ROUNDS`` run (a step can take seconds). The network
    comes back as it was: its BatchNorm statistics are restored and its gradients cleared.

    Args:
        network: an ``SSD`` placed on ``device``; it returns (loc, conf).
        loss: ``MultiBoxLoss`` for the network's default boxes, on ``device``.
        device: where training runs.
        batch_size: images per step, as in training.
    """
    generator = torch.Generator().manual_seed(0)
    side = network.input_size
    inputs = NOISE_STD * torch.randn(batch_size, 3, side, side, generator=generator)
    boxes = [torch.tensor([[0.25, 0.25, 0.75, 0.75]], device=device)] * batch_size
    labels = [torch.ones(1, dtype=torch.int64, device=device)] * batch_size
    saved = {name: value.clone() for name, value in network.state_dict().items()}
    was_training = network.training

    def step(name: str, batch: Tensor) -> Tensor:
        runtime = Runtime(device, name)
        runtime.place(network)  # on a GPU the layout follows the precision
        with runtime.autocast():
            loc, conf = network(runtime.inputs(batch))
        terms = loss(loc, conf, boxes, labels)
        terms.total.backward()
        network.zero_grad(set_to_none=True)
        values = torch.stack([terms.total, terms.loc, terms.conf]).detach()
        return values.cpu()  # the copy waits for a GPU to finish

    network.train()
    try:
        return choose_precision(
            step,
            inputs,
            candidates(device),
            budget_s=0.0,
            tolerance=LOSS_TOLERANCE,
            error=loss_error,
        )
    finally:
        network.load_state_dict(saved)
        network.train(was_training)
