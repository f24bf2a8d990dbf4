"""Self-describing checkpoints: one safetensors file with weights and everything else needed.

The file's string metadata holds, as JSON:

* ``format``: ``"ssd-checkpoint/1"``;
* ``architecture``: builder, num_classes, size, preset, batch_norm, width (``model.ssd``);
* ``class_names``: the foreground class names, for class ids 1..C-1;
* ``normalization``: the pixel mean subtracted from 0-255 RGB values, and the input size;
* ``recipe``: how the weights were trained (free-form, may be empty).

Wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``) are stripped
here and only here, both when saving and when loading.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.preprocessing import PIXEL_MEAN
from model.ssd import SSD, Architecture, build

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
) -> None:
    """Write ``network`` to ``path``; ``dtype`` (e.g. torch.float16) shrinks the file.

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
        "normalization": json.dumps({"mean": list(PIXEL_MEAN), "size": architecture.size}),
        "recipe": json.dumps(recipe or {}),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


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
    """Rebuild the network stored at ``path`` and load its weights (as fp32, on the CPU)."""
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
    weight (parameter) fits.
    """
    source = load_checkpoint(path).network.state_dict()
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
