"""The Detector: images of any size and colour mode in, detections in each image's pixels out."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from model.inference.autotune import BATCH_SIZE, PrecisionChoice, choose_inference_precision
from model.inference.int8 import (
    MAP50_GUARD,
    QuantizableSSD,
    guard_shortfall,
    int8_artifact_for,
    load_int8,
)
from model.inference.runtime import INT8, Runtime, resolve_device
from model.network.detections import (
    MAX_DETECTIONS,
    NMS_IOU,
    TOP_K,
    BatchResult,
    Cut,
    Detections,
    class_ids_of,
    make_cut,
)
from model.network.pixels import prepare_image
from model.network.postprocess import postprocess_each
from model.network.preprocessing import PIXEL_MEAN, RESIZES, ImageLike, preprocess, to_rgb_tensor
from model.network.ssd import SSD
from model.weights.checkpoint import load_checkpoint

log = logging.getLogger("model.inference.detector")


class Detector:
    """An SSD network with its class names, ready to run on images.

    One batch API: ``prepare`` each image (on any thread), then ``run_batch`` the prepared
    inputs with per-image settings; ``predict`` does both. The service, the evaluator
    (``model.evaluation.evaluate``) and the trainer's validation all run batches through it.

    Args:
        network: an ``SSD`` (from a builder or a checkpoint), or for ``"int8"`` a network
            quantized by ``model.quantize``.
        class_names: names of the foreground classes, for class ids 1..C-1.
        device: ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``.
        precision: ``"fp32"``, or ``"bf16"``/``"fp16"`` run under autocast, or ``"int8"``
            for a ``network`` quantized by ``model.quantize`` (CPU only). Never ``"auto"``:
            building a Detector measures nothing; ``Detector.load(..., precision="auto")``
            times the candidates first (``model.inference.autotune.choose_inference_precision``) and
            builds the Detector at the winner.
        pixel_mean: RGB mean subtracted from 0-255 pixels, as the network was trained with.
        resize: how images are resized to the input, as the network was trained with
            (``model.network.preprocessing.RESIZES``).
        nms_iou, top_k: post-processing settings (paper defaults 0.45 and 400).
        precision_choice: what the measurement that chose ``precision`` found, if one ran.
    """

    def __init__(
        self,
        network: SSD | QuantizableSSD,
        class_names: Sequence[str],
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        resize: str = "antialias",
        nms_iou: float = NMS_IOU,
        top_k: int = TOP_K,
        precision_choice: PrecisionChoice | None = None,
    ) -> None:
        if len(class_names) != network.num_classes - 1:
            raise ValueError(
                f"the network has {network.num_classes - 1} foreground classes but "
                f"{len(class_names)} class names were given"
            )
        self.runtime = Runtime.resolve(device, precision)
        if (self.runtime.precision == INT8) == isinstance(network, SSD):
            raise ValueError(
                f"precision {self.runtime.precision!r} does not fit a {type(network).__name__}: "
                "int8 runs a network quantized by model.quantize (Detector.load(path, "
                "precision='int8')), and only int8 does"
            )
        self.device = self.runtime.device
        self.precision = self.runtime.precision
        self.precision_choice = precision_choice
        self.class_names = list(class_names)
        self.input_size = network.input_size
        self.pixel_mean = tuple(float(m) for m in pixel_mean)
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
        self.resize = resize
        self.nms_iou = nms_iou
        self.top_k = top_k
        self.network: nn.Module = self.runtime.place(network).eval()
        self._default_boxes: Tensor = network.get_buffer("default_boxes").to(self.device)

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str],
        device: str | torch.device = "auto",
        precision: str = "auto",
    ) -> Detector:
        """Load a checkpoint written by ``model.weights.checkpoint.save_checkpoint``, or published
        weights by name (``torchvision:coco``, ``ssd.pytorch:PATH``; ``model.weights.published``),
        converted as they load.

        ``precision`` is as for the constructor, or ``"auto"`` (the service's default too):
        load, time each candidate this device offers on the network
        (``model.inference.autotune.choose_inference_precision``, logged; ``precision_choice`` keeps
        the figures), and build the Detector at the fastest that passes the accuracy guard.
        ``int8`` reads the quantized network from the artifact beside the checkpoint
        (``model.inference.int8.int8_artifact_path``; FileNotFoundError naming it when absent), and
        ``auto`` on the CPU lets it compete when it is there and its recorded mAP@0.5 met the
        guard (``model.inference.int8.guard_shortfall``).
        """
        if precision == INT8:
            network, checkpoint = load_int8(source)
        else:
            checkpoint = load_checkpoint(source)
            network = checkpoint.network
        pixel_mean = checkpoint.normalization.get("mean", PIXEL_MEAN)
        resize = checkpoint.normalization.get("resize", "antialias")
        choice = None
        if precision == "auto":
            on = resolve_device(device)
            quantized = None
            artifact = int8_artifact_for(source) if on.type == "cpu" else None
            if artifact is not None and (short := guard_shortfall(artifact)) is not None:
                log.warning(
                    "%s: int8 fell %.4f mAP@0.5 below fp32 beyond the %.2f guard when it was "
                    "made; auto leaves it out (precision int8 still loads it)",
                    artifact,
                    short,
                    MAP50_GUARD,
                )
            elif artifact is not None:
                quantized, _ = load_int8(source)
            inputs = _noise_inputs(network.input_size, pixel_mean, resize)
            choice = choose_inference_precision(network, on, inputs, quantized)
            precision = choice.precision
            if precision == INT8:
                assert quantized is not None
                network = quantized
        return cls(
            network,
            checkpoint.class_names,
            device=device,
            precision=precision,
            pixel_mean=pixel_mean,
            resize=resize,
            precision_choice=choice,
        )

    @torch.inference_mode()
    def predict(
        self,
        images: Sequence[ImageLike],
        score_threshold: float = 0.3,
        max_detections: int = MAX_DETECTIONS,
        classes: Sequence[str] | None = None,
        nms_iou: float | None = None,
    ) -> list[Detections]:
        """Detect objects in a batch of images, run as one forward pass: ``prepare`` each, then
        ``run_batch`` them with the same ``Cut``.

        Args:
            images: PIL images (any mode: L, RGB, RGBA, CMYK, P, 16-bit) or uint8
                Tensors[C, H, W] with C in (1, 3, 4), each of any size.
            score_threshold: keep detections scoring strictly above this (0..1).
            max_detections: at most this many detections per image.
            classes: class names to keep (``class_ids``), None for all; the cap counts only
                these.
            nms_iou: the per-class NMS overlap (default ``self.nms_iou``).

        Returns:
            One ``Detections`` per image, boxes xyxy in that image's pixels.
        """
        if len(images) == 0:
            return []
        cut = self.cut(score_threshold, max_detections, classes, nms_iou)
        prepared = [self.prepare(image) for image in images]
        return self.run_batch(
            [inputs for inputs, _ in prepared],
            [size for _, size in prepared],
            [cut] * len(prepared),
        ).detections

    def cut(
        self,
        score_threshold: float,
        max_detections: int,
        classes: Sequence[str] | None = None,
        nms_iou: float | None = None,
    ) -> Cut:
        """The ``Cut`` for these settings, class names turned into ids (``class_ids``).

        Raises:
            ValueError: a value out of range, or a class name this model lacks (the message
                lists the valid ones).
        """
        return make_cut(
            self.class_names, self.nms_iou, score_threshold, max_detections, classes, nms_iou
        )

    def class_ids(self, names: Sequence[str]) -> frozenset[int]:
        """The ids (1..C-1) of these class names.

        Raises:
            ValueError: none given, or a name this model lacks; the message lists the valid ones.
        """
        return class_ids_of(self.class_names, names)

    @torch.inference_mode()
    def run_batch(
        self, inputs: Sequence[ModelInput], sizes: Sequence[tuple[int, int]], cuts: Sequence[Cut]
    ) -> BatchResult:
        """Prepared images in, one ``Detections`` per image out: stack, move to the device,
        one forward pass, post-processing. The one way a batch runs.

        Args:
            inputs: network inputs from ``prepare``, each float32 Tensor[3, S, S].
            sizes: each image's (width, height) in pixels, the frame its boxes come back in
                (``prepare`` gives the decoded image's; a caller that decoded at reduced scale
                passes the full size).
            cuts: per image, how its detections are cut (threshold, cap, classes, NMS IoU).

        Returns:
            The detections, one per input in order, and the seconds the forward pass (with
            the stacking and the copy to the device) and the post-processing (box decoding,
            NMS, the cut to each image's settings) took.

        Raises:
            ValueError: the three sequences differ in length (the message gives the lengths),
                or a cut names a class past this model's.
            RuntimeError: the model gave a number of results other than the inputs'.
        """
        count = len(inputs)
        if not count == len(sizes) == len(cuts):
            raise ValueError(
                f"run_batch needs one size and one cut per image; got {count} inputs, "
                f"{len(sizes)} sizes and {len(cuts)} cuts"
            )
        if count == 0:
            return BatchResult([], 0.0, 0.0)
        start = time.perf_counter()
        batch = self.runtime.inputs(torch.stack(list(inputs)))  # N x [3, S, S] -> [N, 3, S, S]
        with self.runtime.autocast():
            loc, conf = self.network(batch)
        if self.device.type == "cuda":  # kernels run asynchronously: count them here
            torch.cuda.synchronize(self.device)
        forwarded = time.perf_counter()
        detections = self._postprocess(loc, conf, sizes, cuts)
        done = time.perf_counter()
        if len(detections) != count:
            raise RuntimeError(f"the model returned {len(detections)} results for {count} inputs")
        return BatchResult(detections, forward_s=forwarded - start, postprocess_s=done - forwarded)

    def warm_up(self) -> None:
        """Run a blank (black) image through ``run_batch``, so the first real batch does not
        pay for the backend's first-call set-up. Call it on the thread that will run batches.
        """
        side = self.input_size
        inputs, size = self.prepare(torch.zeros((3, side, side), dtype=torch.uint8))
        self.run_batch([inputs], [size], [Cut(score_threshold=0.0, max_detections=1)])

    def prepare(self, image: ImageLike) -> tuple[Tensor, tuple[int, int]]:
        """One image to the network's input: float32 Tensor[3, S, S] and its (width, height).

        CPU-only work (colour conversion, resize, mean subtraction): safe to run in a thread.
        It is ``model.network.pixels.prepare_image``, the preparation the ONNX Runtime
        backend runs too, so both backends feed their networks the same input; it computes
        what training's ``preprocess`` does (the same filter; ``pixels``' docstring gives the
        rounding that may differ).
        """
        if isinstance(image, Tensor):
            # uint8 RGB (3, H, W) -> (H, W, 3) for Pillow
            image = Image.fromarray(to_rgb_tensor(image.cpu()).permute(1, 2, 0).numpy())
        array, size = prepare_image(image, self.input_size, self.pixel_mean, self.resize)
        return torch.from_numpy(array), size

    def _postprocess(
        self,
        loc: Tensor,
        conf: Tensor,
        sizes: Sequence[tuple[int, int]],
        cuts: Sequence[Cut],
    ) -> list[Detections]:
        """Raw outputs (loc Tensor[N, P, 4], conf Tensor[N, P, C] logits) to detections on the
        CPU, with class names, in each image's pixels
        (``model.network.postprocess.postprocess_each``)."""
        outputs = postprocess_each(
            loc.float(),
            conf.float(),
            self._default_boxes,
            list(sizes),
            cuts,
            top_k=self.top_k,
        )
        results = []
        for boxes, scores, class_ids in outputs:
            labels = [self.class_names[i - 1] for i in class_ids.tolist()]
            results.append(Detections(boxes.cpu(), scores.cpu(), class_ids.cpu(), labels))
        return results


def _noise_inputs(side: int, pixel_mean: Sequence[float], resize: str) -> Tensor:
    """``BATCH_SIZE`` prepared noise images, Tensor[N, 3, side, side] float32, to time the
    precisions on; seeded, so every start measures the same inputs."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=generator)
    prepared = preprocess([pixels], side, tuple(float(m) for m in pixel_mean), resize)[0]
    return torch.stack([prepared] * BATCH_SIZE)


# What ``Detector.prepare`` makes of one image (float32 Tensor[3, S, S]) and ``run_batch``
# takes back: callers that only queue it (the service's batcher) name it by this.
ModelInput = Tensor
