"""Convert published detector weights into this project's self-describing checkpoint.

Command::

    python -m model.convert torchvision:coco --out weights/coco.safetensors
    python -m model.convert ssd.pytorch:ssd300_mAP_77.43_v2.pth --out weights/voc.safetensors

The sources are ``model.weights.published``'s. The checkpoint holds the weights, the architecture,
the class names, the normalization (mean, size, resize) and, under ``recipe["source"]``,
where the weights came from (URL, file, sha256, whether it is the published file) and under
which licence. An air-gapped host can then be handed the one file and serve it
(``SSD_WEIGHTS=FILE``); loading it needs no network and no torch cache.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from model.weights.checkpoint import save_checkpoint
from model.weights.published import NAMES, convert, is_published

log = logging.getLogger("model.convert")


def convert_to_file(source: str, out: str | os.PathLike[str]) -> Path:
    """Convert ``source`` (a ``model.weights.published`` name) and write it to ``out`` as a
    checkpoint.

    Raises:
        FileNotFoundError: the source's file is missing (offline: the message says where to
            place it), or ``out``'s folder does not exist.
        ValueError: ``source`` is no published name, or its file has another layout.
    """
    out = Path(out)
    if not is_published(source):
        raise ValueError(f"{source!r} names no published weights; known: {', '.join(NAMES)}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"no folder {out.parent} to write {out.name} into")
    converted = convert(source)
    save_checkpoint(
        out,
        converted.network,
        converted.class_names,
        recipe=converted.recipe,
        normalization=converted.normalization,
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Convert as the arguments say; returns the exit status (0 written, 2 bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m model.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help=f"published weights: {', '.join(NAMES)}")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        out = convert_to_file(args.source, args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    print(f"wrote {out} ({out.stat().st_size:,} bytes) from {args.source} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
