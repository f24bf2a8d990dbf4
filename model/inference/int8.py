"""INT8 inference on the CPU: an SSD quantized for PyTorch's int8 kernels, and its artifact.

The network runs on PyTorch's own quantized kernels (``torch.ao``, the ``x86`` engine:
fbgemm/oneDNN int8 convolutions on the VNNI units), so no new dependency is needed.
Convolutions are fused with their BatchNorm and ReLU; weights are int8 per output channel,
activations uint8 per tensor with scales calibrated on real images (``model.quantize`` does
that). The L2Norm on conv4_3 stays in fp32 (a sum of squares over channels has no useful int8
form), and the reshapes and the concatenation of the heads' outputs run on the dequantized
fp32 tensors.

The artifact, ``<checkpoint stem>.int8.safetensors`` beside the checkpoint, is data only: the
scale and zero point of every quantized activation, plus JSON metadata (the checkpoint's
sha256, the engine, the calibration data and the guard's fp32 and int8 mAP@0.5). Weights are
not stored twice: at load the fp32 checkpoint is quantized again per channel (a deterministic
min/max), and the stored activation parameters are put back, which rebuilds the calibrated
network exactly without unpickling anything.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from model.network.ssd import SSD, fold_unused_slots
from model.weights.checkpoint import Checkpoint, load_checkpoint, write_atomically
from model.weights.sources import file_sha256

# PyTorch's quantized engine for x86 CPUs: fbgemm for large convolutions, oneDNN for small.
ENGINE = "x86"
ARTIFACT_SUFFIX = ".int8.safetensors"
FORMAT = "ssd-int8-qparams/1"
# The guard on reduced precision (weights/README.md): int8 within 1.0 point of fp32's mAP@0.5
# on held-out images, as recorded in the artifact by model.evaluation.int8_guard.
MAP50_GUARD = 0.01


@contextlib.contextmanager
def torch_ao_quiet() -> Iterator[None]:
    """Silence torch.ao.quantization's DeprecationWarning (and only it) around our calls.

    Its Python API (eager-mode prepare/convert) is deprecated in favour of torchao, but in
    torch 2.14 it still works and the int8 kernels it calls (fbgemm/oneDNN) are torch's own;
    moving to torchao would add a dependency for no measured gain on this network. The
    warning is made an error for ``model.*`` by the test configuration, hence the filter.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning
        )
        # the same API's notes on its own future (observers' reduce_range, quint8 tensors)
        warnings.filterwarnings("ignore", message="Please use quant_min and quant_max")
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor")
        yield


def int8_artifact_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where the INT8 artifact of ``checkpoint`` lives: ``weights/m.safetensors`` ->
    ``weights/m.int8.safetensors``."""
    path = Path(checkpoint)
    return path.with_name(path.name.removesuffix(".safetensors") + ARTIFACT_SUFFIX)


def int8_artifact_for(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The INT8 artifact beside ``checkpoint`` if there is one, else None (for ``auto``)."""
    path = int8_artifact_path(checkpoint)
    return path if path.is_file() else None


def artifact_is_current(checkpoint: str | os.PathLike[str]) -> bool:
    """Whether an INT8 artifact beside ``checkpoint`` was made from these very weights."""
    path = int8_artifact_path(checkpoint)
    if not path.is_file():
        return False
    return read_int8_info(path).get("checkpoint_sha256") == file_sha256(checkpoint)


def guard_shortfall(path: str | os.PathLike[str]) -> float | None:
    """How far the artifact's recorded int8 mAP@0.5 fell below fp32's beyond ``MAP50_GUARD``
    (a positive number), or None when it is within the guard or recorded no guard."""
    map50 = read_int8_info(path)["info"].get("guard", {}).get("map50", {})
    if not {"fp32", "int8"} <= set(map50):
        return None
    shortfall = float(map50["fp32"]) - float(map50["int8"]) - MAP50_GUARD
    return shortfall if shortfall > 0 else None


