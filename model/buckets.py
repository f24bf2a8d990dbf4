"""Bucketed batch sizes: a batch of any size is run at the next of a few fixed sizes.

A captured forward pass (a CUDA graph) replays one fixed input shape, so each batch size needs
its own capture. Rounding the size up to a bucket keeps the captures few, at the cost of
computing some padding images whose outputs are cut away. Every layer of the network works
per image in eval mode (convolutions, ReLU, pooling, L2Norm, BatchNorm with its running
statistics), so the padding never changes the real images' outputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

# Powers of two: padding at most doubles a batch's work (one image over a bucket is the worst
# case), and seven captures cover batches up to 64, the size NVIDIA's SSD300 reference is
# timed at on one GPU. Larger batches (SSD_MAX_BATCH_SIZE allows 256) run unbucketed.
BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """``buckets`` as a tuple, checked to be positive and strictly increasing.

    Raises:
        ValueError: empty, not increasing, or holding a size below 1 (the message gives them).
    """
    sizes = tuple(int(b) for b in buckets)
    if not sizes or sizes[0] < 1 or any(a >= b for a, b in itertools.pairwise(sizes)):
        raise ValueError(f"buckets must be increasing sizes >= 1, got {tuple(buckets)}")
    return sizes


def bucket_for(count: int, buckets: Sequence[int] = BUCKETS) -> int | None:
    """The smallest bucket that holds ``count`` images (``buckets`` increasing), or None when
    ``count`` is above the largest (the caller then runs the batch unbucketed).

    Raises:
        ValueError: ``count`` < 1.
    """
    if count < 1:
        raise ValueError(f"a batch holds at least 1 image, got {count}")
    return next((size for size in buckets if size >= count), None)


def fill_padded(buffer: Tensor, batch: Tensor) -> Tensor:
    """Copy ``batch`` Tensor[N, ...] into the first N rows of ``buffer`` Tensor[B, ...]
    (B >= N, same trailing shape) and zero the other B - N; returns ``buffer``.

    The copy keeps ``buffer``'s memory layout (channels_last stays channels_last) and its
    storage, which is what a captured forward needs: it reads its input from a fixed address.

    Raises:
        ValueError: the batch does not fit the buffer.
    """
    count = batch.shape[0]
    if batch.shape[1:] != buffer.shape[1:] or count > buffer.shape[0]:
        raise ValueError(
            f"a batch of shape {tuple(batch.shape)} does not fit a buffer of shape "
            f"{tuple(buffer.shape)}"
        )
    buffer[:count].copy_(batch, non_blocking=True)
    buffer[count:].zero_()
    return buffer


def bucket_buffer(batch: Tensor, size: int) -> Tensor:
    """A zero Tensor[size, ...] shaped like ``batch`` Tensor[N, ...] past dim 0, in its dtype,
    device and memory layout (channels_last stays channels_last)."""
    # (N, C, H, W) -> (size, C, H, W): only dim 0 differs.
    buffer = batch.new_zeros((size, *batch.shape[1:]))
    return buffer.contiguous(memory_format=layout_of(batch))


def pad_to(batch: Tensor, size: int) -> Tensor:
    """A new Tensor[size, ...]: ``batch`` Tensor[N, ...] (N <= size) followed by zeros."""
    return fill_padded(bucket_buffer(batch, size), batch)


def layout_of(batch: Tensor) -> torch.memory_format:
    """channels_last when ``batch`` Tensor[N, C, H, W] is laid out so (and not also plainly
    contiguous, as a 1-channel or 1x1 batch can be), else the default layout."""
    channels_last = batch.dim() == 4 and not batch.is_contiguous()
    if channels_last and batch.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
