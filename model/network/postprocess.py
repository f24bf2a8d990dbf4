"""From raw network outputs to detections, for a whole batch at once.

The steps and defaults follow the authors' ``DetectionOutputLayer`` (ssd_pascal.py test
settings) and torchvision's SSD: softmax; per class, keep scores above the threshold and at
most the ``top_k`` best candidates (400); decode their boxes (``box_coding.decode_boxes``) and
clip them to the image; per-class NMS at IoU 0.45; keep the best ``max_detections`` (200) per
image.

There is no Python loop over classes or images: candidates of every image and class go into
one ``torchvision.ops.batched_nms`` call, keyed by (image, class). The core,
``postprocess_padded``, gives fixed-size padded tensors and takes its per-image settings as
tensors, so it traces into an ONNX graph (``model.export``'s ``full`` graph is this code,
exported); ``postprocess`` and ``postprocess_each`` cut its padding off.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from model.network.box_coding import decode_boxes
from model.network.detections import (
    MAX_DETECTIONS,
    NMS_IOU,
    TOP_K,
    Cut,
    Detections,
    class_mask,
)

__all__ = [
    "MAX_DETECTIONS",
    "NMS_IOU",
    "TOP_K",
    "Cut",
    "Detections",
    "postprocess",
    "postprocess_each",
    "postprocess_padded",
]


def postprocess_padded(
    loc: Tensor,
    conf: Tensor,
    default_boxes: Tensor,
    image_sizes: Tensor,
    score_thresholds: Tensor,
    class_mask: Tensor | None,
    *,
    nms_iou: float,
    top_k: int,
    max_detections: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Raw outputs to every image's detections, padded to ``max_detections`` rows.

    Args:
        loc: Tensor[N, P, 4], predicted offsets.
        conf: Tensor[N, P, C], logits, class 0 being background.
        default_boxes: Tensor[P, 4], (cx, cy, w, h) relative to the network input.
        image_sizes: float Tensor[N, 2] (or [1, 2] for all), each image's (width, height) in
            pixels; boxes are scaled to it ((1, 1) gives boxes relative to the image).
        score_thresholds: float Tensor[N] (or [1]): keep class scores strictly above it.
        class_mask: bool Tensor[N, C-1] (or [1, C-1]), the classes (1..C-1) each image
            keeps; None keeps all. The others' scores become 0, below any threshold.
        nms_iou: the per-class NMS overlap above which the lower-scoring box goes.
        top_k: at most this many candidates per image and class enter NMS.
        max_detections: K, the rows per image.

    Returns:
        boxes float32 Tensor[N, K, 4] (xyxy pixels, clipped to the image), scores float32
        Tensor[N, K], class_ids int64 Tensor[N, K] (1..C-1) and counts int64 Tensor[N]: row
        i holds ``counts[i]`` detections in descending score order, then padding (boxes,
        scores and class ids all 0; class 0 is background, never a detection).
    """
    num_images, _, num_classes = conf.shape  # (N, P, C)
    scores = conf.float().softmax(dim=-1)[..., 1:]  # (N, P, C-1), background dropped
    if class_mask is not None:
        # (N|1, C-1) -> (N, 1, C-1)
        scores = scores * class_mask.expand(num_images, -1)[:, None, :].to(scores)
    thresholds = score_thresholds.float().expand(num_images)
    image_idx, cand_prior, class_idx, cand_scores = _candidates(scores, thresholds, top_k)

    # Decode only the candidates' boxes, clip in the relative frame, then scale per image.
    boxes = decode_boxes(loc[image_idx, cand_prior].float(), default_boxes[cand_prior].float())
    boxes = boxes.clamp(min=0.0, max=1.0)
    sizes = image_sizes.float().expand(num_images, 2)  # (N, 2) as (w, h)
    boxes = boxes * sizes[image_idx].repeat(1, 2)

    # One NMS over everything, keyed so that only boxes of one image and one class compete.
    group = image_idx * num_classes + class_idx
    kept = batched_nms(boxes, cand_scores, group, nms_iou)
    if _exporting():
        # torchvision's nms returns its picks by descending score; ONNX's NonMaxSuppression
        # promises no order, so the graph sorts them.
        kept = kept[cand_scores[kept].argsort(descending=True)]

    # Each pick's rank among its image's picks: (M, N) one-hot of the image, counted down
    # the score order.
    kept_image = image_idx[kept]
    one_hot = (kept_image[:, None] == torch.arange(num_images, device=conf.device)).long()
    rank = one_hot.cumsum(dim=0).gather(1, kept_image[:, None]).squeeze(1) - 1  # (M,)
    counts = one_hot.sum(dim=0).clamp(max=max_detections)  # (N,)
    fits = rank < max_detections
    row, slot, pick = kept_image[fits], rank[fits], kept[fits]

    out_boxes = torch.zeros((num_images, max_detections, 4), device=conf.device)
    out_scores = torch.zeros((num_images, max_detections), device=conf.device)
    out_ids = torch.zeros((num_images, max_detections), dtype=torch.long, device=conf.device)
    out_boxes[row, slot] = boxes[pick]
    out_scores[row, slot] = cand_scores[pick]
    out_ids[row, slot] = class_idx[pick] + 1
    return out_boxes, out_scores, out_ids, counts


