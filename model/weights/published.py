"""Published SSD300 detectors, converted into this project's network by name.

Two sources, accepted wherever a checkpoint path is (``Detector.load``, ``SSD_WEIGHTS``,
``--init``, ``--weights``):

* ``torchvision:coco``: torchvision's ``SSD300_VGG16_Weights.COCO_V1`` (COCO 2017, 25.1 box
  mAP on val2017 by torchvision's measure), through torchvision's weights API into torch's
  cache (``model.weights.torch_cache``: hash-checked on download; offline, the error names the URL
  and the path to place the file at).
* ``ssd.pytorch:PATH``: ssd.pytorch's (amdegroot) VOC0712 SSD300 state dict, from a file the
  user supplies (``ssd300_mAP_77.43_v2.pth``: 77.4 VOC2007-test mAP by its authors'
  measure; its original host is not stable, so nothing is fetched). Read weights-only, never
  as a general pickle; its layout (every key and shape) is checked, not its file name.

Both networks are this project's SSD300 layer for layer, so the conversion only renames
tensors. Where their code differs from this project's, the converted network records what
they did, so it computes what they compute:

* default boxes clipped as theirs are (``Architecture.clip_boxes``: torchvision clips w and
  h to [0, 1], ssd.pytorch all of cx, cy, w, h);
* images resized as they were in training, bilinear without antialiasing on float pixels
  (``normalization["resize"] = "bilinear"``), and torchvision's exact pixel mean;
* torchvision's 91-slot COCO label space: slot k is COCO category id k, and the 10 slots
  torchvision names "N/A" (ids COCO never used: 12, 26, 29, 30, 45, 66, 68, 69, 71, 83) are
  kept in the class head but folded into background (``Architecture.unused_slots``), so the
  80 classes get class ids 1..80 in COCO's category order, each with exactly the
  probability torchvision's softmax over 91 gives it. ``model.evaluation.evaluate`` matches a COCO
  file's categories by name.

The converted checkpoint's recipe records the source: its name, URL, file, sha256, whether
the sha256 is the published file's, the published accuracy and the licence.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from torchvision.models.detection import SSD300_VGG16_Weights

from model.network.ssd import SSD, ssd300_vgg16
from model.weights.imagenet import read_state_dict
from model.weights.sources import (
    NAMES,
    SSD_PYTORCH,
    TORCHVISION_COCO,
    file_sha256,
    file_version,
    is_published,
)
from model.weights.torch_cache import cache_path, fetch, hash_in_name

log = logging.getLogger("model.weights.published")

# torchvision's detection transform: image_mean on 0-1 pixels with std 1/255 (ssd300_vgg16),
# i.e. this mean subtracted from 0-255 pixels.
_TORCHVISION_MEAN = (0.48235 * 255, 0.45882 * 255, 0.40784 * 255)
_TORCHVISION_UNUSED = "N/A"  # torchvision's name for the COCO category ids with no class
_TORCHVISION_LICENCE = (
    "torchvision's code is BSD-3-Clause; its pretrained weights may carry terms from their "
    "training data (COCO 2017: annotations CC BY 4.0, images under their Flickr licences); "
    "see https://github.com/pytorch/vision#pre-trained-model-license"
)

# ssd.pytorch (amdegroot), data/voc0712.py VOC_CLASSES: label k + 1 is VOC_CLASSES[k].
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
# ssd.pytorch's data/config.py MEANS (104, 117, 123) is BGR; its loader then swaps the
# channels to RGB (voc0712.py pull_item), so the network saw RGB minus this.
_SSD_PYTORCH_MEAN = (123.0, 117.0, 104.0)
SSD_PYTORCH_URL = "https://s3.amazonaws.com/amdegroot-models/ssd300_mAP_77.43_v2.pth"
# A copy of ssd300_mAP_77.43_v2.pth referenced in a public repository (105,151,288 bytes);
# not confirmed against the original host (issue 22).
SSD_PYTORCH_VOC_SHA256 = "3d147eb48c8f3771101e12ff14d8105b935d2e4e08fa471e2ee5a2426c20d61e"
_SSD_PYTORCH_LICENCE = (
    "ssd.pytorch (github.com/amdegroot/ssd.pytorch) is MIT-licensed; the weights state no "
    "other terms; trained on PASCAL VOC 2007+2012 trainval (images under their Flickr terms)"
)


@dataclass
class Converted:
    """Published weights in this project's network (fp32, CPU, eval mode) and what a
    checkpoint needs besides: class names (ids 1..C-1), normalization and recipe (with the
    source's provenance under ``recipe["source"]``)."""

    network: SSD
    class_names: list[str]
    normalization: dict[str, Any]
    recipe: dict[str, Any]


def convert(weights: str | os.PathLike[str]) -> Converted:
    """The network a published source names (module docstring).

    Raises:
        FileNotFoundError: torchvision's file is not cached and cannot be downloaded (the
            message names the URL and the path), or the ssd.pytorch file is missing.
        ValueError: an unknown name, or a file whose layout is not the source's (the message
            names the keys or shapes that differ).
    """
    text = str(weights)
    if text == TORCHVISION_COCO:
        return _torchvision_coco()
    if text.startswith(SSD_PYTORCH) and len(text) > len(SSD_PYTORCH):
        return _ssd_pytorch_voc(Path(text[len(SSD_PYTORCH) :]))
    raise ValueError(f"unknown published weights {text!r}; known: {', '.join(NAMES)}")


def source_file(weights: str | os.PathLike[str]) -> Path:
    """The file a published source is read from (torch's cache for torchvision's weights,
    which may not be there yet; the given path for ssd.pytorch's)."""
    text = str(weights)
    if text == TORCHVISION_COCO:
        return cache_path(SSD300_VGG16_Weights.COCO_V1)
    if text.startswith(SSD_PYTORCH) and len(text) > len(SSD_PYTORCH):
        return Path(text[len(SSD_PYTORCH) :])
    raise ValueError(f"unknown published weights {text!r}; known: {', '.join(NAMES)}")


def weights_version(source: str | os.PathLike[str]) -> str:
    """A model's version: the sha256 prefix of its checkpoint file, or of the published file
    the weights are converted from (the service's ``model.version``, ``model.predict``'s)."""
    path = source_file(source) if is_published(source) else Path(source)
    return file_version(path)


def _torchvision_coco() -> Converted:
    weights = SSD300_VGG16_Weights.COCO_V1
    path = fetch(
        weights,
        "or convert it on a machine that has it (python -m model.convert torchvision:coco "
        "--out coco.safetensors) and use that file",
    )
    state = read_state_dict(path, what="torchvision SSD300")
    categories = list(weights.meta["categories"])  # slot k: COCO category id k; 0 background
    unused = tuple(k for k, name in enumerate(categories) if name == _TORCHVISION_UNUSED)
    names = [name for k, name in enumerate(categories[1:], start=1) if k not in unused]
    network = ssd300_vgg16(len(names) + 1, preset="coco", clip_boxes="wh", unused_slots=unused)
    _load_exactly(network, {_torchvision_key(k): v for k, v in state.items()}, path)
    source = {
        "name": TORCHVISION_COCO,
        "weights": str(weights),
        "url": weights.url,
        "published_sha256_prefix": hash_in_name(path),
        "published_metrics": weights.meta["_metrics"],
        "recipe": weights.meta["recipe"],
        "licence": _TORCHVISION_LICENCE,
        "coco_category_ids": [k for k in range(1, len(categories)) if k not in unused],
        **_provenance(path, hash_in_name(path), prefix=True),
    }
    return _converted(network, names, _TORCHVISION_MEAN, source)


def _torchvision_key(key: str) -> str:
    """torchvision's ``SSD`` state-dict key -> ours. Both build the base and extras as the
    same sequences of layers (``model.network.vgg``), so the indices inside a stage agree."""
    for pattern, replacement in (
        (r"^backbone\.features\.", "stages.0."),  # conv1_1 .. conv4_3 (and its ReLU)
        (r"^backbone\.scale_weight$", "l2norm.weight"),
        (r"^head\.regression_head\.module_list\.", "loc_heads."),
        (r"^head\.classification_head\.module_list\.", "conf_heads."),
    ):
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    # backbone.extra.0 is pool4 .. conv5_3's ReLU (0 .. 6), then pool5, fc6, ReLU, fc7, ReLU
    # nested in its item 7: our stage 1, where they follow at 7 .. 11.
    nested = re.match(r"^backbone\.extra\.0\.7\.(\d+)\.(.*)$", key)
    if nested:
        return f"stages.1.{7 + int(nested.group(1))}.{nested.group(2)}"
    # backbone.extra.k for k >= 1 is our stage k + 1 (conv, ReLU, conv, ReLU)
    found = re.match(r"^backbone\.extra\.(\d+)\.(.*)$", key)
    return f"stages.{int(found.group(1)) + 1}.{found.group(2)}" if found else key


def _ssd_pytorch_voc(path: Path) -> Converted:
    state = read_state_dict(path, what="ssd.pytorch SSD300")
    network = ssd300_vgg16(len(VOC_CLASSES) + 1, preset="voc", clip_boxes="cxcywh")
    # ssd.pytorch's forward runs vgg[:23] (conv1_1 .. conv4_3's ReLU) before its L2Norm:
    # our stage 0, the same layers in the same order.
    split = len(network.stages[0])
    _load_exactly(network, {_ssd_pytorch_key(k, split): v for k, v in state.items()}, path)
    sha256 = file_sha256(path)
    if sha256 == SSD_PYTORCH_VOC_SHA256:
        log.info("%s: sha256 %s, that of the known copy of %s", path, sha256, SSD_PYTORCH_URL)
    else:
        log.warning(
            "%s: sha256 %s differs from the known copy of ssd300_mAP_77.43_v2.pth (%s): "
            "other weights in ssd.pytorch's layout; converted all the same",
            path,
            sha256,
            SSD_PYTORCH_VOC_SHA256,
        )
    source = {
        "name": f"{SSD_PYTORCH}{path.name}",
        "url": SSD_PYTORCH_URL,
        "published_sha256": SSD_PYTORCH_VOC_SHA256,
        "published_metrics": {"VOC2007-test": {"map": 77.43}},
        "licence": _SSD_PYTORCH_LICENCE,
        **_provenance(path, SSD_PYTORCH_VOC_SHA256, prefix=False, sha256=sha256),
    }
    return _converted(network, list(VOC_CLASSES), _SSD_PYTORCH_MEAN, source)


def _ssd_pytorch_key(key: str, split: int) -> str:
    """ssd.pytorch's key -> ours: ``vgg.i`` (one list, conv1_1 .. fc7) -> stage 0 or 1;
    ``extras.j`` (bare convs, 1x1 then 3x3 per extra layer; ReLUs in its forward) -> stage
    j // 2 + 2, at our index 0 or 2 (conv, ReLU, conv, ReLU); ``loc.k``/``conf.k`` -> heads."""
    found = re.match(r"^(vgg|extras|loc|conf)\.(\d+)\.(weight|bias)$", key)
    if key == "L2Norm.weight":
        return "l2norm.weight"
    if not found:
        return key
    kind, index, tensor = found.group(1), int(found.group(2)), found.group(3)
    if kind == "vgg":
        stage, layer = (0, index) if index < split else (1, index - split)
        return f"stages.{stage}.{layer}.{tensor}"
    if kind == "extras":
        return f"stages.{index // 2 + 2}.{2 * (index % 2)}.{tensor}"
    return f"{kind}_heads.{index}.{tensor}"


def _load_exactly(network: SSD, state: dict[str, Tensor], path: Path) -> None:
    """Load ``state`` (keys already renamed) into ``network`` only if every key and shape is
    the network's; otherwise raise ValueError naming what differs."""
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = [
        f"{k} {tuple(v.shape)} (expected {expected[k]})"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if missing or unexpected or misshapen:
        raise ValueError(
            f"{path}: not the expected SSD300 layout: {len(missing)} missing {missing[:5]}, "
            f"{len(unexpected)} unexpected {unexpected[:5]} (names as renamed), "
            f"{len(misshapen)} of another shape {misshapen[:5]}"
        )
    network.load_state_dict({k: v.float() for k, v in state.items()})
    network.eval()


def _provenance(
    path: Path, published: str | None, *, prefix: bool, sha256: str | None = None
) -> dict[str, Any]:
    """The file's name and sha256, and whether it is the published file's (``published``
    being the whole sha256, or with ``prefix`` the hash prefix in torch.hub's file name)."""
    sha256 = sha256 or file_sha256(path)
    matches = published is not None and (
        sha256.startswith(published) if prefix else sha256 == published
    )
    if prefix and not matches:
        log.warning(
            "%s: sha256 %s does not start with the hash in its name (%s): not the published "
            "file (a stand-in?); torch checks the hash only when it downloads",
            path,
            sha256,
            published,
        )
    return {"file": path.name, "sha256": sha256, "sha256_is_published": matches}


def _converted(
    network: SSD, names: list[str], mean: tuple[float, float, float], source: dict[str, Any]
) -> Converted:
    normalization = {"mean": list(mean), "size": network.input_size, "resize": "bilinear"}
    return Converted(network, names, normalization, {"source": source})
