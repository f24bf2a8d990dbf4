import json
import os
import re
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import ssd300_vgg16
from model.weights.checkpoint import (
    STATE_FORMAT,
    CheckpointError,
    TrainingState,
    load_checkpoint,
    load_matching_weights,
    load_training_state,
    read_metadata,
    save_checkpoint,
    save_training_state,
    strip_wrapper_prefixes,
)

NAMES = ["circle", "square"]


@pytest.fixture
def network():
    torch.manual_seed(0)
    net = ssd300_vgg16(3, batch_norm=True, width=0.125, preset="coco").eval()
    # Non-default BatchNorm statistics, so that buffers are checked too.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
    return net


def test_round_trip_restores_architecture_names_and_outputs(tmp_path, network):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, network, NAMES, recipe={"epochs": 3})
    loaded = load_checkpoint(path)
    assert loaded.class_names == NAMES
    assert loaded.network.architecture == network.architecture
    assert loaded.recipe == {"epochs": 3}
    assert loaded.normalization == {"mean": [123.0, 117.0, 104.0], "size": 300}
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        for a, b in zip(network(x), loaded.network(x), strict=True):
            torch.testing.assert_close(a, b)
    meta = read_metadata(path)
    assert meta["architecture"]["builder"] == "ssd300_vgg16"
    assert meta["architecture"]["batch_norm"] is True


def test_half_precision_storage_is_smaller_and_loads_as_float32(tmp_path, network):
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save_checkpoint(full, network, NAMES)
    save_checkpoint(half, network, NAMES, dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_checkpoint(half).network
    weight = loaded.conf_heads[0].weight
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, network.conf_heads[0].weight, atol=1e-3, rtol=1e-3)


