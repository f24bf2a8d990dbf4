"""Train an SSD: ``python -m model.train --data D --out W [...]``.

Reads any ``--data`` form of ``model.datasets`` (``voc:PATH[:SPLIT]``, ``coco:IMAGES:JSON``,
``synthetic[:N]``), applies the paper's augmentation, minimises the MultiBox loss with SGD
(momentum 0.9, weight decay 5e-4, as the authors) under a warm-up then step or cosine
schedule, and writes a ``Detector`` checkpoint every epoch. Besides ``--out``:

* ``<out stem>.state.pt``: model, optimiser, scheduler, step and RNG state, for ``--resume``;
* ``<out stem>.best.safetensors``: the best checkpoint by validation mAP@0.5;
* ``<out stem>.jsonl``: one JSON line per logged step and per evaluation.

Runs on several GPUs or nodes under ``torchrun`` (DDP; gloo on the CPU, NCCL on GPUs) with the
same command line. Every random choice is a function of ``--seed``, the epoch and the sample
index, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.checkpoint import load_matching_weights, save_checkpoint
from model.data import load_dataset
from model.data.loader import AugmentedDataset, collate, epoch_batches
from model.data.transforms import EvalTransform, TrainTransform, ZoomOut
from model.default_boxes import PRESETS
from model.detector import PRECISIONS, Detector, resolve_device
from model.evaluate import EvaluationReport, predict_dataset, score
from model.imagenet import load_vgg16_backbone
from model.loss import MultiBoxLoss
from model.schedule import SCHEDULES, lr_factor
from model.ssd import BUILDERS, SSD

logger = logging.getLogger("model.train")

MOMENTUM = 0.9  # ssd_pascal.py solver_param
WEIGHT_DECAY = 5e-4  # ssd_pascal.py solver_param
STATE_FORMAT = "ssd-train-state/1"


class DivergenceError(RuntimeError):
    """The loss stopped being finite; nothing is written after it."""


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m model.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data", required=True, help="voc:PATH[:SPLIT], coco:IMAGES:JSON, synthetic[:N]"
    )
    p.add_argument("--val-data", help="validation data (default: the held-out part of --data)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint to write (.safetensors)")
    p.add_argument("--size", type=int, default=300, choices=[300, 512])
    p.add_argument(
        "--preset", default="voc", choices=PRESETS, help="default-box tiling (model.default_boxes)"
    )
    p.add_argument("--batch-norm", action="store_true", help="BatchNorm after every conv")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = paper)")
    backbone = p.add_mutually_exclusive_group()
    backbone.add_argument("--backbone-weights", type=Path, help="torchvision VGG16(-BN) state dict")
    backbone.add_argument(
        "--init",
        type=Path,
        help="start from this checkpoint's weights where names and shapes fit (fine-tuning)",
    )
    p.add_argument("--classes", help="comma-separated class names (default: from the data)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--ignore-difficult", action="store_true", help="drop VOC difficult objects")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="passes over the training data")
    length.add_argument("--steps", type=int, help="optimiser steps in all")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES)
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument(
        "--clip-grad-norm",
        type=float,
        help="clip the gradient's global L2 norm to this (default: no clipping)",
    )
    p.add_argument("--max-zoom-out", type=float, default=4.0, help="zoom-out ratio (paper: 4)")
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the paper's augmentation (--no-augment: resize only, for debugging)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--resume", type=Path, help="a .state.pt written by an earlier run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval-every", type=int, default=1, help="epochs between evaluations (0: never)"
    )
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--stop-at", type=int, help="stop after this step, resumable (splits long runs)")
    p.add_argument(
        "--save-dtype",
        default="fp32",
        choices=["fp32", "fp16", "bf16"],
        help="dtype of the weights in the written checkpoints",
    )
    args = p.parse_args(argv)
    if args.epochs is None and args.steps is None:
        args.epochs = 1
    return args


def _setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_arg)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


class Trainer:
    """One training run; ``run()`` trains to the end (or ``--stop-at``) and returns the step."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rank, self.world, self.device = _setup_distributed(args.device)
        self.main = self.rank == 0
        if args.batch_norm and args.batch_size < 2:
            # Training-mode BatchNorm cannot normalise the single value of a 1x1 map.
            raise ValueError("--batch-norm needs --batch-size of at least 2")
        torch.manual_seed(args.seed)  # the network's initial weights
        classes = args.classes.split(",") if args.classes else None
        self.train_set = load_dataset(
            args.data,
            split="train",
            val_fraction=args.val_fraction,
            classes=classes,
            use_difficult=not args.ignore_difficult,
        )
        self.class_names = list(self.train_set.class_names)
        self.val_set = None
        if args.eval_every > 0:
            self.val_set = load_dataset(
                args.val_data or args.data,
                split="val",
                val_fraction=args.val_fraction,
                classes=self.class_names,
            )
        builder = BUILDERS[f"ssd{args.size}_vgg16"]
        self.network: SSD = builder(
            len(self.class_names) + 1,
            batch_norm=args.batch_norm,
            preset=args.preset,
            width=args.width,
        )
        if args.backbone_weights:
            load_vgg16_backbone(self.network, args.backbone_weights)
        if args.init:
            copied, fresh = load_matching_weights(self.network, args.init)
            if self.main:
                logger.info(
                    "initialised %d tensors from %s; %d start fresh%s",
                    copied,
                    args.init,
                    len(fresh),
                    f" ({', '.join(fresh)})" if fresh else "",
                )
        self.network.to(self.device)
        if self.device.type == "cpu":
            self.network.to(memory_format=torch.channels_last)
        self.model: torch.nn.Module = self.network
        if self.world > 1:
            self.model = DistributedDataParallel(self.network)
        self.loss = MultiBoxLoss(self.network.default_boxes).to(self.device)
        self.optimizer = torch.optim.SGD(
            self.network.parameters(), lr=args.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        self.steps_per_epoch = len(self.train_set) // (args.batch_size * self.world)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{args.data} has {len(self.train_set)} training images, fewer than one batch of "
                f"{args.batch_size} x {self.world} processes"
            )
        self.total = args.steps or args.epochs * self.steps_per_epoch
        warmup = min(args.warmup_steps, max(1, self.total // 10))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, total=self.total, warmup=warmup, schedule=args.schedule),
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=args.precision == "fp16" and self.device.type == "cuda"
        )
        self.step, self.best_map = 0, -1.0
        stem = args.out.with_suffix("")
        self.state_path = Path(f"{stem}.state.pt")
        self.best_path = Path(f"{stem}.best.safetensors")
        self.log_path = Path(f"{stem}.jsonl")
        self.recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        self.recipe["world_size"] = self.world
        if args.resume:
            self._load_state(args.resume)
        transform = (
            TrainTransform(args.size, zoom_out=ZoomOut(max_ratio=args.max_zoom_out))
            if args.augment
            else EvalTransform(args.size)
        )
        self.dataset = AugmentedDataset(self.train_set, transform, args.seed)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        if self.main:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            logger.info(
                "training %s on %s: %d images, classes %s, %d steps (%d per epoch)",
                self.network.architecture,
                args.data,
                len(self.train_set),
                self.class_names,
                self.total,
                self.steps_per_epoch,
            )
        bar = tqdm(
            total=self.total,
            initial=self.step,
            disable=not self.main,
            unit="step",
            dynamic_ncols=True,
        )
        images_seen, started = 0, time.perf_counter()
        while self.step < self.total:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            for images, boxes, labels in self._batches(epoch, offset):
                terms = self._train_step(images, boxes, labels)
                self.step += 1
                images_seen += images.shape[0] * self.world
                bar.update(1)
                if self.step % args.log_every == 0 or self.step == self.total:
                    rate = images_seen / (time.perf_counter() - started)
                    record = {
                        "step": self.step,
                        "epoch": epoch + 1,
                        "loss": terms[0],
                        "loc": terms[1],
                        "conf": terms[2],
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "images_per_s": rate,
                    }
                    bar.set_postfix(
                        {k: f"{v:.4g}" for k, v in record.items() if k not in ("step", "epoch")}
                    )
                    self._log(record)
                if self.step == args.stop_at or self.step == self.total:
                    break
            epoch_done = self.step % self.steps_per_epoch == 0
            if epoch_done or self.step == self.total:
                self._end_of_epoch(self.step // self.steps_per_epoch)
            if self.step == args.stop_at:
                if self.main and not epoch_done:
                    self._save_state()
                break
        bar.close()
        if self.world > 1:
            dist.barrier()
        return self.step

    def _batches(
        self, epoch: int, offset: int
    ) -> Iterator[tuple[Tensor, list[Tensor], list[Tensor]]]:
        batches = epoch_batches(
            len(self.dataset),
            self.args.batch_size,
            seed=self.args.seed,
            epoch=epoch,
            rank=self.rank,
            world=self.world,
        )[offset:]
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=collate,
            num_workers=self.args.workers,
            persistent_workers=False,
        )
        yield from loader

    def _train_step(
        self, images: Tensor, boxes: list[Tensor], labels: list[Tensor]
    ) -> tuple[float, float, float]:
        self.model.train()
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            loc, conf = self.model(images)
        terms = self.loss(
            loc, conf, [b.to(self.device) for b in boxes], [lab.to(self.device) for lab in labels]
        )
        values = torch.stack([terms.total, terms.loc, terms.conf]).detach()
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        if not torch.isfinite(values).all():
            raise DivergenceError(
                f"non-finite loss at step {self.step + 1} (loss {values[0].item()}, loc "
                f"{values[1].item()}, conf {values[2].item()}); no checkpoint written for it. "
                "Lower --lr or use --batch-norm."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms.total).backward()
        if self.args.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.args.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        total, loc_value, conf_value = values.tolist()
        return total, loc_value, conf_value

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.args.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.args.precision])

    # -- evaluation and checkpoints --------------------------------------------------------

    def _end_of_epoch(self, epoch: int) -> None:
        if not self.main:
            if self.world > 1:
                dist.barrier()
            return
        dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[self.args.save_dtype]
        recipe = {**self.recipe, "step": self.step, "epoch": epoch}
        save_checkpoint(self.args.out, self.network, self.class_names, recipe=recipe, dtype=dtype)
        if self.val_set is not None and epoch % self.args.eval_every == 0:
            report = self.evaluate()
            record = {
                "step": self.step,
                "epoch": epoch,
                "val_map50": report.map50,
                "val_map50_voc07": report.map50_voc07,
                "val_coco_ap": report.coco["ap"],
            }
            self._log(record)
            tqdm.write(
                f"epoch {epoch} step {self.step}: val mAP@0.5 {report.map50:.4f} "
                f"(VOC07 {report.map50_voc07:.4f}, COCO AP {report.coco['ap']:.4f})"
            )
            if report.map50 > self.best_map:
                self.best_map = report.map50
                save_checkpoint(
                    self.best_path,
                    self.network,
                    self.class_names,
                    recipe={**recipe, "val_map50": report.map50},
                    dtype=dtype,
                )
        self._save_state()
        if self.world > 1:
            dist.barrier()

    def evaluate(self) -> EvaluationReport:
        """mAP of the current weights on the validation set (the main process only)."""
        assert self.val_set is not None
        detector = Detector(
            self.network, self.class_names, device=self.device, precision=self.args.precision
        )
        try:
            detections, truths = predict_dataset(
                detector, self.val_set, batch_size=self.args.batch_size, workers=self.args.workers
            )
            return score(detections, truths, self.class_names)
        finally:
            self.network.train()

    def _save_state(self) -> None:
        state = {
            "format": STATE_FORMAT,
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best_map": self.best_map,
            "rng": torch.get_rng_state(),
            "class_names": self.class_names,
            "architecture": self.network.architecture.to_dict()
            if self.network.architecture
            else None,
            "recipe": self.recipe,
        }
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)

    def _load_state(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(f"{path}: cannot read a training state ({exc})") from exc
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: not a training state written by model.train")
        if state["class_names"] != self.class_names:
            raise ValueError(
                f"{path}: trained on classes {state['class_names']}, but the data "
                f"has {self.class_names}"
            )
        architecture = self.network.architecture.to_dict() if self.network.architecture else None
        if state["architecture"] != architecture:
            raise ValueError(
                f"{path}: architecture {state['architecture']} differs from the "
                f"requested {architecture}"
            )
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best_map = state["step"], state["best_map"]
        torch.set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d", path, self.step)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with self.log_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    trainer = None
    try:
        trainer = Trainer(args)
        trainer.run()
    except DivergenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer is not None and trainer.main and trainer.best_map >= 0:
        logger.info("best validation mAP@0.5 %.4f (%s)", trainer.best_map, trainer.best_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
