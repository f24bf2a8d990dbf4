"""What the benchmark ran on: CPU model and flags, thread counts, library versions."""

from __future__ import annotations

import os
import platform
import re

import torch
import torchvision

# The CPU flags that decide which kernels oneDNN can use for fp32, bf16, fp16 and int8.
KERNEL_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)


def cpu_model() -> str:
    """The CPU's model name from Linux's /proc/cpuinfo, else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as handle:
            match = re.search(r"^model name\s*:\s*(.+)$", handle.read(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else platform.processor() or "unknown"


def cpu_flags() -> dict[str, bool]:
    """Each of KERNEL_FLAGS: whether /proc/cpuinfo lists it (all False where it is unreadable)."""
    try:
        with open("/proc/cpuinfo") as handle:
            listed = set(re.findall(r"^flags\s*:\s*(.+)$", handle.read(), re.MULTILINE)[0].split())
    except (OSError, IndexError):
        listed = set()
    return {flag: flag in listed for flag in KERNEL_FLAGS}


def describe() -> dict[str, object]:
    """The machine as the benchmark's JSON records it."""
    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
