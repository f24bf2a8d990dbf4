import itertools

import pytest
import torch

from model.data.loader import AugmentedDataset, RunBatches, collate, epoch_batches
from model.data.synthetic import SyntheticShapes
from model.data.transforms import EvalTransform, TrainTransform


def test_epoch_batches_split_across_processes_without_overlap():
    ranks = [epoch_batches(20, 3, seed=0, epoch=2, rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 20 // (3 * 2)
    seen = [key for batches in ranks for batch in batches for key in batch]
    assert len(seen) == len(set(seen)) == 18
    assert epoch_batches(20, 3, seed=0, epoch=2, rank=0, world=2) == ranks[0]
    assert epoch_batches(20, 3, seed=0, epoch=3, rank=0, world=2) != ranks[0]


def test_augmented_samples_depend_only_on_seed_epoch_and_index():
    data = AugmentedDataset(SyntheticShapes(4), TrainTransform(300), seed=5)
    a, b = data[(1, 2)], data[(1, 2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(data[(2, 2)][0], a[0])  # another epoch, another augmentation


def test_collate_keeps_targets_per_image():
    data = AugmentedDataset(SyntheticShapes(2), EvalTransform(300), seed=0)
    images, boxes, labels = collate([data[(0, 0)], data[(0, 1)]])
    assert images.shape == (2, 3, 300, 300)
    assert [b.shape[0] for b in boxes] == [lab.shape[0] for lab in labels]


def test_run_batches_go_on_epoch_after_epoch_from_any_step():
    # 10 samples in batches of 3: 3 batches an epoch, the last sample of each epoch dropped.
    epochs = [epoch_batches(10, 3, seed=1, epoch=e, rank=0, world=1) for e in range(4)]
    every_step = [batch for epoch in epochs for batch in epoch]
    stream = RunBatches(10, 3, seed=1, rank=0, world=1, start_step=4)
    # Step 4 is the second batch of epoch 1; the stream crosses into epochs 2 and 3.
    assert list(itertools.islice(stream, 7)) == every_step[4:11]
    assert [key[0] for key in every_step[4]] == [1, 1, 1]
    assert (
        list(itertools.islice(RunBatches(10, 3, seed=1, rank=0, world=1, start_step=0), 3))
        == (epochs[0])
    )
    with pytest.raises(ValueError, match="make no batch of 3 x 2"):
        RunBatches(5, 3, seed=1, rank=0, world=2, start_step=0)