class QuantizableSSD(nn.Module):
    """An SSD rearranged for eager-mode static quantization.

    Quant/dequant stubs mark where tensors enter and leave int8: the input, the L2Norm (run
    in fp32 between a dequant and a quant), and each head's output. ``forward`` has the
    ``SSD`` contract: Tensor[N, 3, S, S] in, fp32 ``(loc, conf)`` out. It carries
    ``num_classes``, ``input_size`` and the ``default_boxes`` buffer, as the Detector needs.

    Args:
        network: a trained fp32 ``SSD`` in eval mode; it is copied, not changed.
    """

    default_boxes: Tensor

    def __init__(self, network: SSD) -> None:
        super().__init__()
        network = copy.deepcopy(network).float().eval()
        self.num_classes = network.num_classes
        self.head_columns = network.head_columns
        self.unused_slots = network.unused_slots
        self.input_size = network.input_size
        self.architecture = network.architecture
        self.register_buffer("default_boxes", network.default_boxes.clone(), persistent=False)
        self.stages = nn.ModuleList(_fused(stage) for stage in network.stages)
        self.l2norm = network.l2norm
        self.loc_heads = network.loc_heads
        self.conf_heads = network.conf_heads
        self.quant_input = torch.ao.quantization.QuantStub()
        self.quant_l2norm = torch.ao.quantization.QuantStub()
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The ``SSD.forward`` contract; ``x`` Tensor[N, 3, S, S] fp32, outputs fp32."""
        locs, confs = [], []
        x = self.quant_input(x)
        for k, stage in enumerate(self.stages):
            x = stage(x)
            source = self.quant_l2norm(self.l2norm(self.dequant(x))) if k == 0 else x
            n = source.shape[0]
            loc = self.dequant(self.loc_heads[k](source))
            conf = self.dequant(self.conf_heads[k](source))
            # (N, A*4, H, W) -> (N, H, W, A*4) -> (N, H*W*A, 4)
            locs.append(loc.permute(0, 2, 3, 1).reshape(n, -1, 4))
            # (N, A*C, H, W) -> (N, H, W, A*C) -> (N, H*W*A, C)
            confs.append(conf.permute(0, 2, 3, 1).reshape(n, -1, self.head_columns))
        return torch.cat(locs, dim=1), fold_unused_slots(torch.cat(confs, dim=1), self.unused_slots)


def _fused(stage: nn.Module) -> nn.Sequential:
    """A copy of a stage (a Sequential) with each Conv2d[-BatchNorm2d][-ReLU] run fused."""
    stage = copy.deepcopy(stage)
    if not isinstance(stage, nn.Sequential):
        raise TypeError(f"expected an nn.Sequential stage, got {type(stage).__name__}")
    layers = list(stage)
    groups: list[list[str]] = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Conv2d):
            continue
        group = [str(i)]
        for kind in (nn.BatchNorm2d, nn.ReLU):
            j = i + len(group)
            if j < len(layers) and isinstance(layers[j], kind):
                group.append(str(j))
        if len(group) > 1:
            groups.append(group)
    if groups:
        stage = torch.ao.quantization.fuse_modules(stage, groups)
    return stage


def prepare_observed(network: SSD) -> QuantizableSSD:
    """The network with observers in place: x86's default qconfig (per-channel symmetric int8
    weights; histogram-calibrated uint8 activations, reduce_range for fbgemm's accumulator)."""
    torch.backends.quantized.engine = ENGINE
    with torch_ao_quiet():
        wrapped = QuantizableSSD(network)
        wrapped.qconfig = torch.ao.quantization.get_default_qconfig(ENGINE)
        wrapped.l2norm.qconfig = None  # fp32 between dequant and quant_l2norm
        return torch.ao.quantization.prepare(wrapped)


