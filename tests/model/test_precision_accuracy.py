"""The accuracy guard of ``precision="auto"`` (issue #12), offline: on the synthetic test
split, the shipped model's mAP@0.5 in every reduced precision ``auto`` may choose stays within
1.0 point of fp32's, and the detections themselves match across precisions image by image.

The first SUBSET images of the 500-image test split keep this under ~30 s on 2 CPU cores
(both precisions run over them); the full split is ``python -m model.evaluate`` with
``--precision``. The precisions checked are those ``auto`` may choose on this device.
"""

from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from model import Detector, autotune
from model.data import load_dataset
from model.evaluate import predict_dataset, score

WEIGHTS = Path("weights/ssd300_shapes.safetensors")
SUBSET = 100  # images of the test split: a few seconds per precision with one thread
MAX_MAP_DROP = 1.0  # issue #12: within 1.0 point of fp32 mAP@0.5
COMPARED = 24  # images compared detection by detection
DEVICE = torch.device("cpu")
REDUCED = [name for name in autotune.candidates(DEVICE) if name != "fp32"]


@pytest.fixture(scope="module")
def predictions() -> dict[str, tuple]:
    """Each candidate precision's detections and the ground truths on the subset."""
    if not WEIGHTS.is_file():
        pytest.skip(f"no shipped model at {WEIGHTS}")
    dataset = load_dataset(f"synthetic:{SUBSET}", split="test")
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared with the rest of the suite
    try:
        for precision in ["fp32", *REDUCED]:
            detector = Detector.load(WEIGHTS, device=DEVICE, precision=precision)
            results[precision] = (detector, *predict_dataset(detector, dataset))
    finally:
        torch.set_num_threads(threads)
    return results


@pytest.mark.parametrize("precision", REDUCED)
def test_reduced_precision_keeps_map50_within_a_point(predictions, precision):
    detector, reference, truths = predictions["fp32"]
    _, detections, _ = predictions[precision]
    fp32 = score(reference, truths, detector.class_names).map50
    reduced = score(detections, truths, detector.class_names).map50
    print(f"mAP@0.5 on {SUBSET} test images: fp32 {fp32:.4f}, {precision} {reduced:.4f}")
    assert abs(reduced - fp32) * 100 <= MAX_MAP_DROP, (fp32, reduced)


@pytest.mark.parametrize("precision", REDUCED)
def test_confident_detections_match_across_precisions(predictions, precision):
    # Confident detections (score > 0.3, the service's default threshold) of fp32 each have
    # one of the same class in the reduced precision at IoU >= 0.75 (COCO's strict match)
    # with a score within 0.05 (bf16 moves boxes by a pixel or two: IoU 0.87 was seen).
    _, reference, _ = predictions["fp32"]
    _, detections, _ = predictions[precision]
    matched = 0
    for (boxes, scores, classes), (other_boxes, other_scores, other_classes) in zip(
        reference[:COMPARED], detections[:COMPARED], strict=True
    ):
        confident = scores > 0.3
        iou = box_iou(boxes[confident], other_boxes)  # (confident, other)
        iou[:, :] *= classes[confident][:, None] == other_classes[None, :]
        for row, score_ in zip(iou, scores[confident], strict=True):
            best = int(row.argmax())
            assert row[best] >= 0.75, (precision, float(row[best]))
            assert abs(float(other_scores[best]) - float(score_)) <= 0.05
            matched += 1
    assert matched >= COMPARED  # the shapes images hold at least one object each
