"""SSD300 forward pass on this machine: fp32 against bf16 autocast, channels_last on the CPU.

Prints images/s for each precision and the ratio; never fails on a time.

    .venv/bin/python -m bench.forward [--batch 8] [--width 1.0]
"""

from __future__ import annotations

import argparse

import torch

from bench.timing import median_seconds
from model import ssd300_vgg16


def main() -> None:
    """Time the network in fp32 and under bf16 autocast; print images/s and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    network = ssd300_vgg16(21, width=args.width).eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, 300, 300).contiguous(memory_format=torch.channels_last)
    rates = {}
    with torch.inference_mode():
        rates["fp32"] = args.batch / median_seconds(lambda: network(x), repeats=args.repeats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rates["bf16"] = args.batch / median_seconds(lambda: network(x), repeats=args.repeats)
    print(f"SSD300 width {args.width}, batch {args.batch}, {torch.get_num_threads()} threads")
    for name, rate in rates.items():
        print(f"  {name}  {rate:7.1f} images/s")
    print(f"  bf16 / fp32  {rates['bf16'] / rates['fp32']:.2f}x")


if __name__ == "__main__":
    main()
