"""Device and precision resolution, placement and autocast: the one place both the Detector and
the Trainer take them from."""

import pytest
import torch
from torch import nn

from model.runtime import PRECISIONS, Runtime, cpu_has_fast_bf16, resolve_device, resolve_precision

CPU = torch.device("cpu")


def test_auto_precision_on_the_cpu_follows_native_bf16():
    assert resolve_precision("auto", CPU) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    for name in PRECISIONS:
        assert resolve_precision(name, CPU) == name


def test_unknown_precision_and_unavailable_device_are_named():
    with pytest.raises(ValueError, match="'int4'"):
        Runtime.resolve("cpu", "int4")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"'cuda:1'.*not available"):
            resolve_device("cuda:1")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cpu_places_network_and_inputs_channels_last():
    runtime = Runtime.resolve("cpu", "fp32")
    conv = runtime.place(nn.Conv2d(3, 4, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    batch = runtime.inputs(torch.zeros(2, 3, 8, 8))
    assert batch.device == CPU and batch.is_contiguous(memory_format=torch.channels_last)


def test_autocast_computes_in_the_reduced_type_only():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with Runtime.resolve("cpu", "bf16").autocast():
        assert conv(x).dtype == torch.bfloat16
    with Runtime.resolve("cpu", "fp32").autocast():
        assert conv(x).dtype == torch.float32
    assert Runtime.resolve("cpu", "bf16").dtype == torch.bfloat16


def test_loss_scaling_only_for_fp16_on_a_gpu():
    # bf16 has fp32's exponent range; fp16 on the CPU is not a training path here.
    for precision in PRECISIONS:
        assert not Runtime.resolve("cpu", precision).grad_scaler().is_enabled()
