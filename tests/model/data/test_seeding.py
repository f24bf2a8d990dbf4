import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.data.loader import epoch_batches
from model.data.seeding import Purpose, numpy_generator, seed_sequence, text_key, torch_seed

ROOT = Path(__file__).resolve().parents[3]

# Every use of the scheme, as JSON-able values, computed the same way in and out of process.
_SNIPPET = """
import json
from model.data.loader import epoch_batches
from model.data.seeding import Purpose, numpy_generator, torch_seed
from model.data.base import holdout
print(json.dumps({
    "torch_seed": torch_seed(7, Purpose.AUGMENTATION, 3, 12345),
    "numpy": numpy_generator(7, Purpose.SYNTHETIC_VAL, 99).integers(0, 2**31, 5).tolist(),
    "batches": epoch_batches(50, 4, seed=7, epoch=2, rank=1, world=2),
    "holdout": sorted(holdout([f"stem-{i}" for i in range(40)], 0.25)),
}))
"""


def _values() -> dict:
    namespace: dict = {}
    exec(_SNIPPET.replace("print(json.dumps(", "result = (("), namespace)
    return json.loads(json.dumps(namespace["result"]))  # tuples to lists, as the child's


def test_streams_are_the_same_in_a_fresh_process_with_another_hash_seed():
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    child = subprocess.run(
        [sys.executable, "-c", _SNIPPET], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == _values()


def test_keys_are_independent_and_purposes_never_collide():
    assert torch_seed(0, Purpose.AUGMENTATION, 1, 2) == torch_seed(0, Purpose.AUGMENTATION, 1, 2)
    seeds = {
        torch_seed(seed, purpose, a, b)
        for seed in range(3)
        for purpose in Purpose
        for a in range(4)
        for b in range(4)
    }
    assert len(seeds) == 3 * len(Purpose) * 16
    assert all(0 <= s < 2**63 for s in seeds)
    # Keys of different purposes differ in the second word, so padding cannot merge them.
    assert torch_seed(0, Purpose.SYNTHETIC_TRAIN, 5) != torch_seed(0, Purpose.AUGMENTATION, 5)


def test_the_synthetic_key_is_numpys_plain_seed_sequence():
    # The synthetic generator's original seeding, default_rng([seed, split, index]).
    ours = numpy_generator(3, Purpose.SYNTHETIC_TEST, 8).integers(0, 1000, 10)
    assert ours.tolist() == np.random.default_rng([3, 2, 8]).integers(0, 1000, 10).tolist()
    assert seed_sequence(3, Purpose.SYNTHETIC_TEST, np.int64(8)).entropy == (3, 2, 8)


def test_augmentation_and_epoch_order_use_the_scheme():
    expected = torch.randperm(
        20, generator=torch.Generator().manual_seed(torch_seed(4, Purpose.EPOCH_ORDER, 1))
    )
    batches = epoch_batches(20, 5, seed=4, epoch=1, rank=0, world=1)
    assert [i for batch in batches for _, i in batch] == expected.tolist()


def test_text_keys_and_bad_keys():
    assert text_key("a") == 0x61 and text_key("ab") == 0x6162
    assert text_key("é") == int.from_bytes("é".encode(), "big")
    with pytest.raises(ValueError, match="-1"):
        seed_sequence(-1, Purpose.HOLDOUT)