def activation_qparams(quantized: nn.Module) -> dict[str, Tensor]:
    """Every calibrated activation's (scale, zero point) as float64 Tensor[2], by module
    name: the quantize stubs and each quantized convolution's output."""
    params = {}
    for name, module in quantized.named_modules():
        # quantized.Conv2d includes the fused ConvReLU2d, a subclass
        if isinstance(module, torch.ao.nn.quantized.Quantize | torch.ao.nn.quantized.Conv2d):
            params[name] = torch.tensor([float(module.scale), float(module.zero_point)])
    return {k: v.double() for k, v in params.items()}


def rebuild(
    network: SSD, params: dict[str, Tensor], source: str = "the artifact"
) -> QuantizableSSD:
    """The quantized network from the fp32 ``network`` and stored ``activation_qparams``.

    Raises:
        ValueError: the parameters do not match the network's quantized modules (naming the
            missing and unexpected names, and ``source``).
    """
    prepared = prepare_observed(network)
    with torch.inference_mode():  # one pass so that every observer has a range to convert
        prepared(torch.zeros(1, 3, network.input_size, network.input_size))
    with torch_ao_quiet():
        quantized = torch.ao.quantization.convert(prepared)
    expected = set(activation_qparams(quantized))
    if expected != set(params):
        raise ValueError(
            f"{source} does not match the network: missing {sorted(expected - set(params))}, "
            f"unexpected {sorted(set(params) - expected)}"
        )
    for name, module in quantized.named_modules():
        if name not in params:
            continue
        scale, zero_point = float(params[name][0]), int(params[name][1])
        if isinstance(module, torch.ao.nn.quantized.Quantize):
            module.scale = torch.tensor([scale])
            module.zero_point = torch.tensor([zero_point], dtype=torch.long)
        else:
            module.scale, module.zero_point = scale, zero_point
    return quantized.eval()


def save_int8(
    path: str | os.PathLike[str],
    params: dict[str, Tensor],
    checkpoint: str | os.PathLike[str],
    info: dict[str, Any],
) -> None:
    """Write the artifact: ``params`` as safetensors, and JSON metadata naming the format,
    the engine, the checkpoint's file name and sha256, and ``info`` (calibration, guard)."""
    metadata = {
        "format": FORMAT,
        "engine": ENGINE,
        "checkpoint": Path(checkpoint).name,
        "checkpoint_sha256": file_sha256(checkpoint),
        "info": json.dumps(info, sort_keys=True),
    }
    write_atomically(Path(path), {k: v.contiguous() for k, v in params.items()}, metadata)


def read_int8_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The artifact's metadata, with ``info`` parsed from JSON."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    metadata["info"] = json.loads(metadata.get("info", "{}"))
    return metadata


def load_int8(
    checkpoint: str | os.PathLike[str], artifact: str | os.PathLike[str] | None = None
) -> tuple[QuantizableSSD, Checkpoint]:
    """The quantized network of ``checkpoint`` (and its ``Checkpoint``), from the artifact
    beside it (``int8_artifact_path``) or ``artifact``.

    Raises:
        FileNotFoundError: no artifact, naming the expected path and the command that makes it.
        ValueError: the artifact is of another format, or was made from other weights.
    """
    path = Path(artifact) if artifact is not None else int8_artifact_path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"no INT8 artifact for {checkpoint}: expected {path}; make it with "
            f"python -m model.quantize --weights {checkpoint} --data SPEC"
        )
    metadata = read_int8_info(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    sha = file_sha256(checkpoint)
    if metadata.get("checkpoint_sha256") != sha:
        raise ValueError(
            f"{path} was made from other weights than {checkpoint} (sha256 "
            f"{metadata.get('checkpoint_sha256')}, the checkpoint's is {sha}); make it again"
        )
    loaded = load_checkpoint(checkpoint)
    network = rebuild(loaded.network, load_file(str(path)), source=str(path))
    return network, loaded
