"""Post-processing: our batched path against torchvision's per-image, per-class loop.

Both get the same raw SSD300 outputs and settings. Two kinds of outputs:

* ``typical``: background wins almost everywhere and ~50 default boxes per image are confident
  about one class each, as with a trained network on an ordinary photo;
* ``busy``: random logits, so that thousands of candidates pass the threshold and NMS (the same
  torchvision kernel on both sides) dominates.

Prints times and the ratio; never fails on a time.

    .venv/bin/python -m bench.postprocess [--batch 8] [--classes 21] [--threshold 0.3]
"""

from __future__ import annotations

import argparse

import torch
from torchvision.models.detection import ssd300_vgg16 as torchvision_ssd300

from bench.timing import median_seconds
from model.network.boxes import cxcywh_to_xyxy
from model.network.default_boxes import make_default_boxes, preset_spec
from model.network.postprocess import postprocess


def main() -> None:
    """Time our post-processing against torchvision's on random outputs; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--threshold", type=float, default=0.3)
    args = parser.parse_args()

    priors = make_default_boxes(preset_spec(300, "voc"), [38, 19, 10, 5, 3, 1])
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(args.batch, priors.shape[0], 4, generator=g) * 0.5
    sizes = [(300, 300)] * args.batch
    busy = torch.randn(args.batch, priors.shape[0], args.classes, generator=g) * 2.0
    typical = torch.randn(args.batch, priors.shape[0], args.classes, generator=g)
    typical[..., 0] += 8.0  # background
    for image in typical:
        hits = torch.randint(0, priors.shape[0], (50,), generator=g)
        image[hits, torch.randint(1, args.classes, (50,), generator=g)] += 12.0

    reference = torchvision_ssd300(
        weights=None,
        weights_backbone=None,
        num_classes=args.classes,
        score_thresh=args.threshold,
        nms_thresh=0.45,
        detections_per_img=200,
        topk_candidates=400,
    )
    anchors = [cxcywh_to_xyxy(priors) * 300] * args.batch

    print(
        f"batch {args.batch}, {args.classes} classes, threshold {args.threshold}, "
        f"{torch.get_num_threads()} threads"
    )
    for scene, conf in (("typical", typical), ("busy", busy)):
        outputs = {"bbox_regression": loc, "cls_logits": conf}
        with torch.inference_mode():
            ours = median_seconds(
                lambda conf=conf: postprocess(
                    loc, conf, priors, sizes, score_threshold=args.threshold
                )
            )
            theirs = median_seconds(
                lambda outputs=outputs: reference.postprocess_detections(outputs, anchors, sizes)
            )
        print(
            f"  {scene:8s} ours (batched) {ours * 1000:7.1f} ms   "
            f"torchvision (looped) {theirs * 1000:7.1f} ms   speed-up {theirs / ours:5.2f}x"
        )


if __name__ == "__main__":
    main()
