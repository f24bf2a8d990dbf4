"""Device and precision resolution, placement and autocast: the one place both the Detector and
the Trainer take them from."""

import pytest
import torch
from torch import nn

from model.inference.runtime import PRECISIONS, Runtime, resolve_device, resolve_precision

CPU = torch.device("cpu")


def test_named_precisions_pass_and_auto_is_left_to_a_measurement():
    for name in PRECISIONS:
        assert resolve_precision(name, CPU) == name
    # Nothing is read from CPU flags: auto is timed on the network (model.inference.autotune).
    with pytest.raises(ValueError, match="'auto' is measured"):
        resolve_precision("auto", CPU)


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


def test_channels_last_on_a_gpu_for_reduced_precision_only():
    # Built directly: no GPU is needed to read the layout a GPU runtime would use.
    gpu = torch.device("cuda")
    assert Runtime(gpu, "fp16").memory_format == torch.channels_last
    assert Runtime(gpu, "bf16").memory_format == torch.channels_last
    assert Runtime(gpu, "fp32").memory_format == torch.contiguous_format
    for precision in PRECISIONS:  # the CPU as before: channels_last whatever the precision
        assert Runtime.resolve("cpu", precision).memory_format == torch.channels_last
