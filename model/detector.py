"""The Detector: images of any size and colour mode in, detections in each image's pixels out."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from model.autotune import BATCH_SIZE, PrecisionChoice, candidates, choose_precision
from model.buckets import bucket_for
from model.checkpoint import load_checkpoint
from model.cuda_graphs import BucketedForward, capture_cuda_graph
from model.decoding import decode_images
from model.int8 import QuantizableSSD, int8_artifact_for, load_int8
from model.postprocess import MAX_DETECTIONS, NMS_IOU, TOP_K, Detections, postprocess
from model.preprocessing import PIXEL_MEAN, RESIZES, ImageLike, preprocess, to_rgb_tensor
from model.runtime import INT8, Runtime
from model.ssd import SSD

log = logging.getLogger("model.detector")


class Detector:
    """An SSD network with its class names, ready to run on images.

    Args:
        network: an ``SSD`` (from a builder or a checkpoint).
        class_names: names of the foreground classes, for class ids 1..C-1.
        device: ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``.
        precision: ``"fp32"``, or ``"bf16"``/``"fp16"`` run under autocast, or ``"int8"``
            for a ``network`` quantized by ``model.quantize`` (CPU only; ``Detector.load``
            finds it beside the checkpoint), or ``"auto"``: time each precision this device
            offers on this network, here, and keep the fastest that passes the accuracy guard
            (``model.autotune``; about 1.5 s for the shipped model, a few seconds for a
            full-width SSD300 on 2 CPU cores; logged; ``precision_choice`` keeps the figures).
        int8_network: with ``"auto"`` on the CPU, ``network`` quantized by ``model.quantize``,
            which then competes as the ``int8`` candidate.
        cuda_graphs: on a GPU, run batches through a captured CUDA graph per bucket
            (``model.cuda_graphs``); False runs them eagerly (to compare the two).
        pixel_mean: RGB mean subtracted from 0-255 pixels, as the network was trained with.
        resize: how images are resized to the input, as the network was trained with
            (``model.preprocessing.RESIZES``).
        nms_iou, top_k: post-processing settings (paper defaults 0.45 and 400).
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
        int8_network: QuantizableSSD | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        if len(class_names) != network.num_classes - 1:
            raise ValueError(
                f"the network has {network.num_classes - 1} foreground classes but "
                f"{len(class_names)} class names were given"
            )
        # Resolved here, not at warm-up: the precision is then fixed for the object's life,
        # and whoever reports it (/model, ssd_model_info) can read it as soon as it exists.
        measure = precision == "auto"
        self.runtime = Runtime.resolve(device, "fp32" if measure else precision)
        if (self.runtime.precision == INT8) == isinstance(network, SSD):
            raise ValueError(
                f"precision {self.runtime.precision!r} does not fit a {type(network).__name__}: "
                "int8 runs a network quantized by model.quantize (Detector.load(path, "
                "precision='int8')), and only int8 does"
            )
        self.device = self.runtime.device
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
        self.precision_choice: PrecisionChoice | None = None
        if measure:
            quantized = None
            if int8_network is not None and self.device.type == "cpu":
                quantized = self.runtime.place(int8_network).eval()
            self.precision_choice = self._measure_precision(quantized)
            self.runtime = Runtime(self.device, self.precision_choice.precision)
            if self.runtime.precision == INT8:
                assert quantized is not None
                self.network = quantized
            else:  # the layout follows the precision (channels_last for fp16/bf16 on a GPU)
                self.network = self.runtime.place(self.network)
            log.info("%s", self.precision_choice.summary())
        self.precision = self.runtime.precision
        # Made once the network and precision are final: a captured graph holds both.
        capture = capture_cuda_graph if self.device.type == "cuda" and cuda_graphs else None
        self._forward = BucketedForward(self._eager_forward, capture)
        self._copy_stream: torch.cuda.Stream | None = None  # made by the first ``stage``

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "auto",
        precision: str = "auto",
    ) -> Detector:
        """Load a checkpoint written by ``model.checkpoint.save_checkpoint``, or published
        weights by name (``torchvision:coco``, ``ssd.pytorch:PATH``; ``model.published``),
        converted as they load; ``precision``
        as for the constructor (``auto``, the service's default too, measures). ``int8``
        reads the quantized network from the artifact beside the checkpoint
        (``model.int8.int8_artifact_path``; FileNotFoundError naming it when absent), and
        ``auto`` on the CPU lets it compete when it is there."""
        int8_network = None
        if precision == INT8:
            network, checkpoint = load_int8(path)
        else:
            checkpoint = load_checkpoint(path)
            network = checkpoint.network
            on_cpu = Runtime.resolve(device, "fp32").device.type == "cpu"
            if precision == "auto" and on_cpu and int8_artifact_for(path) is not None:
                int8_network, _ = load_int8(path)
        return cls(
            network,
            checkpoint.class_names,
            device=device,
            precision=precision,
            int8_network=int8_network,
            pixel_mean=checkpoint.normalization.get("mean", PIXEL_MEAN),
            resize=checkpoint.normalization.get("resize", "antialias"),
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

        The stages are also public, for callers that batch or time them separately (the
        service): ``prepare`` each image (on any thread), then ``run_batch`` the prepared
        inputs with per-image settings.
        """
        if len(images) == 0:
            return []
        prepared = [self.prepare(image) for image in images]
        count = len(prepared)
        return self.run_batch(
            [inputs for inputs, _ in prepared],
            [size for _, size in prepared],
            [score_threshold] * count,
            [max_detections] * count,
        ).detections

    @torch.inference_mode()
    def run_batch(
        self,
        inputs: Sequence[ModelInput],
        sizes: Sequence[tuple[int, int]],
        score_thresholds: Sequence[float],
        max_detections: Sequence[int],
    ) -> BatchResult:
        """Prepared images in, one ``Detections`` per image out: stack, one forward pass, decode.

        Args:
            inputs: network inputs from ``prepare``, each float32 Tensor[3, S, S].
            sizes: each image's (width, height) in pixels, the frame its boxes come back in
                (``prepare`` gives the decoded image's; a caller that decoded at reduced scale
                passes the full size).
            score_thresholds: per image, keep detections scoring strictly above this (0..1).
            max_detections: per image, at most this many detections (>= 1).

        Returns:
            The detections, one per input in order, and the seconds the forward pass and the
            decoding (box decoding, NMS, the cut to each image's settings) took.

        Raises:
            ValueError: the four sequences differ in length (the message gives the lengths),
                or a threshold or cap is out of range.
            RuntimeError: the model gave a number of results other than the inputs'.
        """
        count = len(inputs)
        _check_lengths("run_batch", (count, "inputs"), sizes, score_thresholds, max_detections)
        if count == 0:
            return BatchResult([], 0.0, 0.0)
        staged = self.stage(inputs)
        result = self.run_staged(staged, sizes, score_thresholds, max_detections)
        return replace(result, forward_s=staged.seconds + result.forward_s)

    @torch.inference_mode()
    def stage(self, inputs: Sequence[ModelInput]) -> StagedBatch:
        """The part of ``run_batch`` before the forward pass: prepared images stacked into one
        batch on the device, in the network's dtype-ready layout. A server stages the next
        batch on a thread of its own while the current one runs (``app.batcher``).

        On a GPU the copy runs on a CUDA stream of its own, from pinned memory, and the
        batch's forward pass waits for it through an event, not for the whole device.

        Raises:
            ValueError: no inputs.
        """
        if len(inputs) == 0:
            raise ValueError("stage needs at least one input, got none")
        started = time.perf_counter()
        batch = torch.stack(list(inputs))  # N x Tensor[3, S, S] -> [N, 3, S, S]
        if self.device.type != "cuda":
            return StagedBatch(self.runtime.inputs(batch), None, time.perf_counter() - started)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            on_device = self.runtime.inputs(batch)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return StagedBatch(on_device, ready, time.perf_counter() - started)

    @torch.inference_mode()
    def run_staged(
        self,
        staged: StagedBatch,
        sizes: Sequence[tuple[int, int]],
        score_thresholds: Sequence[float],
        max_detections: Sequence[int],
    ) -> BatchResult:
        """``run_batch`` from a batch ``stage`` made: one forward pass, then decoding.

        Raises:
            ValueError: the batch and the three sequences differ in length.
            RuntimeError: the model gave a number of results other than the batch's.
        """
        count = staged.tensor.shape[0]
        _check_lengths("run_staged", (count, "images"), sizes, score_thresholds, max_detections)
        start = time.perf_counter()
        if staged.ready is not None:  # the copy stream's work, before this stream's reads
            current = torch.cuda.current_stream(self.device)
            current.wait_event(staged.ready)
            staged.tensor.record_stream(current)  # freed only once this stream is done
        loc, conf = self._forward(staged.tensor)
        forwarded = time.perf_counter()
        detections = self.decode(loc, conf, sizes, score_thresholds, max_detections)
        done = time.perf_counter()
        if len(detections) != count:
            raise RuntimeError(f"the model returned {len(detections)} results for {count} inputs")
        return BatchResult(detections, forward_s=forwarded - start, postprocess_s=done - forwarded)

    def warm_up(self, max_batch_size: int = 1) -> None:
        """Run a blank (black) image through ``run_batch``, so the first real batch does not
        pay for the backend's first-call set-up. Call it on the thread that will run batches.

        Where the forward pass is captured (a GPU), a blank batch runs at every bucket up to
        the one that holds ``max_batch_size``, so each bucket's CUDA graph is captured now and
        not on the first request of that size.
        """
        side = self.input_size
        inputs, size = self.prepare(torch.zeros((3, side, side), dtype=torch.uint8))
        counts = [1]
        if self._forward.capturing:
            top = bucket_for(max_batch_size, self._forward.buckets) or self._forward.buckets[-1]
            counts = [bucket for bucket in self._forward.buckets if bucket <= top]
        for count in counts:
            self.run_batch([inputs] * count, [size] * count, [0.0] * count, [1] * count)

    @torch.inference_mode()
    def _measure_precision(self, quantized: nn.Module | None) -> PrecisionChoice:
        """Time the candidate precisions on a fixed batch of noise images (seeded, so every
        start measures the same inputs), int8 among them when ``quantized`` is given; see
        ``model.autotune.choose_precision``."""
        generator = torch.Generator().manual_seed(0)
        side = self.input_size
        pixels = torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=generator)
        inputs = torch.stack([self.prepare(pixels)[0]] * BATCH_SIZE)

        def forward(name: str, batch: Tensor) -> Tensor:
            runtime = Runtime(self.device, name)
            network = quantized if name == INT8 else self.network
            with runtime.autocast():
                _, conf = network(runtime.inputs(batch))
            return conf.float().cpu()  # the copy waits for a GPU to finish

        names = candidates(self.device) + ([INT8] if quantized is not None else [])
        return choose_precision(forward, inputs, names)

    def prepare(self, image: ImageLike) -> tuple[Tensor, tuple[int, int]]:
        """One image to the network's input: float32 Tensor[3, S, S] and its (width, height).

        CPU-only work (colour conversion, resize, mean subtraction): safe to run in a thread.
        """
        rgb = to_rgb_tensor(image)
        size = (int(rgb.shape[2]), int(rgb.shape[1]))
        return preprocess([rgb], self.input_size, self.pixel_mean, self.resize)[0], size

    def prepare_encoded(self, encoded: Sequence[bytes]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Encoded images (JPEG, PNG, WebP, BMP bytes) to network inputs on the device.

        On a GPU the JPEGs are decoded there as one batch (nvJPEG), and resizing and mean
        subtraction run there too, with ``preprocess`` as in ``prepare``; on the CPU the same
        steps run on the CPU. Other formats, CMYK JPEGs and JPEGs the batch decoder refuses
        are decoded by Pillow (``model.decoding``). Sizes are checked by no one here: bytes
        from strangers are checked first (the service's ``app.intake.open_image``).

        Returns:
            float32 Tensor[N, 3, S, S] on the device, whose rows ``run_batch`` takes as its
            inputs, and each image's (width, height) as displayed (EXIF orientation applied).

        Raises:
            ValueError: no images, or one that cannot be decoded (the message names its index).
        """
        if len(encoded) == 0:
            raise ValueError("prepare_encoded needs at least one image, got none")
        images = decode_images(encoded, self.device)
        sizes = [(int(image.shape[2]), int(image.shape[1])) for image in images]
        return preprocess(images, self.input_size, self.pixel_mean, self.resize), sizes

    @torch.inference_mode()
    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Run the network on prepared inputs Tensor[N, 3, S, S]; returns float32 (loc, conf).

        On a GPU the batch runs through the CUDA graph of its bucket, padded to the bucket's
        size (``model.cuda_graphs``); eagerly on the CPU or where capture fails.
        """
        return self._forward(self.runtime.inputs(inputs))

    def _eager_forward(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """The network on ``batch`` already on the device, in its layout: float32 (loc, conf).
        No autocast cache: this is also the pass a CUDA graph captures."""
        with self.runtime.autocast(cache=False):
            loc, conf = self.network(batch)
        return loc.float(), conf.float()

    @torch.inference_mode()
    def decode(
        self,
        loc: Tensor,
        conf: Tensor,
        sizes: Sequence[tuple[int, int]],
        score_threshold: float | Sequence[float] = 0.3,
        max_detections: int | Sequence[int] = MAX_DETECTIONS,
    ) -> list[Detections]:
        """Raw outputs to detections in each image's pixels (``sizes``: (width, height) each).

        ``score_threshold`` and ``max_detections`` may be given per image. The batch is
        post-processed once at the lowest threshold and the highest cap, then each image is
        cut to its own: NMS visits boxes in score order, so boxes below an image's threshold
        never suppress boxes above it and the result equals a run at that threshold alone.
        """
        count = len(sizes)
        thresholds = _per_image(score_threshold, count, "score_threshold")
        caps = _per_image(max_detections, count, "max_detections")
        if any(not 0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if any(c < 1 for c in caps):
            raise ValueError(f"max_detections must be >= 1, got {max_detections}")
        outputs = postprocess(
            loc,
            conf,
            self._default_boxes,
            list(sizes),
            score_threshold=min(thresholds),
            nms_iou=self.nms_iou,
            top_k=self.top_k,
            max_detections=max(caps),
        )
        if len(outputs) != count:
            raise RuntimeError(f"post-processing returned {len(outputs)} results for {count}")
        results = []
        for (boxes, scores, class_ids), threshold, cap in zip(
            outputs, thresholds, caps, strict=True
        ):
            keep = (scores > threshold).nonzero().flatten()[:cap]
            boxes, scores, class_ids = boxes[keep].cpu(), scores[keep].cpu(), class_ids[keep].cpu()
            labels = [self.class_names[i - 1] for i in class_ids.tolist()]
            results.append(Detections(boxes, scores, class_ids, labels))
        return results


def _per_image(value: float | Sequence[float], count: int, name: str) -> list:
    """A scalar repeated for every image, or a sequence checked to have one value per image."""
    if isinstance(value, int | float):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"{name}: got {len(values)} values for {count} images")
    return values


# What ``Detector.prepare`` makes of one image (float32 Tensor[3, S, S]) and ``run_batch``
# takes back: callers that only queue it (the service's batcher) name it by this.
ModelInput = Tensor


def _check_lengths(
    caller: str,
    batch: tuple[int, str],
    sizes: Sequence[object],
    score_thresholds: Sequence[object],
    max_detections: Sequence[object],
) -> None:
    """Raise ValueError, naming every length, unless the batch's (count, noun) and the three
    per-image sequences agree."""
    count, noun = batch
    lengths = (count, len(sizes), len(score_thresholds), len(max_detections))
    if len(set(lengths)) != 1:
        raise ValueError(
            f"{caller} needs one size, threshold and cap per image; got {count} {noun}, "
            f"{lengths[1]} sizes, {lengths[2]} score_thresholds and {lengths[3]} max_detections"
        )


@dataclass(frozen=True)
class StagedBatch:
    """A batch ``Detector.stage`` made for ``Detector.run_staged``: Tensor[N, 3, S, S] on the
    device in the network's layout; on a GPU the event its copy recorded (else None); and the
    host seconds staging took."""

    tensor: Tensor
    ready: torch.cuda.Event | None
    seconds: float


@dataclass(frozen=True)
class BatchResult:
    """What ``Detector.run_batch`` gives: one ``Detections`` per input, in order, and the
    wall-clock seconds of the batch's forward pass (with its staging, in ``run_batch``) and of
    its decoding (post-processing)."""

    detections: list[Detections]
    forward_s: float
    postprocess_s: float