def postprocess(
    loc: Tensor,
    conf: Tensor,
    default_boxes: Tensor,
    image_sizes: list[tuple[int, int]],
    *,
    score_threshold: float,
    nms_iou: float = NMS_IOU,
    top_k: int = TOP_K,
    max_detections: int = MAX_DETECTIONS,
    class_mask: Tensor | None = None,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Turn raw outputs into per-image (boxes, scores, class_ids): ``postprocess_padded``
    with one threshold for all, its padding cut off.

    Args:
        loc: Tensor[N, P, 4], predicted offsets.
        conf: Tensor[N, P, C], logits, class 0 being background.
        default_boxes: Tensor[P, 4], (cx, cy, w, h) relative to the network input.
        image_sizes: per image, its (width, height) in pixels; boxes are scaled to it.
        score_threshold: keep class scores strictly above this.
        class_mask: Tensor[N, C-1] bool, the classes (1..C-1) each image keeps; None keeps
            all. The others' scores become 0, below any threshold.

    Returns:
        Per image: boxes Tensor[K, 4] (xyxy pixels, clipped to the image), scores Tensor[K],
        class_ids Tensor[K] (int64, 1..C-1), sorted by descending score, K <= max_detections.
    """
    num_images = conf.shape[0]
    if len(image_sizes) != num_images:
        raise ValueError(f"got {len(image_sizes)} image sizes for a batch of {num_images}")
    if num_images == 0:
        return []
    device = conf.device
    boxes, scores, class_ids, counts = postprocess_padded(
        loc,
        conf,
        default_boxes,
        torch.tensor(image_sizes, dtype=torch.float32, device=device),
        torch.tensor([score_threshold], dtype=torch.float32, device=device),
        None if class_mask is None else class_mask.to(device),
        nms_iou=nms_iou,
        top_k=top_k,
        max_detections=max_detections,
    )
    return [
        (boxes[i, :count], scores[i, :count], class_ids[i, :count])
        for i, count in enumerate(counts.tolist())
    ]


def postprocess_each(
    loc: Tensor,
    conf: Tensor,
    default_boxes: Tensor,
    image_sizes: list[tuple[int, int]],
    cuts: Sequence[Cut],
    *,
    top_k: int = TOP_K,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``postprocess`` with each image cut as its ``Cut`` says.

    Images of one NMS IoU are post-processed together, once (``postprocess_padded``, with
    each image's threshold and the classes it keeps, at the group's highest cap); then each
    image is cut to its own cap. Arguments and results otherwise as for ``postprocess``.

    Raises:
        ValueError: not one cut per image, or a cut's class id past the model's classes.
    """
    count = len(image_sizes)
    cuts = list(cuts)
    if len(cuts) != count:
        raise ValueError(f"need one cut per image: got {len(cuts)} for {count} images")
    num_classes = conf.shape[-1]
    class_mask(cuts, num_classes)  # names a class id past the model's before any work
    device = conf.device
    results: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * count
    for nms_iou in sorted({cut.nms_iou for cut in cuts}):
        members = [i for i, cut in enumerate(cuts) if cut.nms_iou == nms_iou]
        group = [cuts[i] for i in members]
        index = torch.tensor(members, device=device)
        boxes, scores, class_ids, counts = postprocess_padded(
            loc[index],
            conf[index],
            default_boxes,
            torch.tensor([image_sizes[i] for i in members], dtype=torch.float32, device=device),
            torch.tensor([c.score_threshold for c in group], dtype=torch.float32, device=device),
            _as_tensor(class_mask(group, num_classes)),
            nms_iou=nms_iou,
            top_k=top_k,
            max_detections=max(cut.max_detections for cut in group),
        )
        for row, (i, cut) in enumerate(zip(members, group, strict=True)):
            keep = min(int(counts[row]), cut.max_detections)
            results[i] = (boxes[row, :keep], scores[row, :keep], class_ids[row, :keep])
    return [result for result in results if result is not None]


def _as_tensor(mask: np.ndarray | None) -> Tensor | None:
    return None if mask is None else torch.from_numpy(mask)


def _exporting() -> bool:
    """Whether this code is being traced into a graph, where data-dependent Python branches
    would be frozen at the traced example's values."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _candidates(
    scores: Tensor, thresholds: Tensor, top_k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The (image, prior, class) triples scoring above their image's threshold, at most
    ``top_k`` per image and class, from ``scores`` Tensor[N, P, C-1] and ``thresholds``
    Tensor[N]; returns their image, prior and class indices (0-based, background excluded)
    and their scores, each Tensor[M]."""
    above = scores > thresholds[:, None, None]
    if not _exporting() and int(above.sum(dim=1).amax()) <= top_k:
        # Usual case in torch: no (image, class) has more than top_k candidates, so no top-k
        # is needed. The same set as the top-k path below, which the exported graph runs.
        image_idx, prior_idx, class_idx = above.nonzero(as_tuple=True)
        return image_idx, prior_idx, class_idx, scores[above]
    # Per (image, class), the top-k candidates by score: (N, C-1, P) -> (N, C-1, k)
    k = min(top_k, scores.shape[1])
    top_scores, top_prior = scores.transpose(1, 2).topk(k, dim=2)
    keep = top_scores > thresholds[:, None, None]
    image_idx, class_idx, _ = keep.nonzero(as_tuple=True)
    return image_idx, top_prior[keep], class_idx, top_scores[keep]
