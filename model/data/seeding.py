"""The project's one seeding scheme: every random stream is named by a tuple of integers.

A stream's key is ``(seed, purpose, *more)``: ``seed`` is the run's ``--seed`` (or a dataset's
own), ``purpose`` one of ``Purpose`` below, and ``more`` the integers that tell its draws apart
(an epoch, a sample index). The key goes through numpy's ``SeedSequence``, which hashes a
sequence of integers of any size with a fixed algorithm (NEP 19 keeps it, and the bit
generators' streams, the same across numpy releases), so a stream is the same in every
process, on every machine and under every Python version; Python's ``hash`` of a tuple is
not (it is salted for strings, and its algorithm is an implementation detail). Distinct keys
give independent streams. ``purpose`` sits at a fixed position because ``SeedSequence`` pads
short keys with zeros (``(1, 2, 3)`` and ``(1, 2, 3, 0)`` are one stream): keys of one purpose
always have one length, and keys of two purposes differ in their second word.

The synthetic generator was the first user, with the key ``(seed, split, index)`` and splits
0, 1, 2; those stay its purposes so that its images (and the shipped model's data) are
unchanged.
"""

from __future__ import annotations

import operator
from enum import IntEnum

import numpy as np

__all__ = ["Purpose", "numpy_generator", "seed_sequence", "text_key", "torch_seed"]


class Purpose(IntEnum):
    """The second word of a key: what the stream is for."""

    SYNTHETIC_TRAIN = 0  # model.data.synthetic, key (seed, purpose, index)
    SYNTHETIC_VAL = 1
    SYNTHETIC_TEST = 2
    AUGMENTATION = 3  # model.data.loader, key (seed, purpose, epoch, index)
    EPOCH_ORDER = 4  # model.data.loader, key (seed, purpose, epoch)
    HOLDOUT = 5  # model.data.voc, key (0, purpose, text_key(stem)): --seed plays no part
    MOSAIC = 6  # model.data.loader, key (seed, purpose, epoch, index)


def seed_sequence(seed: int, purpose: Purpose, *more: int) -> np.random.SeedSequence:
    """The ``SeedSequence`` of the key ``(seed, purpose, *more)``; all non-negative integers."""
    key = tuple(operator.index(k) for k in (seed, purpose, *more))  # any integer type
    if any(k < 0 for k in key):
        raise ValueError(f"a seed key holds non-negative integers, got {key}")
    return np.random.SeedSequence(key)


def numpy_generator(seed: int, purpose: Purpose, *more: int) -> np.random.Generator:
    """A numpy ``Generator`` (PCG64) drawing the stream of the key ``(seed, purpose, *more)``."""
    return np.random.default_rng(seed_sequence(seed, purpose, *more))


def torch_seed(seed: int, purpose: Purpose, *more: int) -> int:
    """An integer in [0, 2**63) for ``torch.manual_seed``: the key stream's first 64-bit word.

    The top bit is dropped so that the seed is also a valid non-negative int64.
    """
    word = int(seed_sequence(seed, purpose, *more).generate_state(1, dtype=np.uint64)[0])
    return word & (2**63 - 1)


def text_key(text: str) -> int:
    """A string as one key word: the integer whose big-endian bytes are its UTF-8 encoding."""
    return int.from_bytes(text.encode("utf-8"), "big")
