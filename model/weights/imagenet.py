"""Initialising the SSD base from ImageNet VGG16 weights: torchvision's published ones by name
(``imagenet``, fetched once into torch's cache), or a state dict read from a path.

Accepts torchvision's ``vgg16`` or ``vgg16_bn`` state dict (``features.*``, ``classifier.*``).
Convolutions are copied in order. fc6 and fc7 are converted as the SSD paper does (sec. 3,
"we convert fc6 and fc7 to convolutional layers, subsample parameters from fc6 and fc7"):

* fc6 (4096 x 512*7*7) is viewed as 4096 filters of 512x7x7; every 4th filter and every 3rd tap
  in each spatial direction is kept, giving 1024 x 512 x 3 x 3 (the taps 3 apart are why fc6
  is dilated);
* fc7 (4096 x 4096) keeps every 4th output and every 4th input, giving 1024 x 1024 x 1 x 1.

torchvision's own SSD skips this and starts fc6/fc7 at random. When our network has BatchNorm
but the source is plain VGG16, the BatchNorms stay at their initial values; when the source has
BatchNorm and conv biases but our convs have none, each bias is folded into the running mean.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision.models import VGG16_BN_Weights, VGG16_Weights

from model.network.ssd import SSD
from model.weights.torch_cache import cache_path, fetch

_FC6_FILTER_STEP = 4  # 4096 -> 1024 filters
_FC6_TAP_STEP = 3  # 7x7 taps -> 3x3, i.e. taps 0, 3, 6
_FC7_STEP = 4  # 4096 -> 1024 in each direction
_VGG_CONVS = 13
IMAGENET = "imagenet"  # the name --backbone-weights takes for torchvision's published weights


def imagenet_weights(batch_norm: bool) -> VGG16_Weights | VGG16_BN_Weights:
    """torchvision's ImageNet weights for VGG16, or VGG16-BN when ``batch_norm``."""
    return VGG16_BN_Weights.IMAGENET1K_V1 if batch_norm else VGG16_Weights.IMAGENET1K_V1


def imagenet_cache_path(batch_norm: bool) -> Path:
    """Where torch's cache keeps those weights (``$TORCH_HOME/hub/checkpoints/<file>``)."""
    return cache_path(imagenet_weights(batch_norm))


def fetch_imagenet_state(batch_norm: bool) -> dict[str, Tensor]:
    """torchvision's ImageNet VGG16(-BN) state dict through its weights API: from torch's
    cache, downloaded there first when missing (hash checked), loaded weights-only.

    Raises:
        FileNotFoundError: not cached and the download failed (offline); the message says
            which file to place where (``model.weights.torch_cache.fetch``).
    """
    path = fetch(imagenet_weights(batch_norm), "or pass the file's path to --backbone-weights")
    return read_state_dict(path)


