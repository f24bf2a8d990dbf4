"""The Detector: images of any size and colour mode in, detections in each image's pixels out."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
from torch import nn

from model.checkpoint import load_checkpoint
from model.postprocess import MAX_DETECTIONS, NMS_IOU, TOP_K, Detections, postprocess
from model.preprocessing import PIXEL_MEAN, ImageLike, preprocess, to_rgb_tensor
from model.ssd import SSD

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is the first CUDA GPU when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return resolved


class Detector:
    """An SSD network with its class names, ready to run on images.

    Args:
        network: an ``SSD`` (from a builder or a checkpoint).
        class_names: names of the foreground classes, for class ids 1..C-1.
        device: ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``.
        precision: ``"fp32"``, or ``"bf16"``/``"fp16"`` run under autocast (bf16 is fast on
            CPUs with AVX-512 BF16; fp16 is meant for GPUs).
        pixel_mean: RGB mean subtracted from 0-255 pixels, as the network was trained with.
        nms_iou, top_k: post-processing settings (paper defaults 0.45 and 400).
    """

    def __init__(
        self,
        network: SSD,
        class_names: Sequence[str],
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        nms_iou: float = NMS_IOU,
        top_k: int = TOP_K,
    ) -> None:
        if len(class_names) != network.num_classes - 1:
            raise ValueError(
                f"the network has {network.num_classes - 1} foreground classes but "
                f"{len(class_names)} class names were given"
            )
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.device = resolve_device(device)
        self.precision = precision
        self.class_names = list(class_names)
        self.input_size = network.input_size
        self.pixel_mean = tuple(float(m) for m in pixel_mean)
        self.nms_iou = nms_iou
        self.top_k = top_k
        self.network: nn.Module = network.to(self.device).eval()
        if self.device.type == "cpu":
            # oneDNN's convolutions are markedly faster on NHWC tensors on the CPU.
            self.network = self.network.to(memory_format=torch.channels_last)
        self._default_boxes = network.default_boxes.to(self.device)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "auto",
        precision: str = "fp32",
    ) -> Detector:
        """Load a checkpoint written by ``model.checkpoint.save_checkpoint``."""
        checkpoint = load_checkpoint(path)
        return cls(
            checkpoint.network,
            checkpoint.class_names,
            device=device,
            precision=precision,
            pixel_mean=checkpoint.normalization.get("mean", PIXEL_MEAN),
        )

    @torch.inference_mode()
    def predict(
        self,
        images: Sequence[ImageLike],
        score_threshold: float = 0.3,
        max_detections: int = MAX_DETECTIONS,
    ) -> list[Detections]:
        """Detect objects in a batch of images, run as one forward pass.

        Args:
            images: PIL images (any mode: L, RGB, RGBA, CMYK, P, 16-bit) or uint8
                Tensors[C, H, W] with C in (1, 3, 4), each of any size.
            score_threshold: keep detections scoring strictly above this (0..1).
            max_detections: at most this many detections per image.

        Returns:
            One ``Detections`` per image, boxes xyxy in that image's pixels.
        """
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {max_detections}")
        if len(images) == 0:
            return []
        rgb = [to_rgb_tensor(image) for image in images]
        sizes = [(int(img.shape[2]), int(img.shape[1])) for img in rgb]  # (width, height)
        batch = preprocess(rgb, self.input_size, self.pixel_mean).to(self.device)
        if self.device.type == "cpu":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            loc, conf = self.network(batch)
        outputs = postprocess(
            loc.float(),
            conf.float(),
            self._default_boxes,
            sizes,
            score_threshold=score_threshold,
            nms_iou=self.nms_iou,
            top_k=self.top_k,
            max_detections=max_detections,
        )
        if len(outputs) != len(images):
            raise RuntimeError(
                f"post-processing returned {len(outputs)} results for {len(images)} images"
            )
        results = []
        for boxes, scores, class_ids in outputs:
            labels = [self.class_names[i - 1] for i in class_ids.tolist()]
            results.append(Detections(boxes.cpu(), scores.cpu(), class_ids.cpu(), labels))
        return results

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])
