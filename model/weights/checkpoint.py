"""Self-describing checkpoints: one safetensors file with weights and everything else needed.

The file's string metadata holds, as JSON:

* ``format``: ``"ssd-checkpoint/1"``;
* ``architecture``: builder, num_classes, size, preset, batch_norm, width (``model.network.ssd``);
* ``class_names``: the foreground class names, for class ids 1..C-1;
* ``normalization``: the pixel mean subtracted from 0-255 RGB values, the input size and,
  for converted weights, the resize (``model.network.preprocessing.RESIZES``);
* ``recipe``: how the weights were trained (free-form, may be empty).

Wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``) are stripped
here and only here, both when saving and when loading.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.network.preprocessing import PIXEL_MEAN
from model.network.ssd import SSD, Architecture, build
from model.weights.published import convert, is_published

FORMAT = "ssd-checkpoint/1"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the network (fp32, on the CPU, eval mode) and its description."""

    network: SSD
    class_names: list[str]
    normalization: dict[str, Any]
    recipe: dict[str, Any] = field(default_factory=dict)


def strip_wrapper_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove DDP/``torch.compile`` prefixes from every key, however they are nested."""
    cleaned = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        cleaned[key] = value
    return cleaned


def save_checkpoint(
    path: str | os.PathLike[str],
    network: SSD,
    class_names: list[str],
    *,
    recipe: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    normalization: dict[str, Any] | None = None,
) -> None:
    """Write ``network`` to ``path``; ``dtype`` (e.g. torch.float16) shrinks the file.
    ``normalization`` defaults to this project's (``PIXEL_MEAN``, antialiased resize).

    The write goes to a temporary file first, so a crash never leaves half a checkpoint.
    """
    architecture = network.architecture
    if architecture is None:
        raise ValueError("the network has no recorded architecture: build it with a builder")
    if len(class_names) != architecture.num_classes - 1:
        raise ValueError(
            f"expected {architecture.num_classes - 1} class names for {architecture.num_classes} "
            f"classes (background excluded), got {len(class_names)}"
        )
    tensors = {}
    for key, value in strip_wrapper_prefixes(network.state_dict()).items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    non_finite = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    if non_finite:
        raise ValueError(f"refusing to save non-finite weights in {non_finite[:5]}")
    metadata = {
        "format": FORMAT,
        "architecture": json.dumps(architecture.to_dict()),
        "class_names": json.dumps(list(class_names)),
        "normalization": json.dumps(
            normalization or {"mean": list(PIXEL_MEAN), "size": architecture.size}
        ),
        "recipe": json.dumps(recipe or {}),
    }
    write_atomically(Path(path), tensors, metadata)


def _umask() -> int:
    """This process's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temporary file and a rename, so a crash or a full
    disk never leaves half a file under ``path`` (the one place files are written)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        # safetensors creates its files readable by their owner alone (0600); a checkpoint
        # gets the mode any new file gets, so that the service's user (uid 10001 in the
        # image) can read one mounted from the host.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The decoded metadata of a checkpoint file, without loading its weights."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from exc
    if raw.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not an SSD checkpoint (metadata format is {raw.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    try:
        return {
            key: json.loads(raw[key])
            for key in ("architecture", "class_names", "normalization", "recipe")
        }
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({exc!r})") from exc


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Rebuild the network stored at ``path`` and load its weights (as fp32, on the CPU).

    ``path`` may also name published weights (``torchvision:coco``, ``ssd.pytorch:PATH``),
    converted as they load (``model.weights.published``).
    """
    if is_published(path):
        converted = convert(path)
        return Checkpoint(
            network=converted.network,
            class_names=converted.class_names,
            normalization=converted.normalization,
            recipe=converted.recipe,
        )
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    meta = read_metadata(path)
    try:
        architecture = Architecture(**meta["architecture"])
        network = build(architecture)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: unusable architecture {meta['architecture']} ({exc})"
        ) from exc
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt weights ({exc})") from exc
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in strip_wrapper_prefixes(tensors).items()
    }
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the architecture ({exc})") from exc
    network.eval()
    if len(meta["class_names"]) != architecture.num_classes - 1:
        raise CheckpointError(
            f"{path}: {len(meta['class_names'])} class names for "
            f"{architecture.num_classes - 1} foreground classes"
        )
    return Checkpoint(
        network=network,
        class_names=list(meta["class_names"]),
        normalization=meta["normalization"],
        recipe=meta["recipe"],
    )


def load_matching_weights(network: SSD, path: str | os.PathLike[str]) -> tuple[int, list[str]]:
    """Copy into ``network`` each module of checkpoint ``path`` whose tensors all fit it.

    For fine-tuning from a checkpoint of a related architecture: another default-box preset
    (the same heads, new priors), other classes (new class heads) or another input size. The
    rest of ``network`` keeps its fresh initialisation. A tensor fits when the network has
    one of the same name and shape. Returns the number of tensors copied and the names of
    ``network``'s tensors that were not; raises ``CheckpointError`` naming the file when no
    weight (parameter) fits. ``path`` may name published weights (``load_checkpoint``).
    """
    return copy_matching_weights(network, load_checkpoint(path).network, path)


def copy_matching_weights(
    network: SSD, source_network: SSD, path: str | os.PathLike[str]
) -> tuple[int, list[str]]:
    """``load_matching_weights`` from a network already loaded from ``path``."""
    source = source_network.state_dict()
    target = network.state_dict()
    # A module's tensors go together: a conv whose weight does not fit keeps its own bias too.
    misfit = {
        _module_of(name)
        for name, tensor in target.items()
        if name not in source or source[name].shape != tensor.shape
    }
    fitting = {name: source[name] for name in target if _module_of(name) not in misfit}
    if not any(name in fitting for name, _ in network.named_parameters()):
        raise CheckpointError(f"{path}: no weight fits the network being trained")
    network.load_state_dict(fitting, strict=False)
    return len(fitting), sorted(set(target) - set(fitting))


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


# -- training state, for ``python -m model.train --resume`` -----------------------------------


@dataclass(frozen=True)
class RunFiles:
    """What a run writes, all named after ``checkpoint`` (``<stem>.safetensors``).

    ``save_dtype`` (e.g. torch.float16) is the dtype of the checkpoints' floating weights;
    None keeps fp32.
    """

    checkpoint: Path
    save_dtype: torch.dtype | None = None

    @property
    def state(self) -> Path:
        """``<stem>.state.safetensors``: the training state, for ``--resume``."""
        return self.checkpoint.with_suffix(".state.safetensors")

    @property
    def best(self) -> Path:
        """``<stem>.best.safetensors``: the checkpoint with the best validation mAP@0.5."""
        return self.checkpoint.with_suffix(".best.safetensors")

    @property
    def log(self) -> Path:
        """``<stem>.jsonl``: one JSON line per logged step and per evaluation."""
        return self.checkpoint.with_suffix(".jsonl")

    @property
    def curves(self) -> Path:
        """``<stem>.png``: loss terms, learning rate and validation mAP against steps."""
        return self.checkpoint.with_suffix(".png")


STATE_FORMAT = "ssd-train-state/2"
_LEGACY_STATE_FORMAT = "ssd-train-state/1"  # a torch zip file, read with weights_only=True


@dataclass
class TrainingState:
    """Everything a resumed run needs to continue exactly as an uninterrupted one would.

    ``network``, ``optimizer``, ``scheduler`` and ``scaler`` are the parts' ``state_dict()``s;
    ``step`` counts optimiser steps taken; ``best_map`` is the best validation mAP@0.5 so far
    (-1 before the first evaluation); ``rng`` is ``torch.get_rng_state()``; ``architecture``
    is ``Architecture.to_dict()``; ``ema`` is the weights' moving average (``--ema``), if any.
    """

    network: dict[str, Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    step: int
    best_map: float
    rng: Tensor
    class_names: list[str]
    architecture: dict[str, Any] | None
    recipe: dict[str, Any] = field(default_factory=dict)
    ema: dict[str, Tensor] | None = None


def save_training_state(path: str | os.PathLike[str], state: TrainingState) -> None:
    """Write ``state`` as one safetensors file: the tensors as tensors, everything else as
    JSON in the metadata. Nothing is pickled, so loading it can run no code."""
    tensors: dict[str, Tensor] = {}
    fields = {name: getattr(state, name) for name in state.__dataclass_fields__}
    tree = _pack(fields, "", tensors)
    metadata = {"format": STATE_FORMAT, "state": json.dumps(tree)}
    write_atomically(Path(path), tensors, metadata)


def load_training_state(path: str | os.PathLike[str]) -> TrainingState:
    """Read a state written by ``save_training_state`` (or a ``.state.pt`` of the earlier
    format, read with ``torch.load(weights_only=True)``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such training state file")
    if zipfile.is_zipfile(path):
        fields = _load_legacy_state(path)
    else:
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable training state ({exc})") from exc
        if metadata.get("format") != STATE_FORMAT:
            raise CheckpointError(
                f"{path}: not a training state written by model.train (format "
                f"{metadata.get('format')!r}, expected {STATE_FORMAT!r})"
            )
        try:
            fields = _unpack(json.loads(metadata["state"]), tensors)
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: damaged training state ({exc!r})") from exc
    try:
        return TrainingState(**fields)
    except TypeError as exc:
        raise CheckpointError(f"{path}: incomplete training state ({exc})") from exc


def _load_legacy_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"{path}: cannot read a training state ({exc})") from exc
    if not isinstance(state, dict) or state.pop("format", None) != _LEGACY_STATE_FORMAT:
        raise CheckpointError(f"{path}: not a training state written by model.train")
    return state


def _pack(value: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """``value`` as JSON, with each tensor moved into ``tensors`` under its path ``key`` and
    replaced by ``{"tensor": key}``. Dicts whose keys are not all strings (the optimiser's
    per-parameter state is keyed by int) become ``{"items": [[key, value], ...]}``."""
    if isinstance(value, Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"dict": {k: _pack(v, f"{key}/{k}", tensors) for k, v in value.items()}}
        return {"items": [[k, _pack(v, f"{key}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [_pack(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {key!r} in a training state")


def _unpack(value: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of ``_pack``."""
    if isinstance(value, list):
        return [_unpack(v, tensors) for v in value]
    if isinstance(value, dict):
        if "tensor" in value:
            return tensors[value["tensor"]]
        if "items" in value:
            return {k: _unpack(v, tensors) for k, v in value["items"]}
        return {k: _unpack(v, tensors) for k, v in value["dict"].items()}
    return value
