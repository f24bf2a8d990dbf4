"""The MultiBox loss (SSD paper, sec. 2.2, "Training objective"), with hard negative mining.

    L = (L_conf + alpha * L_loc) / N_pos

L_loc is Smooth-L1 between predicted and encoded offsets over the positive default boxes.
L_conf is softmax cross-entropy over the positives plus the hardest negatives: per image, the
negatives with the highest background loss, at most ``neg_pos_ratio`` (3) times that image's
positives and never more than the image has. N_pos is the number of positives in the batch; a
batch without any is divided by 1 instead, so its loss is 0, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.network.box_coding import encode_boxes
from model.network.matching import match


@dataclass
class LossTerms:
    """The loss and its parts, each already divided by the number of positives."""

    total: Tensor
    loc: Tensor
    conf: Tensor
    num_positives: int


def pad_targets(boxes: list[Tensor], labels: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack per-image targets into (N, G, 4) boxes and (N, G) labels, padding with zeros.

    Zero boxes never match (see ``model.network.matching``), and label 0 is background. G is at
    least 1, so that a batch without objects still has something to index.
    """
    if len(boxes) != len(labels):
        raise ValueError(f"got {len(boxes)} box tensors but {len(labels)} label tensors")
    num_gt = max(1, *(b.shape[0] for b in boxes))
    device = boxes[0].device if boxes else torch.device("cpu")
    out_boxes = torch.zeros(len(boxes), num_gt, 4, device=device)
    out_labels = torch.zeros(len(boxes), num_gt, dtype=torch.int64, device=device)
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        if b.shape[0] != lab.shape[0]:
            raise ValueError(f"image {i}: {b.shape[0]} boxes but {lab.shape[0]} labels")
        out_boxes[i, : b.shape[0]] = b
        out_labels[i, : b.shape[0]] = lab
    return out_boxes, out_labels


class MultiBoxLoss(nn.Module):
    """SSD's training loss for one batch of raw network outputs.

    Args:
        default_boxes: Tensor[P, 4], (cx, cy, w, h) relative, as on the network.
        iou_threshold: matching threshold (paper: 0.5).
        neg_pos_ratio: hard negatives per positive (paper: 3).
        alpha: weight of the localisation term (paper: 1).
    """

    default_boxes: Tensor  # a buffer: (cx, cy, w, h) relative to the input

    def __init__(
        self,
        default_boxes: Tensor,
        *,
        iou_threshold: float = 0.5,
        neg_pos_ratio: int = 3,
        alpha: float = 1.0,
    ) -> None:
        super().__init__()
        self.register_buffer("default_boxes", default_boxes.clone(), persistent=False)
        self.iou_threshold = iou_threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.alpha = alpha

    def forward(
        self, loc: Tensor, conf: Tensor, gt_boxes: list[Tensor], gt_labels: list[Tensor]
    ) -> LossTerms:
        """Compute the loss.

        Args:
            loc: Tensor[N, P, 4], predicted offsets.
            conf: Tensor[N, P, C], class logits (class 0 is background).
            gt_boxes: per image, Tensor[G_i, 4] xyxy relative to the image (0..1).
            gt_labels: per image, Tensor[G_i] int64 in 1..C-1.
        """
        loc, conf = loc.float(), conf.float()
        boxes, labels = pad_targets(
            [b.to(loc.device, torch.float32) for b in gt_boxes],
            [lab.to(loc.device) for lab in gt_labels],
        )
        with torch.no_grad():
            matched = match(boxes, self.default_boxes, self.iou_threshold)  # (N, P)
            positive = matched >= 0
            index = matched.clamp(min=0)
            target_labels = torch.where(positive, labels.gather(1, index), 0)
            # (N, G, 4) gathered at (N, P) -> (N, P, 4)
            target_boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4))
            target_offsets = encode_boxes(target_boxes, self.default_boxes.expand_as(target_boxes))

        num_pos = int(positive.sum())
        normalizer = max(num_pos, 1)

        loc_loss = F.smooth_l1_loss(loc[positive], target_offsets[positive], reduction="sum")

        # (N, P, C) -> (N*P, C) against (N*P,) labels
        ce = F.cross_entropy(conf.flatten(0, 1), target_labels.flatten(), reduction="none")
        ce = ce.view_as(target_labels)  # (N, P)
        negative = self._hard_negatives(ce.detach(), positive)
        conf_loss = ce[positive | negative].sum()

        loc_loss = loc_loss / normalizer
        conf_loss = conf_loss / normalizer
        return LossTerms(
            total=conf_loss + self.alpha * loc_loss,
            loc=loc_loss,
            conf=conf_loss,
            num_positives=num_pos,
        )

    def _hard_negatives(self, ce: Tensor, positive: Tensor) -> Tensor:
        """Bool mask (N, P) of the highest-loss negatives, ``neg_pos_ratio`` per positive."""
        num_pos = positive.sum(dim=1, keepdim=True)  # (N, 1)
        num_neg = torch.minimum(self.neg_pos_ratio * num_pos, (~positive).sum(dim=1, keepdim=True))
        # For negatives the cross-entropy is the background loss, -log p(background), which is
        # what the authors rank by (MineHardExamples, MAX_NEGATIVE).
        candidate = ce.masked_fill(positive, -1.0)
        order = candidate.argsort(dim=1, descending=True)
        rank = order.argsort(dim=1)
        return (rank < num_neg) & ~positive
