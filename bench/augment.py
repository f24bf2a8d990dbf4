"""What the training augmentation costs per sample, on a photo of raccoon's size and on a
phone's 4000 x 3000, with ``TrainTransform``'s first step (``Shrink``) and without it:
``python -m bench.augment``.

One thread, as in a data-loader worker. Every sample is seeded, so both variants draw the same
zoom-outs and crops; the table gives the median milliseconds per sample and their ratio.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from bench.machine import cpu_model
from bench.timing import median_seconds
from model.data.transforms import Shrink, TrainTransform

# (height, width): raccoon's commonest size, and a 12-megapixel phone photo.
SIZES = ((417, 650), (3000, 4000))


def _photo(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A smooth gradient image (as compressible as a photo) with one box in its middle half."""
    rows = torch.linspace(0, 255, height)[:, None].expand(height, width)
    cols = torch.linspace(255, 0, width)[None, :].expand(height, width)
    image = torch.stack([rows, cols, (rows + cols) / 2]).to(torch.uint8)
    box = torch.tensor([[width / 4, height / 4, 3 * width / 4, 3 * height / 4]])
    return image, box, torch.tensor([1])


def _per_sample(transform: TrainTransform, sample: tuple, samples: int) -> float:
    def run() -> None:
        for seed in range(samples):
            transform(*sample, seed=seed)

    return median_seconds(run, repeats=3, warmup=1) / samples


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; returns 0."""
    parser = argparse.ArgumentParser(prog="python -m bench.augment", description=__doc__)
    parser.add_argument("--samples", type=int, default=8, help="seeded samples per timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shrinking = TrainTransform(300)
    whole = TrainTransform(300)
    whole.steps = [s for s in whole.steps if not isinstance(s, Shrink)]
    print(f"{cpu_model()}, 1 thread, TrainTransform(300), {args.samples} seeded samples")
    print(f"{'photo':>12} {'with Shrink ms':>15} {'without ms':>11} {'without / with':>15}")
    for height, width in SIZES:
        sample = _photo(height, width)
        with_s = _per_sample(shrinking, sample, args.samples)
        without = _per_sample(whole, sample, args.samples)
        print(
            f"{width:>5} x {height:<4} {1000 * with_s:>15.1f} {1000 * without:>11.1f} "
            f"{without / with_s:>15.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
