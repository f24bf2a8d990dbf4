"""The SSD detector: network builders, training pieces and the image-to-detections API.

``Detections`` imports without torch; the torch parts (``Detector``, ``SSD`` and its
builders) load on first use, so that the ONNX Runtime service (``SSD_BACKEND=onnxruntime``)
can import ``model`` on a host without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from model.network.detections import Detections

if TYPE_CHECKING:
    from model.inference.detector import Detector
    from model.network.ssd import SSD, ssd300_vgg16, ssd512_vgg16

__all__ = ["SSD", "Detections", "Detector", "ssd300_vgg16", "ssd512_vgg16"]

# Each torch name and the module that holds it.
_LAZY = {
    "Detector": "model.inference.detector",
    "SSD": "model.network.ssd",
    "ssd300_vgg16": "model.network.ssd",
    "ssd512_vgg16": "model.network.ssd",
}


def __getattr__(name: str) -> Any:
    """The torch names, imported when first asked for (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
