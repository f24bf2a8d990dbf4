"""Where and how a network runs: the device, the numeric precision, autocast, memory format.

One ``Runtime`` is resolved from the user's words (``device="auto"``, a precision's name; an
``auto`` precision is measured by ``model.inference.autotune``, not resolved) and then used by
everything that runs the network, the ``Detector`` and the ``Trainer`` alike, so the two
cannot drift apart: they place the network and its inputs the same way and compute under the
same autocast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Precisions by name. bf16 and fp16 run under autocast: weights stay fp32, and the operations
# autocast lists (convolutions, matrix products) compute in the reduced type.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# INT8 is not an autocast type: it is a separately quantized network (model.quantize), run on
# the CPU in eager mode with fp32 inputs and outputs, so it computes with no autocast.
INT8 = "int8"


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is the first CUDA GPU when there is one, else the CPU.

    Raises:
        ValueError: a CUDA device was named but CUDA is not available.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` checked against ``device`` and returned as it is.

    ``auto`` is not resolved here: which precision is fastest is measured on the network, not
    read from the device (CPU flags mislead: a CPU with AVX-512 BF16 but no AMX runs SSD300
    under bf16 slower than fp32, docs/performance-notes.md). ``Detector.load`` times inference
    passes and ``model.train`` times training steps (``model.inference.autotune``).

    Raises:
        ValueError: ``precision`` is ``auto``, int8 off the CPU, or not a key of
            ``PRECISIONS``.
    """
    if precision == "auto":
        raise ValueError(
            "precision 'auto' is measured, not resolved: Detector.load(..., precision='auto') "
            "and model.train --precision auto time each candidate on the network first"
        )
    if precision == INT8:
        if device.type != "cpu":
            raise ValueError(f"precision int8 runs on the CPU only, got device {str(device)!r}")
        return precision
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision must be int8 or one of {sorted(PRECISIONS)}, got {precision!r}"
        )
    return precision


@dataclass(frozen=True)
class Runtime:
    """A resolved device and precision (a key of ``PRECISIONS``, never ``auto``).

    Build one with ``Runtime.resolve``; ``place`` puts a network on it, ``inputs`` a batch,
    and ``autocast`` is the context to compute in.
    """

    device: torch.device
    precision: str

    @classmethod
    def resolve(cls, device: str | torch.device = "auto", precision: str = "fp32") -> Runtime:
        """The runtime named by ``device`` (``auto``, ``cpu``, ``cuda[:N]``) and ``precision``
        (``int8`` or a key of ``PRECISIONS``); see ``resolve_device``, ``resolve_precision``."""
        resolved = resolve_device(device)
        return cls(resolved, resolve_precision(precision, resolved))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype autocast computes in (float32 for fp32 and int8, where no autocast runs)."""
        return PRECISIONS.get(self.precision, torch.float32)

    @property
    def memory_format(self) -> torch.memory_format:
        """channels_last on the CPU, where oneDNN's convolutions are markedly faster on NHWC
        tensors, and on a GPU computing in fp16/bf16, where cuDNN's tensor-core convolutions
        take NHWC natively (NVIDIA's "Convolutional Layers User's Guide": NCHW tensors are
        transposed around every such convolution); the default layout for fp32 on a GPU."""
        if self.device.type == "cpu" or self.precision in ("fp16", "bf16"):
            return torch.channels_last
        return torch.contiguous_format

    def place(self, network: nn.Module) -> nn.Module:
        """Move ``network`` (in place, as ``nn.Module.to`` does) to the device and layout."""
        return network.to(self.device).to(memory_format=self.memory_format)

    def inputs(self, batch: Tensor) -> Tensor:
        """A batch Tensor[N, C, H, W] on the device, in the network's memory layout."""
        return batch.to(self.device).contiguous(memory_format=self.memory_format)

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The context the forward pass runs in: autocast to the reduced type, or nothing."""
        if self.precision in ("fp32", INT8):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler for training: enabled for fp16 on a GPU, where small gradients would
        underflow fp16's range; bf16 has fp32's range and needs none."""
        enabled = self.precision == "fp16" and self.device.type == "cuda"
        return torch.amp.GradScaler(self.device.type, enabled=enabled)
