"""Train an SSD: ``python -m model.train --data D --out W [...]``.

Reads any ``--data`` form of ``model.data`` (``voc:PATH[:SPLIT]``, ``coco:IMAGES:JSON``,
``synthetic[:N]``), applies the paper's augmentation, minimises the MultiBox loss with SGD
(momentum 0.9, weight decay 5e-4, as the authors; or AdamW with ``--optimizer adamw``) under
a warm-up then step or cosine schedule, and writes a ``Detector`` checkpoint every epoch.
From random weights (no ``--init``, no ``--backbone-weights``) the flags not given default to a
stable start (BatchNorm, a capped gradient norm, and ``--recipe small-scratch``'s batch size,
learning rate and warm-up); from trained weights, to the paper's. The log's first
lines say which, and how a run too short for its warm-up scales it down.
Besides ``--out``:

* ``<out stem>.state.safetensors``: model, optimiser, scheduler, step and RNG state, for
  ``--resume`` (safetensors with JSON metadata; nothing pickled);
* ``<out stem>.best.safetensors``: the best checkpoint by validation mAP@0.5;
* ``<out stem>.jsonl``: one JSON line per logged step and per evaluation;
* ``<out stem>.int8.safetensors`` and ``<out stem>.best.int8.safetensors``: the INT8 artifacts
  of the final and best checkpoints (``Detector.load(..., precision="int8")``, and a candidate
  of ``auto`` on CPUs while int8 stays within the mAP guard on the validation images),
  calibrated on the first ``--calibration`` training images (``model.evaluation.int8_guard``);
  ``--calibration 0`` skips them.

Runs on several GPUs or nodes under ``torchrun`` (DDP; gloo on the CPU, NCCL on GPUs) with the
same command line. Every random choice is a function of ``--seed``, the epoch and the sample
index, so a resumed run sees exactly the batches an uninterrupted one would.

This module is the command line: it reads the arguments and builds the parts; the loop is
``model.training.trainer.Trainer``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.data import SPEC_FORMS, load_dataset, split_spec
from model.data.loader import AugmentedDataset
from model.data.mosaic import Mosaic
from model.data.transforms import EvalTransform, TrainTransform, ZoomOut
from model.evaluation.int8_guard import CALIBRATION_IMAGES, ImageSet, make_int8_artifact
from model.inference.autotune import candidates, choose_training_precision
from model.inference.int8 import artifact_is_current
from model.inference.runtime import PRECISIONS, Runtime
from model.network.box_fitting import fit_default_boxes
from model.network.default_boxes import FITTED, PRESETS
from model.network.loss import MultiBoxLoss
from model.network.ssd import BUILDERS, SSD, feature_map_sides
from model.training.budget import TimeBudget
from model.training.distributed import Processes
from model.training.schedule import SCHEDULES, LrCurve
from model.training.trainer import (
    DivergenceError,
    Optimisation,
    StepPlan,
    Trainer,
    TrainingData,
    Validation,
)
from model.weights.checkpoint import (
    RunFiles,
    copy_matching_weights,
    load_checkpoint,
    load_training_state,
)
from model.weights.imagenet import load_vgg16_backbone

logger = logging.getLogger("model.train")

MOMENTUM = 0.9  # ssd_pascal.py solver_param
WEIGHT_DECAY = 5e-4  # ssd_pascal.py solver_param
# AdamW's decoupled weight decay: torch.optim.AdamW's default. Betas are its defaults too.
ADAMW_WEIGHT_DECAY = 1e-2
OPTIMIZERS = ("sgd", "adamw")
# --minutes starts on a plan this many epochs long (a warm-up of --warmup-steps), until the
# budget has timed some steps and sets the real length.
_UNPLANNED_EPOCHS = 1000
SAVE_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# Named recipes: defaults for a group of flags, chosen by measurement (README, "Your own
# data"); a flag given on the command line wins over its recipe's value.
RECIPES: dict[str, dict[str, Any]] = {
    # From scratch on a few hundred photos on a small CPU: a BatchNorm network at a quarter of
    # the paper's width (ScratchDet's BatchNorm everywhere with a large learning rate), the
    # gradient norm capped, cosine decay, half the samples made mosaics, and a moving average
    # of the weights evaluated every 5 epochs to keep the best: the raw weights' validation
    # mAP collapses for an evaluation now and then at this learning rate, the average's does
    # not. Batches of 8 at 0.01 (batches of 16 at 0.02 halved, the linear scaling rule), with
    # the warm-up (100 steps) and the average (0.99: about 100 steps) over as many photos as
    # at 16, since on raccoon they ended better than batches of 16; a slower average lags and
    # AdamW did worse. The precision is timed on a training step (--precision auto), since
    # where bf16 steps run faster a time budget holds more of them. The runs behind these
    # choices, with their machines and figures: docs/performance-notes.md.
    "small-scratch": {
        "batch_norm": True,
        "width": 0.25,
        "batch_size": 8,
        "lr": 0.01,
        "clip_grad_norm": 5.0,
        "warmup_steps": 100,
        "schedule": "cosine",
        "eval_every": 5,
        "mosaic": 0.5,
        "ema": 0.99,
        "precision": "auto",
    },
    # Fine-tuning a trained detector (--init torchvision:coco, ssd.pytorch:PATH or one of our
    # checkpoints) on a few hundred photos: the full-width network as the weights have it, the
    # references' SGD (momentum 0.9, weight decay 5e-4) at their learning rate per image --
    # torchvision's SSD300 reference 0.002 for 32 images a batch, ssd.pytorch 0.001 for 32 --
    # taken at torchvision's and scaled to batches of 8 (the linear scaling rule): 5e-4; a
    # linear warm-up (torchvision's reference warms up for its first epoch, up to 1000
    # steps; 100 steps is about 5 epochs of 160 photos) so the fresh class head does not
    # wreck the trained base; the references' step schedule (x0.1 at 2/3 and 5/6 of the run,
    # as ssd.pytorch's 80k/100k of 120k). Its accuracy is not measured here (README).
    "finetune": {
        "batch_size": 8,
        "lr": 5e-4,
        "warmup_steps": 100,
        "schedule": "step",
        "precision": "auto",
    },
}
# The flags a random start (no --init, no --backbone-weights) takes from small-scratch when
# neither they nor a --recipe are given: the ones its stability rests on. The paper's recipe
# (no BatchNorm, no clipping, lr 1e-3 for 32 images) assumes ImageNet weights; from random
# weights a VGG without BatchNorm diverged at it within 4 steps (issue #23: loss 9.9, 182.7,
# 1.35e6, NaN). BatchNorm, the gradient-norm cap and the warm-up keep the first steps small,
# and small-scratch's learning rate was measured with them (and with its batch size, since the
# rate is per batch: the linear scaling rule). Its width, mosaics, average and precision are
# choices for speed and accuracy, not stability: a plain run keeps the paper's.
SCRATCH_FLAGS = ("batch_norm", "batch_size", "lr", "clip_grad_norm", "warmup_steps")
SCRATCH_DEFAULTS = {name: RECIPES["small-scratch"][name] for name in SCRATCH_FLAGS}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m model.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_data_arguments(parser)
    _add_network_arguments(parser)
    _add_optimisation_arguments(parser)
    _add_run_arguments(parser)
    chosen, _ = parser.parse_known_args(argv)
    if chosen.recipe:
        parser.set_defaults(**RECIPES[chosen.recipe])
    elif not (chosen.init or chosen.backbone_weights):
        parser.set_defaults(**SCRATCH_DEFAULTS)
    args = parser.parse_args(argv)
    if args.epochs is None and args.steps is None and args.minutes is None:
        args.epochs = 1
    if args.minutes is not None and args.minutes <= 0:
        parser.error(f"--minutes must be positive, got {args.minutes}")
    if args.ema is not None and not 0.0 < args.ema < 1.0:
        parser.error(f"--ema must be between 0 and 1, got {args.ema}")
    if not 0.0 <= args.mosaic <= 1.0:
        parser.error(f"--mosaic must be between 0 and 1, got {args.mosaic}")
    if args.recipe == "finetune" and not args.init:
        parser.error(
            "--recipe finetune starts from a trained detector: give --init (torchvision:coco, "
            "ssd.pytorch:PATH or a checkpoint)"
        )
    return args


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("data")
    p.add_argument("--data", required=True, help=SPEC_FORMS)
    p.add_argument(
        "--val-data",
        help="validation data, its 'val' part (default: the 'val' part of --data's dataset; "
        "docs/training.md, 'Splits')",
    )
    p.add_argument("--classes", help="comma-separated class names (default: from the data)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="the part of a dataset without split files held out as its 'val' part (none "
        "of --data when --val-data names another dataset)",
    )
    p.add_argument("--ignore-difficult", action="store_true", help="drop VOC difficult objects")
    p.add_argument("--max-zoom-out", type=float, default=4.0, help="zoom-out ratio (paper: 4)")
    p.add_argument(
        "--mosaic",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="make this share of the training samples mosaics of four images (YOLOv4; not "
        "in the paper), then crop and flip them as photos (default 0: none)",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the paper's augmentation (--no-augment: resize only, for debugging)",
    )
    p.add_argument("--workers", type=int, default=2, help="data loader processes")


def _add_network_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("network")
    p.add_argument("--size", type=int, default=300, choices=[300, 512])
    p.add_argument(
        "--preset",
        choices=(*PRESETS, FITTED),
        help="default-box tiling (model.network.default_boxes; default: --init's, else voc); "
        f"{FITTED}: sizes and aspect ratios fitted to the training boxes, recorded in the "
        "checkpoint (model.network.box_fitting)",
    )
    p.add_argument(
        "--batch-norm",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="BatchNorm after every conv (default: on from a random start, off with --init or "
        "--backbone-weights, as the paper)",
    )
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = paper)")
    backbone = p.add_mutually_exclusive_group()
    backbone.add_argument(
        "--backbone-weights",
        metavar="imagenet|PATH",
        help="ImageNet VGG16 weights: 'imagenet' fetches torchvision's (VGG16-BN with "
        "--batch-norm) into torch's cache; or a VGG16(-BN) state dict file",
    )
    backbone.add_argument(
        "--init",
        metavar="CHECKPOINT|torchvision:coco|ssd.pytorch:PATH",
        help="start from this checkpoint's or published detector's weights where names and "
        "shapes fit (fine-tuning; other classes get a fresh class head)",
    )


def _add_optimisation_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("optimisation")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="passes over the training data")
    length.add_argument("--steps", type=int, help="optimiser steps in all")
    length.add_argument(
        "--minutes",
        type=float,
        help="train for this much wall time: the steps that fit, measured as the run goes "
        "(the learning-rate schedule is fitted to them); the best checkpoint is kept",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help=f"per process (default: {SCRATCH_DEFAULTS['batch_size']} from a random start, else "
        "32 as the paper)",
    )
    p.add_argument(
        "--optimizer",
        default="sgd",
        choices=OPTIMIZERS,
        help="sgd: the authors' (momentum 0.9, weight decay 5e-4); adamw: torch's AdamW "
        "(weight decay 0.01)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help=f"base learning rate (default: {SCRATCH_DEFAULTS['lr']} from a random start, else "
        "0.001 as the paper)",
    )
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES)
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=500,
        help="linear warm-up, scaled down in a run too short for it, as the log says "
        f"(default: {SCRATCH_DEFAULTS['warmup_steps']} from a random start, else 500)",
    )
    p.add_argument(
        "--clip-grad-norm",
        type=float,
        help="clip the gradient's global L2 norm to this (default: "
        f"{SCRATCH_DEFAULTS['clip_grad_norm']} from a random start, else no clipping; 0: none)",
    )
    p.add_argument(
        "--ema",
        type=float,
        metavar="DECAY",
        help="evaluate and save a moving average of the weights, updated every step with "
        "this decay (e.g. 0.995: about the last 200 steps)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--recipe",
        choices=RECIPES,
        help="defaults for a group of the flags above, measured for a use (README); flags "
        "given on the command line still win; small-scratch: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in flags.items())
            for name, flags in RECIPES.items()
        ),
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("run")
    p.add_argument("--out", required=True, type=Path, help="checkpoint to write (.safetensors)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["auto", *sorted(PRECISIONS)],
        help="autocast precision; auto times a training step in each precision the device "
        "offers (fp32 and bf16 on a CPU) and trains in the fastest",
    )
    p.add_argument("--resume", type=Path, help="a .state.safetensors written by an earlier run")
    p.add_argument(
        "--eval-every", type=int, default=1, help="epochs between evaluations (0: never)"
    )
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--stop-at", type=int, help="stop after this step, resumable (splits long runs)")
    p.add_argument(
        "--calibration",
        type=int,
        default=CALIBRATION_IMAGES,
        metavar="N",
        help="calibrate the INT8 artifacts of the final and best checkpoints on the first N "
        "training images, guarded on the validation images (0: write none)",
    )
    p.add_argument(
        "--save-dtype",
        default="fp32",
        choices=SAVE_DTYPES,
        help="dtype of the weights in the written checkpoints",
    )


def defaults_in_use(args: argparse.Namespace) -> str:
    """One line for the log: which defaults the run's flags came from, and why."""
    values = ", ".join(f"{k.replace('_', '-')} {getattr(args, k)}" for k in SCRATCH_FLAGS)
    if args.recipe:
        return f"defaults: --recipe {args.recipe} ({values}; flags given win)"
    if args.init or args.backbone_weights:
        start = "--init" if args.init else "--backbone-weights"
        return (
            f"defaults: the paper's ({values}; flags given win), as the network starts from "
            f"{start} weights"
        )
    return (
        f"defaults: small-scratch's stable start ({values}; flags given win), as the network "
        "starts from random weights (no --init or --backbone-weights), where the paper's "
        "recipe diverges"
    )