def test_not_a_checkpoint_names_the_file(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.safetensors"):
        load_checkpoint(text)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match=r"foreign\.safetensors.*not an SSD checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match=r"missing\.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_truncated_file_names_the_file(tmp_path, network):
    path = tmp_path / "cut.safetensors"
    save_checkpoint(path, network, NAMES)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        load_checkpoint(path)


def test_wrapper_prefixes_are_stripped_on_load(tmp_path, network):
    path = tmp_path / "ddp.safetensors"
    save_checkpoint(path, network, NAMES)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    wrapped = {f"module._orig_mod.{k}": v for k, v in load_file(str(path)).items()}
    save_file(wrapped, str(path), metadata=metadata)
    assert load_checkpoint(path).class_names == NAMES
    assert strip_wrapper_prefixes({"_orig_mod.module.a": 1}) == {"a": 1}


def test_mismatches_are_refused(tmp_path, network):
    with pytest.raises(ValueError, match="expected 2 class names"):
        save_checkpoint(tmp_path / "x.safetensors", network, ["only-one"])
    with torch.no_grad():
        network.loc_heads[0].bias[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(tmp_path / "nan.safetensors", network, NAMES)
    assert not (tmp_path / "nan.safetensors").exists()


def test_damaged_metadata_names_the_file(tmp_path, network):
    path = tmp_path / "meta.safetensors"
    save_checkpoint(path, network, NAMES)
    tensors = load_file(str(path))
    save_file(
        tensors,
        str(path),
        metadata={"format": "ssd-checkpoint/1", "architecture": json.dumps({"builder": "x"})},
    )
    with pytest.raises(CheckpointError, match=r"meta\.safetensors"):
        load_checkpoint(path)


def test_matching_weights_fill_a_related_network(tmp_path, network):
    path = tmp_path / "coco.safetensors"
    save_checkpoint(path, network, NAMES)
    # Another tiling and one more class: the same backbone and box heads, new class heads.
    torch.manual_seed(1)
    target = ssd300_vgg16(4, batch_norm=True, width=0.125, preset="fine")
    fresh_before = {k: v.clone() for k, v in target.state_dict().items()}
    copied, fresh = load_matching_weights(target, path)
    source, after = network.state_dict(), target.state_dict()
    assert fresh == [f"conf_heads.{k}.{p}" for k in range(6) for p in ("bias", "weight")]
    assert copied == len(after) - len(fresh)
    for name, tensor in after.items():
        expected = fresh_before[name] if name in fresh else source[name]
        assert torch.equal(tensor, expected), name
    # The priors are the target's own: "fine" puts conv4_3's boxes at 4 %, not 7 %.
    assert target.default_boxes[0, 2].item() == pytest.approx(0.04)


def test_matching_weights_refuse_a_checkpoint_with_nothing_in_common(tmp_path, network):
    path = tmp_path / "narrow.safetensors"
    save_checkpoint(path, network, NAMES)
    wider = ssd300_vgg16(3, batch_norm=True, width=0.25, preset="coco")
    with pytest.raises(CheckpointError, match=r"narrow\.safetensors: no weight fits"):
        load_matching_weights(wider, path)


def _training_state(network) -> TrainingState:
    """A state after two real optimiser steps: momentum buffers, a stepped schedule, a scaler
    that has seen gradients."""
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5**s)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    network.train()
    for _ in range(2):
        loc, conf = network(torch.randn(2, 3, 300, 300))
        scaler.scale(loc.square().mean() + conf.square().mean()).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    return TrainingState(
        network=network.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler=scaler.state_dict(),
        step=2,
        best_map=float("-inf"),
        rng=torch.get_rng_state(),
        class_names=NAMES,
        architecture=network.architecture.to_dict(),
        recipe={"lr": 0.1, "out": "x.safetensors", "classes": None},
    )


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where  # int keys stay ints, in order
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def test_training_state_round_trips_without_pickle(tmp_path, network):
    state = _training_state(network)
    assert state.optimizer["state"] and all(isinstance(k, int) for k in state.optimizer["state"])
    path = tmp_path / "run.state.safetensors"
    save_training_state(path, state)
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and json.loads(raw[8 : 8 + header])["__metadata__"]["format"] == (
        STATE_FORMAT
    )
    assert b"\x80\x02" not in raw[:16]  # not a pickle
    loaded = load_training_state(path)
    for name in state.__dataclass_fields__:
        _assert_same(getattr(state, name), getattr(loaded, name), name)
    # The loaded optimiser state drives a fresh optimiser exactly as the original.
    fresh = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    fresh.load_state_dict(loaded.optimizer)
    buffers = [fresh.state[p]["momentum_buffer"] for p in network.parameters()]
    assert all(b is not None and b.abs().sum() > 0 for b in buffers)


def test_a_legacy_torch_state_loads_with_weights_only(tmp_path, network):
    state = _training_state(network)
    legacy = {"format": "ssd-train-state/1", **vars(state)}
    path = tmp_path / "old.state.pt"
    torch.save(legacy, path)
    loaded = load_training_state(path)
    assert loaded.step == 2 and loaded.class_names == NAMES
    _assert_same(state.optimizer, loaded.optimizer, "optimizer")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.state.pt"
    torch.save({"format": "ssd-train-state/1", "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=re.escape("evil.state.pt")):
        load_training_state(path)
    assert not marker.exists()


def test_unusable_training_states_name_the_file(tmp_path, network):
    junk = tmp_path / "junk.state.safetensors"
    junk.write_bytes(b"nope")
    with pytest.raises(CheckpointError, match=re.escape("junk.state.safetensors: not a readable")):
        load_training_state(junk)
    with pytest.raises(CheckpointError, match=re.escape("missing.state.safetensors: no such")):
        load_training_state(tmp_path / "missing.state.safetensors")
    model_file = tmp_path / "model.safetensors"
    save_checkpoint(model_file, network, NAMES)
    with pytest.raises(CheckpointError, match=re.escape("model.safetensors: not a training state")):
        load_training_state(model_file)
    damaged = tmp_path / "damaged.state.safetensors"
    save_file({"x": torch.zeros(1)}, str(damaged), metadata={"format": STATE_FORMAT})
    with pytest.raises(CheckpointError, match=re.escape("damaged.state.safetensors: damaged")):
        load_training_state(damaged)


def test_files_get_the_mode_of_any_new_file(tmp_path, network):
    # safetensors alone writes 0600: a checkpoint trained on the host and mounted into the
    # image could not be read by its unprivileged user.
    previous = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "a.safetensors", network, NAMES)
        save_training_state(tmp_path / "a.state.safetensors", _training_state(network))
    finally:
        os.umask(previous)
    for name in ("a.safetensors", "a.state.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
