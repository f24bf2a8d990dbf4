"""The ``OnnxDetector``: a ``full`` ONNX file from ``model.export`` served through ONNX
Runtime, with the torch ``Detector``'s serving interface and no torch.

Decoding, NMS and the per-image cuts run inside the graph (it is this project's
``postprocess_padded``, exported), so there is no second post-processing here: this class
prepares images (``model.network.pixels``), feeds the graph each image's threshold and class
mask, one call per NMS IoU as ``postprocess_each`` groups them, and cuts the padded rows.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from model.network.detections import (
    MAX_DETECTIONS,
    BatchResult,
    Cut,
    Detections,
    class_ids_of,
    class_mask,
    make_cut,
)
from model.network.pixels import prepare_image

# ``metadata_props["graph"]`` of a file this class serves (model.export's FULL).
FULL_GRAPH = "full"
# ONNX Runtime logs warnings about the graph's overridable inputs (its defaults) at every
# session start: 3 is "error" and above only.
_LOG_ERRORS_ONLY = 3


class OnnxModelError(ValueError):
    """An .onnx file that cannot be served; the message names the file and why."""


class OnnxDetector:
    """A ``full`` ONNX graph run by ONNX Runtime on the CPU, images in, detections out.

    The interface the service uses of ``Detector``: ``class_names``, ``input_size``,
    ``device`` (``"cpu"``), ``precision`` (``"fp32"``, or ``"int8"`` for a file from
    ``model.inference.onnx_int8``), ``cut``, ``class_ids``, ``prepare``,
    ``run_batch``, ``warm_up``; and ``predict`` for scripts.

    Args:
        path: a .onnx file written by ``python -m model.export --graph full``.
        threads: ONNX Runtime's intra-op threads; None lets it choose (one per core).

    Raises:
        FileNotFoundError: no file at ``path``.
        OnnxModelError: the file is not a readable ONNX model, or not a ``full`` graph with
            this project's metadata (the message names the file).
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {path}")
        options = ort.SessionOptions()
        options.log_severity_level = _LOG_ERRORS_ONLY
        # ONNX Runtime's intra-op threads spin between operations by default, taking the
        # cores from the service's decode threads and event loop: on 2 cores the int8 service
        # ran at 0.4-0.5x with spinning on (docs/performance.md, "INT8").
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail)
            raise OnnxModelError(f"{path}: not a readable ONNX model ({exc})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("graph") != FULL_GRAPH:
            raise OnnxModelError(
                f"{path}: not a full graph from python -m model.export (its metadata says "
                f"graph={meta.get('graph')!r}); export one with --graph full"
            )
        try:
            self.class_names: list[str] = list(json.loads(meta["class_names"]))
            self.input_size = int(meta["input_size"])
            self.pixel_mean = tuple(float(m) for m in json.loads(meta["pixel_mean"]))
            self.resize = meta["resize"]
            self.nms_iou = float(meta["nms_iou"])
            self.top_k = int(meta["top_k"])
            self.max_detections = int(meta["max_detections"])
        except (KeyError, ValueError, TypeError) as exc:
            raise OnnxModelError(f"{path}: its metadata lacks or garbles {exc}") from None
        self.path = path
        self.device = "cpu"
        # "int8" for a graph quantized by model.inference.onnx_int8, which says so
        self.precision = meta.get("precision", "fp32")

    def cut(
        self,
        score_threshold: float,
        max_detections: int,
        classes: Sequence[str] | None = None,
        nms_iou: float | None = None,
    ) -> Cut:
        """The ``Cut`` for these settings, as ``Detector.cut`` gives it.

        Raises:
            ValueError: a value out of range, a class name this model lacks, or more
                detections than the file keeps per image (``max_detections`` of the export).
        """
        if max_detections > self.max_detections:
            raise ValueError(
                f"max_detections {max_detections} is more than the {self.max_detections} "
                f"per image that {self.path.name} keeps (re-export it with python -m "
                "model.export --max-detections N)"
            )
        return make_cut(
            self.class_names, self.nms_iou, score_threshold, max_detections, classes, nms_iou
        )

    def class_ids(self, names: Sequence[str]) -> frozenset[int]:
        """The ids (1..C-1) of these class names (``model.network.detections.class_ids_of``)."""
        return class_ids_of(self.class_names, names)

    def prepare(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """One PIL image (any mode) to the graph's input: float32 array [3, S, S] and its
        (width, height) (``model.network.pixels.prepare_image``). Safe on any thread."""
        return prepare_image(image, self.input_size, self.pixel_mean, self.resize)

    def run_batch(
        self, inputs: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]], cuts: Sequence[Cut]
    ) -> BatchResult:
        """Prepared images in, one ``Detections`` per image out (boxes float32 [K, 4] xyxy in
        each image's pixels, scores float32 [K], class ids int64 [K], numpy), as
        ``Detector.run_batch`` gives them. ``forward_s`` is the graph's time (network and
        post-processing both run in it); ``postprocess_s`` the cutting of its padded rows.

        Raises:
            ValueError: the three sequences differ in length, or a cut names a class past
                this model's or asks for more detections than the file keeps.
        """
        count = len(inputs)
        if not count == len(sizes) == len(cuts):
            raise ValueError(
                f"run_batch needs one size and one cut per image; got {count} inputs, "
                f"{len(sizes)} sizes and {len(cuts)} cuts"
            )
        if count == 0:
            return BatchResult([], 0.0, 0.0)
        num_classes = len(self.class_names) + 1
        class_mask(cuts, num_classes)  # names a class id past the model's before any work
        for cut in cuts:
            if cut.max_detections > self.max_detections:
                raise ValueError(
                    f"a cut asks for {cut.max_detections} detections; {self.path.name} keeps "
                    f"{self.max_detections} per image"
                )
        batch = np.stack(inputs)  # N x [3, S, S] -> [N, 3, S, S]
        keep_all = np.ones((1, num_classes - 1), dtype=bool)  # every input fed: see export
        results: list[Detections | None] = [None] * count
        forward_s = postprocess_s = 0.0
        # One graph call per NMS IoU (the graph's NMS takes one), as postprocess_each groups.
        for nms_iou in sorted({cut.nms_iou for cut in cuts}):
            members = [i for i, cut in enumerate(cuts) if cut.nms_iou == nms_iou]
            group = [cuts[i] for i in members]
            feed: dict[str, Any] = {
                "images": batch[members],
                "image_sizes": np.asarray([sizes[i] for i in members], np.float32),
                "score_threshold": np.asarray([c.score_threshold for c in group], np.float32),
                "class_mask": keep_all
                if (mask := class_mask(group, num_classes)) is None
                else mask,
                "nms_iou": np.asarray([nms_iou], np.float32),
            }
            start = time.perf_counter()
            boxes, scores, class_ids, counts = self.session.run(None, feed)
            ran = time.perf_counter()
            for row, (i, cut) in enumerate(zip(members, group, strict=True)):
                keep = min(int(counts[row]), cut.max_detections)
                ids = class_ids[row, :keep]
                labels = [self.class_names[k - 1] for k in ids.tolist()]
                results[i] = Detections(boxes[row, :keep], scores[row, :keep], ids, labels)
            forward_s += ran - start
            postprocess_s += time.perf_counter() - ran
        detections = [result for result in results if result is not None]
        if len(detections) != count:
            raise RuntimeError(f"the model returned {len(detections)} results for {count} inputs")
        return BatchResult(detections, forward_s=forward_s, postprocess_s=postprocess_s)

    def predict(
        self,
        images: Sequence[Image.Image],
        score_threshold: float = 0.3,
        max_detections: int = MAX_DETECTIONS,
        classes: Sequence[str] | None = None,
        nms_iou: float | None = None,
    ) -> list[Detections]:
        """``prepare`` each image, then ``run_batch`` them with one ``Cut``, as
        ``Detector.predict`` does."""
        if len(images) == 0:
            return []
        cut = self.cut(score_threshold, max_detections, classes, nms_iou)
        prepared = [self.prepare(image) for image in images]
        return self.run_batch(
            [inputs for inputs, _ in prepared], [size for _, size in prepared], [cut] * len(images)
        ).detections

    def warm_up(self) -> None:
        """Run a black image through ``run_batch``, so the first real batch does not pay for
        ONNX Runtime's first-call set-up."""
        side = self.input_size
        inputs, size = self.prepare(Image.new("RGB", (side, side)))
        self.run_batch([inputs], [size], [Cut(score_threshold=0.0, max_detections=1)])