def build_trainer(
    args: argparse.Namespace,
    started: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Trainer:
    """The run the arguments describe: data, network, optimisation and files, put together
    (resumed from ``--resume`` when given). Under ``torchrun`` this joins the process group.
    ``--minutes`` counts on ``clock`` from ``started`` (default now).

    Raises:
        ValueError: the arguments or the data cannot make a run; the message says why.
    """
    if args.batch_norm and args.batch_size < 2:
        # Training-mode BatchNorm cannot normalise the single value of a 1x1 map.
        raise ValueError("--batch-norm needs --batch-size of at least 2")
    measure = args.precision == "auto"
    processes = Processes.start(args.device, "fp32" if measure else args.precision)
    torch.manual_seed(args.seed)  # the network's initial weights
    train_set, validation = _datasets(args)
    if processes.is_main:
        logger.info("%s", split_summary(train_set, validation))
    class_names = list(train_set.class_names)
    network = _network(args, train_set, is_main=processes.is_main)
    processes.runtime.place(network)
    plan = _plan(args, len(train_set), processes.world)
    loss = MultiBoxLoss(network.default_boxes).to(processes.runtime.device)
    if measure:
        processes = _measured_precision(processes, network, loss, args.batch_size)
    transform = (
        TrainTransform(args.size, zoom_out=ZoomOut(max_ratio=args.max_zoom_out))
        if args.augment
        else EvalTransform(args.size)
    )
    mosaic, mosaic_transform = None, None
    if args.augment and args.mosaic > 0:
        mosaic = Mosaic(args.mosaic, args.size)
        # A mosaic already shows its scenes at half size (zoomed out by 2): it is not zoomed
        # out again, or its objects would shrink to an eighth.
        mosaic_transform = TrainTransform(args.size, zoom_out=ZoomOut(prob=0.0))
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    recipe["precision"] = processes.runtime.precision  # what ran, "auto" measured
    trainer = Trainer(
        network,
        loss=loss,
        optimisation=_optimisation(args, network, plan.total, processes),
        data=TrainingData(
            AugmentedDataset(train_set, transform, args.seed, mosaic, mosaic_transform),
            batch_size=args.batch_size,
            seed=args.seed,
            workers=args.workers,
        ),
        plan=plan,
        files=RunFiles(args.out, save_dtype=SAVE_DTYPES[args.save_dtype]),
        class_names=class_names,
        processes=processes,
        validation=validation,
        recipe={**recipe, "world_size": processes.world},
        budget=_budget(args, clock() if started is None else started, clock),
    )
    if args.resume:
        trainer.restore(load_training_state(args.resume), args.resume)
    return trainer


def _measured_precision(
    processes: Processes, network: SSD, loss: MultiBoxLoss, batch_size: int
) -> Processes:
    """``processes`` with the precision ``--precision auto`` measured on a training step
    (``model.inference.autotune.choose_training_precision``), ``network`` placed for it. Every
    process measures; all train in the main process's choice, as clocks differ between
    processes."""
    device = processes.runtime.device
    choice = choose_training_precision(network, loss, device, batch_size)
    names = candidates(device)
    chosen = names[processes.agree(names.index(choice.precision))]
    if processes.is_main:
        logger.info("%s", choice.summary(rate="training images/s"))
    measured = dataclasses.replace(processes, runtime=Runtime(device, chosen))
    measured.runtime.place(network)
    return measured


def _datasets(args: argparse.Namespace) -> tuple[Any, Validation | None]:
    """The training set, and the validation data unless ``--eval-every 0``.

    The training set is the "train" part of ``--data``; validation the "val" part of
    ``--val-data``, or without it of ``--data``'s dataset (its ``:SPLIT`` dropped). Where both
    name one dataset they are its two parts, so they never share an image; where
    ``--val-data`` names another dataset and ``--data`` names no part, ``--data`` is used
    whole (or its split file's "train" images): nothing of it is held out."""
    source, part = split_spec(args.data)
    whole = part is None and not _same_dataset(args.val_data or source, source)
    train_set = load_dataset(
        args.data,
        split="train",
        val_fraction=0.0 if whole else args.val_fraction,
        classes=args.classes.split(",") if args.classes else None,
        use_difficult=not args.ignore_difficult,
    )
    if args.eval_every <= 0:
        return train_set, None
    val_set = _val_set(args, train_set)
    return train_set, Validation(val_set, batch_size=args.batch_size, workers=args.workers)


def _val_set(args: argparse.Namespace, train_set: Any) -> Any:
    """The validation images (``_datasets``' rule), with ``train_set``'s classes."""
    return load_dataset(
        _val_spec(args),
        split="val",
        val_fraction=args.val_fraction,
        classes=list(train_set.class_names),
    )


def _val_spec(args: argparse.Namespace) -> str:
    return args.val_data or split_spec(args.data)[0]


def write_int8_artifacts(args: argparse.Namespace, files: RunFiles) -> None:
    """The INT8 artifacts of the run's final and best checkpoints (those present and without
    a current one), calibrated on ``--data``'s training images and guarded on the
    validation images; each outcome logged."""
    train_set, validation = _datasets(args)
    val_set = validation.dataset if validation else _val_set(args, train_set)
    calibration = ImageSet(train_set, args.data, "train")
    guard = ImageSet(val_set, _val_spec(args), "val")
    for checkpoint in (files.checkpoint, files.best):
        if not checkpoint.is_file() or artifact_is_current(checkpoint):
            continue
        result = make_int8_artifact(
            checkpoint,
            calibration,
            guard,
            count=args.calibration,
            batch_size=args.batch_size,
        )
        logger.info("INT8 of %s: %s", checkpoint.name, result.summary())


def _same_dataset(spec: str, other: str) -> bool:
    """Whether two ``--data`` specs name one dataset, whatever part each names (paths
    compared resolved)."""

    def key(spec: str) -> tuple[str, ...]:
        kind, _, rest = split_spec(spec)[0].partition(":")
        return kind, *(str(Path(piece).resolve()) for piece in rest.split(":") if piece)

    return key(spec) == key(other)


def split_summary(train_set: Any, validation: Validation | None) -> str:
    """One line for the log: how many images train and validate, and where each comes from
    (the datasets' names say the file or the holdout); images in both are counted."""
    line = f"split: training on {len(train_set)} images of {train_set.name}"
    if validation is None:
        return f"{line}; no validation (--eval-every 0)"
    val_set = validation.dataset
    line += f"; validating on {len(val_set)} images of {val_set.name}"
    paths = [{r.path.resolve() for r in getattr(d, "records", [])} for d in (train_set, val_set)]
    shared = len(paths[0] & paths[1])
    return f"{line}; {shared} images in both" if shared else line


def _network(args: argparse.Namespace, train_set: Any, *, is_main: bool) -> SSD:
    """A fresh network for ``train_set``'s classes (plus background), with
    ``--backbone-weights`` or ``--init`` loaded into it, and its default boxes fitted to
    ``train_set``'s under ``--preset fitted``."""
    class_names = list(train_set.class_names)
    builder = BUILDERS[f"ssd{args.size}_vgg16"]
    init = load_checkpoint(args.init) if args.init else None
    # The default boxes the --init weights were trained with, unless --preset asks otherwise.
    source = init.network.architecture if init else None
    box_sizes = None
    if args.preset is None:
        args.preset = source.preset if source else "voc"
        if source and source.box_sizes is not None and source.size == args.size:
            box_sizes = source.box_sizes
    if args.preset == FITTED and box_sizes is None:
        boxes = [annotation.relative() for annotation in train_set.annotations()]
        fit = fit_default_boxes(
            np.concatenate(boxes or [np.zeros((0, 4))]),
            args.size,
            feature_map_sides(args.size),
            seed=args.seed,
        )
        box_sizes = fit.spec.sizes()
        if is_main:
            logger.info("%s", fit.summary())
    clip = source.clip_boxes if source and source.preset == args.preset else "none"
    network = builder(
        len(class_names) + 1,
        batch_norm=args.batch_norm,
        preset=args.preset,
        width=args.width,
        clip_boxes=clip,
        box_sizes=box_sizes,
    )
    if args.backbone_weights:
        load_vgg16_backbone(network, args.backbone_weights)
    if init:
        copied, fresh = copy_matching_weights(network, init.network, args.init)
        if is_main:
            logger.info(
                "initialised %d tensors from %s; %d start fresh%s",
                copied,
                args.init,
                len(fresh),
                f" ({', '.join(fresh)})" if fresh else "",
            )
    return network


def _budget(
    args: argparse.Namespace, started: float, clock: Callable[[], float]
) -> TimeBudget | None:
    if args.minutes is None:
        return None
    return TimeBudget(deadline=started + 60.0 * args.minutes, clock=clock)


def _plan(args: argparse.Namespace, images: int, world: int) -> StepPlan:
    """Step counts from ``--epochs``, ``--steps`` or, provisionally, ``--minutes`` over
    ``images`` training images."""
    per_epoch = images // (args.batch_size * world)
    if per_epoch == 0:
        raise ValueError(
            f"{args.data} has {images} training images, fewer than one batch of "
            f"{args.batch_size} x {world} processes"
        )
    return StepPlan(
        # Under --minutes, a start the time budget replaces once steps have been timed.
        total=args.steps or (args.epochs or _UNPLANNED_EPOCHS) * per_epoch,
        per_epoch=per_epoch,
        log_every=args.log_every,
        eval_every=args.eval_every,
        stop_at=args.stop_at,
    )


def _optimisation(
    args: argparse.Namespace, network: SSD, total: int, processes: Processes
) -> Optimisation:
    """``--optimizer`` (SGD with the authors' momentum and weight decay, or AdamW) under a
    warm-up then ``--schedule``."""
    optimizer: torch.optim.Optimizer
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(
            network.parameters(), lr=args.lr, weight_decay=ADAMW_WEIGHT_DECAY
        )
    else:
        optimizer = torch.optim.SGD(
            network.parameters(), lr=args.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
    curve = LrCurve(total=total, warmup_limit=args.warmup_steps, schedule=args.schedule)
    # Through a function, not the object: LambdaLR saves a callable object's attributes in the
    # state and a resumed run would get the old run's length back, while a resumed run follows
    # this run's --steps (a larger one stretches the curve) or its --minutes.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: curve(step))
    return Optimisation(
        optimizer,
        scheduler,
        processes.runtime.grad_scaler(),
        clip_grad_norm=args.clip_grad_norm,
        curve=curve,
        ema_decay=args.ema,
    )


def main(argv: Sequence[str] | None = None, clock: Callable[[], float] = time.monotonic) -> int:
    """Train as the arguments say; returns the exit status (0 done, 2 bad input such as a
    missing file or unusable data, 3 the loss diverged). ``--minutes`` runs on ``clock``
    (tests give a fake one, so that what fits does not depend on the machine's speed)."""
    started = clock()
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    trainer = None
    try:
        trainer = build_trainer(args, started, clock)
        if trainer.processes.is_main:
            logger.info("%s", defaults_in_use(args))
            curve = trainer.optimisation.curve
            if curve is not None and (note := curve.scaled_warmup()):
                logger.info("%s", note)
            length = f"{args.minutes:g} minutes" if args.minutes else f"{trainer.plan.total} steps"
            logger.info(
                "training %s on %s: %d images, classes %s, %s (%d steps per epoch)",
                trainer.network.architecture,
                args.data,
                len(trainer.data),
                trainer.class_names,
                length,
                trainer.plan.per_epoch,
            )
        trainer.run()
    except DivergenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        Processes.stop()
    if trainer.processes.is_main and trainer.best_map >= 0:
        logger.info("best validation mAP@0.5 %.4f (%s)", trainer.best_map, trainer.files.best)
    if trainer.processes.is_main and args.calibration > 0:
        try:
            write_int8_artifacts(args, trainer.files)
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: INT8 artifact: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
