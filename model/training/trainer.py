"""The training loop, built from parts that ``model.train`` makes from the command line.

``Trainer.run`` takes optimiser steps until the plan's total (or its ``stop_at``), and at each
epoch's end writes the checkpoint, evaluates, keeps the best checkpoint by validation
mAP@0.5 and writes the training state that ``restore`` resumes from. Batches are a function
of the seed, the epoch and the step within it, so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.data.loader import RunBatches, collate
from model.evaluation.curves import plot_training
from model.evaluation.evaluate import EvaluationReport, predict_dataset, score
from model.inference.detector import Detector
from model.network.loss import MultiBoxLoss
from model.network.ssd import SSD
from model.training.budget import BudgetKeeper, TimeBudget
from model.training.distributed import Processes
from model.training.schedule import LrCurve
from model.weights.checkpoint import RunFiles, TrainingState, save_checkpoint, save_training_state

logger = logging.getLogger("model.train")

Batch = tuple[Tensor, list[Tensor], list[Tensor]]  # images [N, 3, S, S], boxes, labels


class DivergenceError(RuntimeError):
    """The loss stopped being finite; nothing is written after it."""


@dataclass(frozen=True)
class StepPlan:
    """How long a run is, in optimiser steps, and how often it reports.

    ``eval_every`` counts epochs (0: never evaluate); ``stop_at`` ends the run early after
    that step with its state saved, to split a long run into resumable pieces.
    """

    total: int
    per_epoch: int
    log_every: int = 10
    eval_every: int = 1
    stop_at: int | None = None


@dataclass
class Optimisation:
    """The optimiser, its learning-rate schedule (stepped once per optimiser step), the loss
    scaler (``Runtime.grad_scaler``) and an optional cap on the gradient's global L2 norm.
    ``curve`` is the schedule's ``LrCurve``, when it has one: a time budget stretches it.
    ``ema_decay`` keeps an exponential moving average of the weights (BatchNorm statistics
    included), updated after every step; the average is what is evaluated and saved."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    clip_grad_norm: float | None = None
    curve: LrCurve | None = None
    ema_decay: float | None = None


@dataclass(frozen=True)
class TrainingData:
    """Augmented samples (each a function of its index and the epoch) and how to batch them."""

    dataset: Dataset[Any]
    batch_size: int  # per process
    seed: int
    workers: int = 2

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(self, start_step: int, processes: Processes) -> Iterator[Batch]:
        """This process's batches from the run's step ``start_step`` on, epoch after epoch
        without end, read by one set of loader processes for the whole run."""
        order = RunBatches(
            len(self),
            self.batch_size,
            seed=self.seed,
            rank=processes.rank,
            world=processes.world,
            start_step=start_step,
        )
        loader = DataLoader(
            self.dataset, batch_sampler=order, collate_fn=collate, num_workers=self.workers
        )
        return iter(loader)


@dataclass(frozen=True)
class Validation:
    """Held-out data scored every ``StepPlan.eval_every`` epochs, in batches of
    ``batch_size`` read by ``workers`` loader processes."""

    dataset: Dataset[Any]
    batch_size: int
    workers: int = 2


