"""From raw network outputs to detections, for a whole batch at once.

The steps and defaults follow the authors' ``DetectionOutputLayer`` (ssd_pascal.py test
settings) and torchvision's SSD: softmax; per class, keep scores above the threshold and at
most the ``top_k`` best candidates (400); decode their boxes (``box_coding.decode_boxes``) and
clip them to the image; per-class NMS at IoU 0.45; keep the best ``max_detections`` (200) per
image.

There is no Python loop over classes or images: candidates of every image and class go into
one ``torchvision.ops.batched_nms`` call, keyed by (image, class).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from model.network.box_coding import decode_boxes

# The authors' test-time settings (ssd_pascal.py: nms_threshold 0.45, top_k 400, keep_top_k 200).
NMS_IOU = 0.45
TOP_K = 400
MAX_DETECTIONS = 200


@dataclass(frozen=True)
class Cut:
    """How one image's detections are cut from the network's outputs.

    ``score_threshold``: keep scores strictly above it (0..1). ``max_detections``: at most this
    many (>= 1), the best. ``classes``: the class ids (1..C-1) to keep, None for all; the others
    are dropped before the cap, so the cap counts only these. ``nms_iou``: the per-class NMS
    overlap (0..1) above which the lower-scoring box goes.
    """

    score_threshold: float = 0.3
    max_detections: int = MAX_DETECTIONS
    classes: frozenset[int] | None = None
    nms_iou: float = NMS_IOU

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {self.max_detections}")
        if not 0.0 <= self.nms_iou <= 1.0:
            raise ValueError(f"the NMS IoU must be in [0, 1], got {self.nms_iou}")
        if self.classes is not None and (not self.classes or min(self.classes) < 1):
            raise ValueError(f"classes must be ids from 1 (0 is background), got {self.classes}")


@dataclass
class Detections:
    """Detections for one image, sorted by score (descending).

    ``boxes`` is Tensor[K, 4] xyxy in pixels of that image; ``scores`` Tensor[K] in (0, 1];
    ``class_ids`` Tensor[K] int64 in 1..C-1; ``labels`` the class names of ``class_ids``.
    """

    boxes: Tensor
    scores: Tensor
    class_ids: Tensor
    labels: list[str]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def rows(self) -> list[tuple[list[float], float, int, str]]:
        """One plain-Python row per detection, in score order: (box [x0, y0, x1, y1] in
        pixels, score, class id, label), for callers that serialise them."""
        return list(
            zip(
                self.boxes.tolist(),
                self.scores.tolist(),
                self.class_ids.tolist(),
                self.labels,
                strict=True,
            )
        )


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
    """Turn raw outputs into per-image (boxes, scores, class_ids).

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
    num_images, _, num_classes = conf.shape  # (N, P, C)
    if len(image_sizes) != num_images:
        raise ValueError(f"got {len(image_sizes)} image sizes for a batch of {num_images}")
    device = conf.device
    scores = conf.float().softmax(dim=-1)[..., 1:]  # (N, P, C-1), background dropped
    if class_mask is not None:
        scores = scores * class_mask[:, None, :].to(scores.device)

    if num_images == 0:
        return []
    image_idx, cand_prior, class_idx, cand_scores = _candidates(scores, score_threshold, top_k)

    # Decode only the candidates' boxes, clip in the relative frame, then scale per image.
    boxes = decode_boxes(loc[image_idx, cand_prior].float(), default_boxes[cand_prior].float())
    boxes = boxes.clamp(min=0.0, max=1.0)
    sizes = torch.tensor(image_sizes, dtype=torch.float32, device=device)  # (N, 2) as (w, h)
    boxes = boxes * sizes[image_idx].repeat(1, 2)

    # One NMS over everything, keyed so that only boxes of one image and one class compete.
    group = image_idx * num_classes + class_idx
    kept = batched_nms(boxes, cand_scores, group, nms_iou)  # sorted by score, descending

    kept, per_image = _best_per_image(kept, image_idx, num_images, max_detections)
    results = []
    for idx in kept.split(per_image):
        results.append((boxes[idx], cand_scores[idx], class_idx[idx] + 1))
    return results


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

    Images of one NMS IoU are post-processed together, once, at their lowest threshold and
    highest cap, with the classes each keeps masked; then each image is cut to its own
    threshold and cap. NMS visits boxes in score order, so boxes below an image's threshold
    never suppress boxes above it, and the result equals a run at that threshold alone.
    Arguments and results otherwise as for ``postprocess``.

    Raises:
        ValueError: not one cut per image, or a cut's class id past the model's classes.
    """
    count = len(image_sizes)
    cuts = list(cuts)
    if len(cuts) != count:
        raise ValueError(f"need one cut per image: got {len(cuts)} for {count} images")
    num_classes = conf.shape[-1]
    for cut in cuts:
        if cut.classes is not None and max(cut.classes) >= num_classes:
            raise ValueError(
                f"class ids run from 1 to {num_classes - 1}, got {sorted(cut.classes)}"
            )
    results: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * count
    for nms_iou in sorted({cut.nms_iou for cut in cuts}):
        members = [i for i, cut in enumerate(cuts) if cut.nms_iou == nms_iou]
        group = [cuts[i] for i in members]
        mask = None
        if any(cut.classes is not None for cut in group):
            mask = torch.ones(len(group), num_classes - 1, dtype=torch.bool)
            for row, cut in enumerate(group):
                if cut.classes is not None:
                    mask[row] = False
                    mask[row, [c - 1 for c in cut.classes]] = True
        index = torch.tensor(members, device=conf.device)
        outputs = postprocess(
            loc[index],
            conf[index],
            default_boxes,
            [image_sizes[i] for i in members],
            score_threshold=min(cut.score_threshold for cut in group),
            nms_iou=nms_iou,
            top_k=top_k,
            max_detections=max(cut.max_detections for cut in group),
            class_mask=mask,
        )
        for i, cut, (boxes, scores, class_ids) in zip(members, group, outputs, strict=True):
            keep = (scores > cut.score_threshold).nonzero().flatten()[: cut.max_detections]
            results[i] = (boxes[keep], scores[keep], class_ids[keep])
    return [result for result in results if result is not None]


def _candidates(
    scores: Tensor, score_threshold: float, top_k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The (image, prior, class) triples scoring above the threshold, at most ``top_k`` per
    image and class, from ``scores`` Tensor[N, P, C-1]; returns their image, prior and class
    indices (0-based, background excluded) and their scores, each Tensor[M]."""
    above = scores > score_threshold
    if int(above.sum(dim=1).amax()) <= top_k:
        # Usual case: no (image, class) has more than top_k candidates, so no top-k is needed.
        image_idx, prior_idx, class_idx = above.nonzero(as_tuple=True)
        return image_idx, prior_idx, class_idx, scores[above]
    # Per (image, class), the top-k candidates by score: (N, C-1, P) -> (N, C-1, k)
    k = min(top_k, scores.shape[1])
    top_scores, top_prior = scores.transpose(1, 2).topk(k, dim=2)
    keep = top_scores > score_threshold
    image_idx, class_idx, _ = keep.nonzero(as_tuple=True)
    return image_idx, top_prior[keep], class_idx, top_scores[keep]


def _best_per_image(
    kept: Tensor, image_idx: Tensor, num_images: int, max_detections: int
) -> tuple[Tensor, list[int]]:
    """Cut ``kept`` (candidate indices in descending score order) to the best
    ``max_detections`` of each image; returns them grouped by image, and the count per image."""
    # A stable sort by image keeps the score order inside each image.
    kept = kept[torch.sort(image_idx[kept], stable=True).indices]
    kept_image = image_idx[kept]
    counts = torch.bincount(kept_image, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(kept.numel(), device=kept.device) - starts[kept_image]  # within image
    return kept[rank < max_detections], counts.clamp(max=max_detections).tolist()