def read_state_dict(path: str | os.PathLike[str], what: str = "VGG16") -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a torch pickle (loaded weights-only, so
    it can run no code); ``what`` names the weights in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what} weights file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, which would run the file's code.
        raise ValueError(
            f"{path}: cannot read a {what} state dict: the file is damaged or holds more than "
            "tensors (it is read weights-only, and its code is never run); replace the file"
        ) from None
    except Exception as exc:
        raise ValueError(f"{path}: cannot read a {what} state dict ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _layer_groups(state: dict[str, Tensor], prefix: str) -> list[dict[str, Tensor]]:
    """Parameters of ``prefix.<i>.*`` grouped by layer index i, in increasing order."""
    groups: dict[int, dict[str, Tensor]] = {}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(\w+)$")
    for key, value in state.items():
        found = pattern.match(key)
        if found:
            groups.setdefault(int(found.group(1)), {})[found.group(2)] = value
    return [groups[i] for i in sorted(groups)]


def subsample_fc6(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """VGG fc6 (4096, 25088) -> conv (1024, 512, 3, 3), as the SSD paper does."""
    # (4096, 512*7*7) -> (4096, 512, 7, 7): fc6 reads conv5_3's 7x7 map, channels first
    w = weight.reshape(weight.shape[0], 512, 7, 7)
    w = w[::_FC6_FILTER_STEP, :, ::_FC6_TAP_STEP, ::_FC6_TAP_STEP]
    return w.contiguous(), bias[::_FC6_FILTER_STEP].contiguous()


def subsample_fc7(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """VGG fc7 (4096, 4096) -> conv (1024, 1024, 1, 1), as the SSD paper does."""
    w = weight[::_FC7_STEP, ::_FC7_STEP]
    return w[:, :, None, None].contiguous(), bias[::_FC7_STEP].contiguous()


def load_vgg16_backbone(network: SSD, source: str | os.PathLike[str] | dict[str, Tensor]) -> None:
    """Copy ImageNet VGG16(-BN) weights into the base of ``network`` (in place).

    ``source`` is ``"imagenet"`` (torchvision's published weights, VGG16-BN when ``network``
    has BatchNorm; see ``fetch_imagenet_state``), a path to a state dict, or the state dict.
    """
    if isinstance(source, dict):
        state = source
    elif str(source) == IMAGENET:
        has_norms = any(isinstance(m, nn.BatchNorm2d) for m in network.stages[0].modules())
        state = fetch_imagenet_state(batch_norm=has_norms)
    else:
        state = read_state_dict(source)
    features = _layer_groups(state, "features")
    src_convs = [g for g in features if g.get("weight") is not None and g["weight"].ndim == 4]
    src_norms = [g for g in features if "running_mean" in g]
    classifier = _layer_groups(state, "classifier")
    if len(src_convs) != _VGG_CONVS or len(classifier) < 2:
        raise ValueError(
            f"not a torchvision VGG16 state dict: found {len(src_convs)} convs in features.* "
            f"(expected {_VGG_CONVS}) and {len(classifier)} classifier layers"
        )
    fc6 = subsample_fc6(classifier[0]["weight"], classifier[0]["bias"])
    fc7 = subsample_fc7(classifier[1]["weight"], classifier[1]["bias"])

    base = [*network.stages[0].modules(), *network.stages[1].modules()]
    convs = [m for m in base if isinstance(m, nn.Conv2d)]
    norms = [m for m in base if isinstance(m, nn.BatchNorm2d)]
    sources = [(g["weight"], g.get("bias")) for g in src_convs] + [fc6, fc7]
    if len(convs) != len(sources):
        raise ValueError(f"network base has {len(convs)} convs, expected {len(sources)}")

    with torch.no_grad():
        for i, (conv, (weight, bias)) in enumerate(zip(convs, sources, strict=True)):
            if conv.weight.shape != weight.shape:
                raise ValueError(
                    f"base conv {i}: network expects {tuple(conv.weight.shape)}, the VGG16 "
                    f"weights give {tuple(weight.shape)} (is the network's width 1.0?)"
                )
            bias = bias if bias is not None else torch.zeros(weight.shape[0])
            src_norm = src_norms[i] if i < len(src_norms) else None
            dst_norm = norms[i] if norms else None
            if src_norm is not None and dst_norm is None:
                weight, bias = _fold_batch_norm(weight, bias, src_norm)
            conv.weight.copy_(weight)
            if conv.bias is not None:
                conv.bias.copy_(bias)
            if src_norm is not None and dst_norm is not None:
                dst_norm.weight.copy_(src_norm["weight"])
                dst_norm.bias.copy_(src_norm["bias"])
                # Our conv has no bias: BN(conv(x) + b) with stats (mu, var) equals
                # BN(conv(x)) with stats (mu - b, var).
                assert dst_norm.running_mean is not None and dst_norm.running_var is not None
                dst_norm.running_mean.copy_(src_norm["running_mean"] - bias)
                dst_norm.running_var.copy_(src_norm["running_var"])


def _fold_batch_norm(
    weight: Tensor, bias: Tensor, norm: dict[str, Tensor], eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Fold an inference-mode BatchNorm (torchvision's eps 1e-5) into the preceding conv."""
    scale = norm["weight"] / torch.sqrt(norm["running_var"] + eps)
    return (
        weight * scale[:, None, None, None],
        (bias - norm["running_mean"]) * scale + norm["bias"],
    )
