"""What a weight source names, without torch: the published sources' names, whether a source
is one of them, and a file's version (its sha256 prefix). The ONNX Runtime service reads these
with no torch installed; ``model.weights.published`` converts the sources themselves."""

from __future__ import annotations

import hashlib
import os

TORCHVISION_COCO = "torchvision:coco"
SSD_PYTORCH = "ssd.pytorch:"  # followed by the path of the state dict file
NAMES = (TORCHVISION_COCO, f"{SSD_PYTORCH}PATH")
# Hex digits of a file's sha256 used as the model version.
VERSION_DIGITS = 12


def is_published(weights: str | os.PathLike[str]) -> bool:
    """Whether ``weights`` names a published source rather than a checkpoint file."""
    text = str(weights)
    return text == TORCHVISION_COCO or text.startswith(SSD_PYTORCH)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_version(path: str | os.PathLike[str]) -> str:
    """A file's version: the first ``VERSION_DIGITS`` hex digits of its sha256.

    Raises:
        OSError: the file cannot be read.
    """
    return file_sha256(path)[:VERSION_DIGITS]
