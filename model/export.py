"""Export a detector to ONNX: ``python -m model.export SOURCE --format onnx --out FILE``.

SOURCE is anything ``Detector.load`` takes: a checkpoint file, or published weights by name
(``torchvision:coco``, ``ssd.pytorch:PATH``). Two graphs (docs/export.md has the details):

* ``full`` (default): image batch in, detections out. The network, then this project's own
  post-processing (``model.network.postprocess.postprocess_padded``: softmax, per-class
  top-k, box decoding, clipping, per-class NMS as ONNX ``NonMaxSuppression``), traced into
  the graph. Inputs:

  - ``images`` float32 [N, 3, S, S]: RGB 0-255, resized to S x S, minus ``pixel_mean``
    (the file's metadata says S, the mean and the resize);
  - ``image_sizes`` float32 [N or 1, 2], each image's (width, height) in pixels; default
    (1, 1): boxes relative to the image;
  - ``score_threshold`` float32 [N or 1]: keep scores strictly above it; default 0.3;
  - ``class_mask`` bool [N or 1, C-1]: the classes (ids 1..C-1) each image keeps; default
    all;
  - ``nms_iou`` float32 [1]: per-class NMS overlap; default 0.45 (one value per call).

  The last four have defaults stored as initializers, so a consumer of ONNX Runtime may
  feed ``images`` alone. OpenVINO folds inputs that have initializers into constants
  (checked here; TensorRT and Triton were not), so ``--no-defaults`` makes all five plain,
  required inputs for such runtimes.

  Outputs, K = ``max_detections`` (200 unless ``--max-detections``): ``boxes``
  float32 [N, K, 4] xyxy, ``scores`` float32 [N, K], ``class_ids`` int64 [N, K] (1..C-1)
  and ``counts`` int64 [N]. Row i holds ``counts[i]`` detections by descending score, then
  padding rows of zeros (class id 0 is background, never a detection).

* ``raw``: ``images`` in, the network's ``offsets`` float32 [N, P, 4] and class ``logits``
  float32 [N, P, C] (class 0 background) out; the default boxes (cx, cy, w, h relative to
  the input) and the box coding's variances are in the metadata for the consumer's own
  decoding (``model.network.box_coding``).

The batch size N is dynamic in both. Every file carries metadata_props: ``graph``,
``class_names`` (JSON), ``input_size``, ``pixel_mean`` (JSON), ``resize``, ``opset``,
``top_k``, ``max_detections``, ``nms_iou``, ``score_threshold``, ``source``, and for ``raw``
``default_boxes`` and ``variances`` (JSON). ``model.inference.onnx_detector`` serves a
``full`` file without torch.

The exporter is torch's TorchScript-based one (``dynamo=False``): it traces the
data-dependent post-processing (``nonzero``, NMS through torchvision's registered ONNX
symbolic) that the newer ``torch.export`` path does not take without rewriting it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from model.inference.detector import Detector
from model.network.box_coding import VARIANCES
from model.network.detections import MAX_DETECTIONS
from model.network.postprocess import postprocess_padded

log = logging.getLogger("model.export")

GRAPHS = ("full", "raw")
# ONNX opset 17 (ONNX 1.12, 2022): read by ONNX Runtime >= 1.12, TensorRT >= 8.6 and
# OpenVINO >= 2022.3; NonMaxSuppression needs >= 11. The TorchScript exporter writes <= 20.
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 11, 20
# What metadata_props ``graph`` says, read back by model.inference.onnx_detector.
FULL, RAW = GRAPHS
_FULL_INPUTS = ("images", "image_sizes", "score_threshold", "class_mask")
_FULL_OUTPUTS = ("boxes", "scores", "class_ids", "counts")
_RAW_OUTPUTS = ("offsets", "logits")
_DEFAULT_SCORE_THRESHOLD = 0.3  # model.network.detections.Cut's default


class _FullPipeline(nn.Module):
    """The network and ``postprocess_padded``, as one module to trace."""

    def __init__(self, network: nn.Module, default_boxes: Tensor, detector: Detector, k: int):
        super().__init__()
        self.network = network
        self.register_buffer("default_boxes", default_boxes)
        self.nms_iou = detector.nms_iou
        self.top_k = detector.top_k
        self.max_detections = k

    def forward(
        self, images: Tensor, image_sizes: Tensor, score_threshold: Tensor, class_mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        loc, conf = self.network(images)
        return postprocess_padded(
            loc,
            conf,
            self.default_boxes,
            image_sizes,
            score_threshold,
            class_mask,
            nms_iou=self.nms_iou,
            top_k=self.top_k,
            max_detections=self.max_detections,
        )


def export_onnx(
    source: str | os.PathLike[str] | Detector,
    out: str | os.PathLike[str],
    *,
    graph: str = FULL,
    opset: int = DEFAULT_OPSET,
    max_detections: int = MAX_DETECTIONS,
    defaults: bool = True,
) -> Path:
    """Write ``source`` as an ONNX file at ``out`` and check it with the ONNX checker.

    Args:
        source: a checkpoint path or a published name (loaded with ``Detector.load`` on the
            CPU in fp32), or a loaded fp32/bf16/fp16 ``Detector`` (exported in fp32 on the
            CPU; its ``nms_iou`` and ``top_k`` become the graph's).
        out: the .onnx file to write (its folder must exist).
        graph: ``"full"`` or ``"raw"`` (module docstring).
        opset: the ONNX opset, 11..20.
        max_detections: K, the padded rows per image of a ``full`` graph (>= 1).
        defaults: give a ``full`` graph's optional inputs their defaults (initializers of
            the same name, honoured by ONNX Runtime); False makes every input required, for
            runtimes that fold such inputs into constants (OpenVINO does).

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: an unknown graph, an opset out of range, K < 1, or an int8 Detector.
    """
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be in {MIN_OPSET}..{MAX_OPSET}, got {opset}")
    if max_detections < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections}")
    detector = (
        source
        if isinstance(source, Detector)
        else Detector.load(source, device="cpu", precision="fp32")
    )
    if detector.precision == "int8":
        raise ValueError("an int8 Detector cannot be exported: load the checkpoint in fp32")
    network = detector.network
    default_boxes = network.get_buffer("default_boxes").float().cpu()
    network = network.float().cpu().eval()
    size = detector.input_size
    num_classes = len(detector.class_names) + 1
    # Two example images: a batch of one would let the tracer fold the batch axis away.
    images = torch.zeros(2, 3, size, size)
    out = Path(out)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice and the tracer's notes on Python ints
        # taken from shapes (the number of default boxes, fixed per network) say nothing here.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # Advanced indexing with negative indices would go wrong; every index here is >= 0.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        if graph == FULL:
            module: nn.Module = _FullPipeline(network, default_boxes, detector, max_detections)
            args: tuple[Tensor, ...] = (
                images,
                torch.ones(2, 2),
                torch.full((2,), _DEFAULT_SCORE_THRESHOLD),
                torch.ones(2, num_classes - 1, dtype=torch.bool),
            )
            names, outputs = list(_FULL_INPUTS), list(_FULL_OUTPUTS)
            axes = {name: {0: "batch"} for name in names + outputs}
        else:
            module, args = network, (images,)
            names, outputs = ["images"], list(_RAW_OUTPUTS)
            axes = {name: {0: "batch"} for name in names + outputs}
        torch.onnx.export(
            module,
            args,
            str(out),
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=outputs,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    model = onnx.load(str(out))
    if graph == FULL:
        _add_defaults(model, num_classes, max_detections, defaults)
    metadata = {
        "graph": graph,
        "class_names": json.dumps(detector.class_names),
        "input_size": str(size),
        "pixel_mean": json.dumps(list(detector.pixel_mean)),
        "resize": detector.resize,
        "opset": str(opset),
        "top_k": str(detector.top_k),
        "max_detections": str(max_detections),
        "nms_iou": str(detector.nms_iou),
        "score_threshold": str(_DEFAULT_SCORE_THRESHOLD),
        "source": str(source) if not isinstance(source, Detector) else "a loaded Detector",
    }
    if graph == RAW:
        metadata["default_boxes"] = json.dumps(default_boxes.tolist())
        metadata["variances"] = json.dumps(list(VARIANCES))
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    return out


def _add_defaults(model: onnx.ModelProto, num_classes: int, k: int, defaults: bool) -> None:
    """Give the ``full`` graph's optional inputs their defaults as initializers of the same
    name (an input with an initializer is an overridable default, ONNX IR >= 4), and turn
    NonMaxSuppression's IoU threshold, a constant in the traced graph, into the ``nms_iou``
    input (torchvision's ``batched_nms`` puts the NMS in a subgraph, the else branch of its
    no-boxes test, which reads the outer graph's inputs by name); name the outputs' K axis
    by its size, ``k``. Without ``defaults`` the inputs stay required."""
    graph = model.graph
    found = [(owner, node) for owner, node in _nodes(graph) if node.op_type == "NonMaxSuppression"]
    if len(found) != 1:
        raise RuntimeError(f"expected one NonMaxSuppression node in the graph, got {len(found)}")
    owner, nms = found[0]
    iou_value = _constant_value(owner, nms.input[3])
    users = [node for _, node in _nodes(graph) if nms.input[3] in node.input]
    if len(users) == 1:  # the constant only fed the NMS: drop it
        for node in list(owner.node):
            if node.op_type == "Constant" and node.output[0] == nms.input[3]:
                owner.node.remove(node)
    nms.input[3] = "nms_iou"
    graph.input.append(helper.make_tensor_value_info("nms_iou", TensorProto.FLOAT, [1]))
    values = {
        "image_sizes": np.ones((1, 2), dtype=np.float32),
        "score_threshold": np.full((1,), _DEFAULT_SCORE_THRESHOLD, dtype=np.float32),
        "class_mask": np.ones((1, num_classes - 1), dtype=bool),
        "nms_iou": iou_value.astype(np.float32).reshape(1),
    }
    for name, value in values.items() if defaults else ():
        graph.initializer.append(numpy_helper.from_array(value, name))
    # The optional inputs take [N, ...] or [1, ...]: name their first axis apart from N's.
    for value_info in graph.input:
        if value_info.name in ("image_sizes", "score_threshold", "class_mask"):
            value_info.type.tensor_type.shape.dim[0].dim_param = "batch_or_1"
    # The outputs' shapes as the docstring gives them (the tracer names K after an operator).
    shapes = {"boxes": ["batch", k, 4], "scores": ["batch", k], "class_ids": ["batch", k]}
    for value_info in graph.output:
        if value_info.name in shapes:
            dims = value_info.type.tensor_type.shape.dim
            for dim, value in zip(dims, shapes[value_info.name], strict=True):
                if isinstance(value, int):
                    dim.dim_value = value
                else:
                    dim.dim_param = value


def _nodes(graph: onnx.GraphProto) -> Iterator[tuple[onnx.GraphProto, onnx.NodeProto]]:
    """Every node of ``graph`` and of its subgraphs (If branches), with the graph it is in."""
    for node in graph.node:
        yield graph, node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attribute.g)


def _constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray:
    """The value of the Constant node or initializer of ``graph`` that outputs ``name``."""
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise RuntimeError(f"no constant named {name!r} in the graph")


def main(argv: list[str] | None = None) -> int:
    """Read the arguments, export, and print where the file went and what it holds; returns
    the exit status (0 written, 2 bad input: the message names it)."""
    parser = argparse.ArgumentParser(
        prog="python -m model.export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("source", help="checkpoint file, or torchvision:coco, ssd.pytorch:PATH")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="only onnx for now")
    parser.add_argument("--out", required=True, type=Path, help="the file to write (.onnx)")
    parser.add_argument("--graph", choices=GRAPHS, default=FULL, help="full (with NMS) or raw")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (11..20)")
    parser.add_argument(
        "--no-defaults",
        action="store_true",
        help="full graph: every input required (for runtimes that fold inputs with "
        "defaults into constants, as OpenVINO does)",
    )
    parser.add_argument(
        "--max-detections",
        type=int,
        default=MAX_DETECTIONS,
        help="padded rows per image (full graph)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        path = export_onnx(
            args.source,
            args.out,
            graph=args.graph,
            opset=args.opset,
            max_detections=args.max_detections,
            defaults=not args.no_defaults,
        )
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    mib = path.stat().st_size / 2**20
    print(
        f"wrote {path} ({args.graph} graph, opset {args.opset}, {mib:.1f} MiB) in {seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
