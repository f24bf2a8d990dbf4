"""What the trainer feeds the network: augmented samples and deterministic batches.

Every random choice is a stream of ``model.data.seeding``, keyed by the seed, the epoch and
the sample index, so a sample looks the same whichever worker makes it, and a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset

from model.data.mosaic import PIECES, Mosaic
from model.data.seeding import Purpose, torch_seed
from model.data.transforms import EvalTransform, TrainTransform


class AugmentedDataset(Dataset):
    """A dataset seen through the training transform, indexed by (epoch, index).

    The augmentation is seeded from the key (seed, AUGMENTATION, epoch, index),
    so a sample's crop and colours do not depend on the worker that makes it or on where a
    run was resumed.

    With ``mosaic``, a share ``mosaic.prob`` of the samples are mosaics of the indexed image
    and three others, drawn (with the mosaic's centre) from the key (seed, MOSAIC, epoch,
    index), and go through ``mosaic_transform`` (default: ``transform``) instead.
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: TrainTransform | EvalTransform,
        seed: int,
        mosaic: Mosaic | None = None,
        mosaic_transform: TrainTransform | EvalTransform | None = None,
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.mosaic = mosaic
        self.mosaic_transform = mosaic_transform or transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        epoch, index = key
        seed = torch_seed(self.seed, Purpose.AUGMENTATION, epoch, index)
        if self.mosaic is not None and self.mosaic.prob > 0.0:
            generator = torch.Generator().manual_seed(
                torch_seed(self.seed, Purpose.MOSAIC, epoch, index)
            )
            if torch.rand((), generator=generator).item() < self.mosaic.prob:
                others = torch.randint(len(self), (PIECES - 1,), generator=generator)
                samples = [self._raw(i) for i in (index, *others.tolist())]
                mosaic = self.mosaic(samples, self.mosaic.draw_centre(generator))
                return self.mosaic_transform(*mosaic, seed)
        return self.transform(*self._raw(index), seed)

    def _raw(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        image, target = self.dataset[index]
        return image, target["boxes"], target["labels"]


def collate(
    batch: list[tuple[Tensor, Tensor, Tensor]],
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Stack images (N, 3, S, S); boxes and labels stay per-image lists."""
    images, boxes, labels = zip(*batch, strict=True)
    return torch.stack(images), list(boxes), list(labels)


def epoch_batches(
    length: int, batch_size: int, *, seed: int, epoch: int, rank: int, world: int
) -> list[list[tuple[int, int]]]:
    """This process's batches of (epoch, index) keys for one epoch; incomplete ones dropped.

    The epoch's order is a permutation drawn from the key (seed, EPOCH_ORDER, epoch); process
    ``rank`` of ``world`` takes every world-th index of each global batch.
    """
    generator = torch.Generator().manual_seed(torch_seed(seed, Purpose.EPOCH_ORDER, epoch))
    order = torch.randperm(length, generator=generator)
    per_step = batch_size * world
    steps = length // per_step
    batches = []
    for s in range(steps):
        chunk = order[s * per_step : (s + 1) * per_step][rank::world]
        batches.append([(epoch, int(i)) for i in chunk])
    return batches


class RunBatches:
    """The batch sampler of a whole run: ``epoch_batches`` of each epoch in turn, from
    ``start_step`` on, without end (the trainer stops taking batches).

    One ``DataLoader`` over it serves every epoch, so its worker processes start once per run
    rather than once per epoch, and they prepare the next epoch's first batches while the
    trainer evaluates. Batch ``k`` of the stream is the run's step ``start_step + k``, the
    batch an uninterrupted run takes at that step.
    """

    def __init__(
        self, length: int, batch_size: int, *, seed: int, rank: int, world: int, start_step: int
    ) -> None:
        self.per_epoch = length // (batch_size * world)
        if self.per_epoch == 0:
            raise ValueError(f"{length} samples make no batch of {batch_size} x {world}")
        self.length, self.batch_size = length, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.start_step = start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = divmod(self.start_step, self.per_epoch)
        while True:
            yield from epoch_batches(
                self.length,
                self.batch_size,
                seed=self.seed,
                epoch=epoch,
                rank=self.rank,
                world=self.world,
            )[offset:]
            epoch, offset = epoch + 1, 0