class Trainer:
    """One training run of ``network`` (the raw ``SSD``; DDP wraps it under ``torchrun``).

    Args:
        network: the network to train, already placed by ``processes.runtime``.
        loss: the MultiBox loss over ``network``'s default boxes.
        optimisation: optimiser, schedule, loss scaler, gradient clipping.
        data: the training samples and batch size.
        plan: step counts.
        files: where checkpoints, state and the log go.
        class_names: the foreground class names, for class ids 1..C-1.
        processes: this process and its runtime (device, precision).
        validation: data to evaluate on, or None.
        recipe: how the run was configured, stored in every checkpoint.
        budget: a wall-clock deadline; the plan's total then follows what fits before it
            (``model.training.budget``), and ``plan.total`` is only the provisional start. Epoch
            ends are timed on its clock.
    """

    def __init__(
        self,
        network: SSD,
        *,
        loss: MultiBoxLoss,
        optimisation: Optimisation,
        data: TrainingData,
        plan: StepPlan,
        files: RunFiles,
        class_names: list[str],
        processes: Processes,
        validation: Validation | None = None,
        recipe: dict[str, Any] | None = None,
        budget: TimeBudget | None = None,
    ) -> None:
        self.network = network
        # The module the forward pass runs through: ``network`` or its DDP wrapper.
        self.wrapped = processes.wrap(network)
        self.loss = loss
        self.optimisation = optimisation
        self.data = data
        self.plan = plan
        self.files = files
        self.class_names = class_names
        self.processes = processes
        self.validation = validation
        self.recipe = recipe or {}
        self._noted = False  # whether a scaled-down warm-up has been logged
        self.keeper = None if budget is None else self._keeper(budget)
        self.clock = time.monotonic if budget is None else budget.clock
        self.averaged: AveragedModel | None = None
        if optimisation.ema_decay:
            self.averaged = AveragedModel(
                network,
                multi_avg_fn=get_ema_multi_avg_fn(optimisation.ema_decay),
                use_buffers=True,
            )
        self.step = 0
        self.best_map = -1.0  # no evaluation yet

    @property
    def _evaluates(self) -> bool:
        return self.validation is not None and self.plan.eval_every > 0

    @property
    def _timed_every(self) -> int:
        """Epochs between the epoch ends the time budget times: the full ones, with their
        evaluation; every one in a run that never evaluates. The others count as part of the
        next step's time."""
        return self.plan.eval_every if self._evaluates else 1

    def _keeper(self, budget: TimeBudget) -> BudgetKeeper:
        eval_images = 0
        if self._evaluates:
            eval_images = len(self.validation.dataset)  # type: ignore[union-attr,arg-type]
        return BudgetKeeper(
            budget,
            ends_per_step=1.0 / (self.plan.per_epoch * self._timed_every),
            eval_images=eval_images,
            batch_size=self.data.batch_size,
            agree=self.processes.agree,
        )

    def run(self) -> int:
        """Train to the plan's end or its ``stop_at``; returns the step reached."""
        main = self.processes.is_main
        if main:
            self.files.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(
            total=self.plan.total,
            initial=self.step,
            disable=not main,
            unit="step",
            dynamic_ncols=True,
        )
        images_seen, started = 0, time.perf_counter()
        if self.keeper is not None:
            self.keeper.restart_clock()
        batches = self.data.batches(self.step, self.processes)
        while self.step < self.plan.total:
            images, boxes, labels = next(batches)
            terms = self.train_step(images, boxes, labels)
            self.step += 1
            images_seen += images.shape[0] * self.processes.world
            bar.update(1)
            if self.keeper is not None:
                self._set_total(self.keeper.after_step(self.step, self.plan.total), bar)
            if self.step % self.plan.log_every == 0 or self.step == self.plan.total:
                rate = images_seen / (time.perf_counter() - started)
                self._log_step(bar, (self.step - 1) // self.plan.per_epoch + 1, terms, rate)
            epoch_done = self.step % self.plan.per_epoch == 0
            if epoch_done or self.step == self.plan.total:
                self._end_of_epoch(self.step // self.plan.per_epoch, bar)
            if self.step == self.plan.stop_at:
                if main and not epoch_done:
                    save_training_state(self.files.state, self.state())
                    self._plot()
                break
        del batches  # stops the loader processes
        bar.close()
        self.processes.barrier()
        return self.step

    def train_step(self, images: Tensor, boxes: list[Tensor], labels: list[Tensor]) -> list[float]:
        """One optimiser step on a batch; returns the loss terms [total, loc, conf],
        averaged over processes.

        Args:
            images: Tensor[N, 3, S, S], float32, mean-subtracted.
            boxes: per image, Tensor[K, 4] xyxy relative to the image (0..1).
            labels: per image, int64 Tensor[K] of class ids 1..C-1.

        Raises:
            DivergenceError: the loss, or the gradient's norm when it is clipped, is not
                finite (checked before the weights change).
        """
        runtime, opt = self.processes.runtime, self.optimisation
        self.wrapped.train()
        with runtime.autocast():
            loc, conf = self.wrapped(runtime.inputs(images))
        device = runtime.device
        terms = self.loss(loc, conf, [b.to(device) for b in boxes], [c.to(device) for c in labels])
        values = self.processes.mean(torch.stack([terms.total, terms.loc, terms.conf]).detach())
        if not torch.isfinite(values).all():
            total, loc_value, conf_value = values.tolist()
            raise DivergenceError(
                f"non-finite loss at step {self.step + 1} (loss {total}, loc {loc_value}, conf "
                f"{conf_value}); no checkpoint written for it. Lower --lr or use --batch-norm."
            )
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(terms.total).backward()
        if opt.clip_grad_norm:
            opt.scaler.unscale_(opt.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), opt.clip_grad_norm)
            # Clipping scales an infinite gradient by 0: NaN weights under a finite loss, which
            # the loss check above would only catch a step later, and an epoch's end between
            # would fail to save them. fp16's scaler skips such steps itself.
            if not opt.scaler.is_enabled() and not torch.isfinite(norm):
                raise DivergenceError(
                    f"non-finite gradient norm at step {self.step + 1} ({norm.item()}) under a "
                    f"loss of {values[0].item():.4g}; the step is not taken. Lower --lr."
                )
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.scheduler.step()
        if self.averaged is not None:
            self.averaged.update_parameters(self.network)
        return values.tolist()

    @property
    def result(self) -> SSD:
        """The weights the run produces: the moving average when there is one, else the
        network as trained. These are evaluated and written to the checkpoints."""
        if self.averaged is not None:
            return self.averaged.module  # type: ignore[return-value]
        return self.network

    def evaluate(self) -> EvaluationReport:
        """mAP of the current weights on the validation data (the main process only)."""
        if self.validation is None:
            raise RuntimeError("this run has no validation data")
        runtime = self.processes.runtime
        detector = Detector(
            self.result, self.class_names, device=runtime.device, precision=runtime.precision
        )
        try:
            detections, truths = predict_dataset(
                detector,
                self.validation.dataset,
                batch_size=self.validation.batch_size,
                workers=self.validation.workers,
            )
            return score(detections, truths, self.class_names)
        finally:
            self.network.train()

    def state(self) -> TrainingState:
        """What ``restore`` needs to continue this run from its current step."""
        opt = self.optimisation
        architecture = self.network.architecture
        return TrainingState(
            network=self.network.state_dict(),
            optimizer=opt.optimizer.state_dict(),
            scheduler=opt.scheduler.state_dict(),
            scaler=opt.scaler.state_dict(),
            step=self.step,
            best_map=self.best_map,
            rng=torch.get_rng_state(),
            class_names=self.class_names,
            architecture=architecture.to_dict() if architecture else None,
            recipe=self.recipe,
            ema=None if self.averaged is None else self.averaged.state_dict(),
        )

    def restore(self, state: TrainingState, source: Path) -> None:
        """Continue from ``state`` (read from ``source``, named in errors).

        Raises:
            ValueError: the state was trained on other classes or another architecture.
        """
        if state.class_names != self.class_names:
            raise ValueError(
                f"{source}: trained on classes {state.class_names}, but the data "
                f"has {self.class_names}"
            )
        architecture = self.network.architecture
        ours = architecture.to_dict() if architecture else None
        if state.architecture != ours:
            raise ValueError(
                f"{source}: architecture {state.architecture} differs from the requested {ours}"
            )
        opt = self.optimisation
        self.network.load_state_dict(state.network)
        if self.averaged is not None:
            if state.ema is None:
                raise ValueError(f"{source}: was trained without --ema, so it has no average")
            self.averaged.load_state_dict(state.ema)
        opt.optimizer.load_state_dict(state.optimizer)
        opt.scheduler.load_state_dict(state.scheduler)
        opt.scaler.load_state_dict(state.scaler)
        self.step, self.best_map = state.step, state.best_map
        torch.set_rng_state(state.rng)
        logger.info("resumed from %s at step %d", source, self.step)

    # -- reporting and files ----------------------------------------------------------------

    def _end_of_epoch(self, epoch: int, bar: tqdm) -> None:
        """Checkpoint, evaluate when due, keep the best, save the state (main process)."""
        began = self.clock()
        # The run's last step always ends in a full, evaluated epoch end, due or not: under a
        # decaying schedule its weights are often the best, and the time budget keeps time
        # for it ("one final epoch end").
        timed = epoch % self._timed_every == 0 or self.step == self.plan.total
        if self.processes.is_main:
            recipe = {**self.recipe, "step": self.step, "epoch": epoch}
            self._save(self.files.checkpoint, recipe)
            if self._evaluates and timed:
                report = self.evaluate()
                self._log(
                    {
                        "step": self.step,
                        "epoch": epoch,
                        "val_map50": report.map50,
                        "val_map50_voc07": report.map50_voc07,
                        "val_coco_ap": report.coco["ap"],
                    }
                )
                tqdm.write(
                    f"epoch {epoch} step {self.step}: val mAP@0.5 {report.map50:.4f} "
                    f"(VOC07 {report.map50_voc07:.4f}, COCO AP {report.coco['ap']:.4f})"
                )
                if report.map50 > self.best_map:
                    self.best_map = report.map50
                    self._save(self.files.best, {**recipe, "val_map50": report.map50})
            save_training_state(self.files.state, self.state())
            self._plot()
        took = self.clock() - began if timed and self.processes.is_main else None
        self.processes.barrier()
        if self.keeper is not None and timed:
            if self.step < self.plan.total:
                self._set_total(self.keeper.after_epoch_end(self.step, took), bar)
            self.keeper.restart_clock()

    def _set_total(self, total: int | None, bar: tqdm) -> None:
        """End the run at step ``total`` from now on (None: no change); the learning-rate
        curve is stretched or shrunk to end with it."""
        if total is None or total == self.plan.total:
            return
        self.plan = replace(self.plan, total=total)
        curve = self.optimisation.curve
        if curve is not None:
            warmup = curve.warmup
            curve.total = total  # the learning-rate curve ends with the run
            note = curve.scaled_warmup()
            # A warm-up is never shortened silently: said once, when it first is (a time
            # budget then re-plans the run every few steps, moving it by a step or two).
            if note and curve.warmup != warmup and self.processes.is_main and not self._noted:
                logger.info("%s", note)
                self._noted = True
        bar.total = total
        bar.refresh()
        self._log({"step": self.step, "planned_steps": total})

    # -- pictures and files -------------------------------------------------------------

    def _plot(self) -> None:
        """Redraw the curves from the log; a drawing failure costs the picture, not the run."""
        if not self.files.log.is_file():
            return
        try:
            plot_training(self.files.log, self.files.curves)
        except Exception:
            logger.warning("could not draw %s", self.files.curves, exc_info=True)

    def _save(self, path: Path, recipe: dict[str, Any]) -> None:
        save_checkpoint(
            path, self.result, self.class_names, recipe=recipe, dtype=self.files.save_dtype
        )

    def _log_step(self, bar: tqdm, epoch: int, terms: list[float], rate: float) -> None:
        record = {
            "step": self.step,
            "epoch": epoch,
            "loss": terms[0],
            "loc": terms[1],
            "conf": terms[2],
            "lr": self.optimisation.optimizer.param_groups[0]["lr"],
            "images_per_s": rate,
        }
        bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k not in ("step", "epoch")})
        self._log(record)

    def _log(self, record: dict[str, Any]) -> None:
        if self.processes.is_main:
            with self.files.log.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
