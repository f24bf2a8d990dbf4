import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model.data import load_dataset
from model.evaluation.average_precision import (
    COCO_KEYS,
    average_precision,
    coco_metrics,
    voc_ap_per_class,
)


def _curve(hits: list[int], positives: int) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision after each of a ranked list's detections (1 = TP, 0 = FP)."""
    tp = np.cumsum(hits)
    fp = np.cumsum([1 - h for h in hits])
    return tp / positives, tp / (tp + fp)


def _gt(boxes, labels, difficult=None, size=(100, 100), **extra) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if difficult is None:
        difficult = [False] * len(boxes)
    return {
        "boxes": boxes,
        "labels": torch.tensor(labels, dtype=torch.int64),
        "difficult": torch.tensor(difficult, dtype=torch.bool),
        "width": size[0],
        "height": size[1],
        **extra,
    }


def _det(boxes, scores, classes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(classes, dtype=torch.int64),
    )


# average_precision, by hand ------------------------------------------------------------------


def test_average_precision_by_hand_recall_never_reaches_one():
    # 3 ground truths; 5 detections ranked TP, FP, TP, FP, FP.
    #   recall    1/3, 1/3, 2/3, 2/3, 2/3
    #   precision 1,   1/2, 2/3, 1/2, 2/5
    recall, precision = _curve([1, 0, 1, 0, 0], positives=3)
    # All-point: the precision envelope (best precision at this recall or beyond) is 1 up to
    # recall 1/3, 2/3 up to recall 2/3, and 0 beyond (never reached):
    #   AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 0 = 5/9
    assert average_precision(recall, precision, voc07=False) == pytest.approx(5 / 9)
    # 11-point: t = 0, .1, .2, .3 -> 1 (four points); t = .4, .5, .6 -> 2/3 (three points);
    # t = .7, .8, .9, 1 -> 0 (no detection reaches them):
    #   AP = (4 * 1 + 3 * 2/3 + 4 * 0) / 11 = 6/11
    assert average_precision(recall, precision, voc07=True) == pytest.approx(6 / 11)


def test_average_precision_by_hand_full_recall():
    # 3 ground truths; 5 detections ranked TP, FP, TP, FP, TP.
    #   recall    1/3, 1/3, 2/3, 2/3, 1
    #   precision 1,   1/2, 2/3, 1/2, 3/5
    recall, precision = _curve([1, 0, 1, 0, 1], positives=3)
    # All-point envelope: 1 to recall 1/3, 2/3 to recall 2/3, 3/5 to recall 1:
    #   AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 = 15/45 + 10/45 + 9/45 = 34/45
    assert average_precision(recall, precision, voc07=False) == pytest.approx(34 / 45)
    # 11-point: t = 0 .. .3 -> 1 (4 points); t = .4 .. .6 -> max(2/3, 1/2, 3/5) = 2/3
    # (3 points); t = .7 .. 1 -> 3/5 (4 points):
    #   AP = (4 + 2 + 2.4) / 11 = 8.4 / 11 = 42/55
    assert average_precision(recall, precision, voc07=True) == pytest.approx(42 / 55)


@pytest.mark.parametrize("voc07", [False, True])
def test_average_precision_perfect_and_empty(voc07):
    recall, precision = _curve([1, 1], positives=2)
    assert average_precision(recall, precision, voc07=voc07) == pytest.approx(1.0)
    assert average_precision(np.zeros(0), np.zeros(0), voc07=voc07) == 0.0


# voc_ap_per_class, a hand-made set ------------------------------------------------------------


def test_voc_ap_per_class_by_hand():
    # Classes 1..3 (num_classes = 4 with background).
    ground_truths = [
        # Image A: class 1 at g1 and a difficult class-1 object g2; class 2 at g4.
        _gt(
            [[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 40, 40]],
            [1, 1, 2],
            difficult=[False, True, False],
        ),
        # Image B: class 1 at g3.
        _gt([[0, 0, 20, 20]], [1]),
        # Image C: nothing, and nothing detected.
        _gt([], []),
    ]
    detections = [
        _det(
            [
                [0, 0, 10, 10],  # .9  g1 exactly: TP
                [50, 50, 60, 60],  # .75 the difficult g2: neither TP nor FP
                [0, 0, 10, 10],  # .4  g1 again, already taken: FP (duplicate)
            ],
            [0.9, 0.75, 0.4],
            [1, 1, 1],
        ),
        _det(
            [
                # .8 IoU with g3 exactly 0.5 (200 / 400 px): VOC needs > 0.5, so FP
                [0, 0, 20, 10],
                [0, 0, 20, 20],  # .7 g3 exactly: TP
                [5, 5, 15, 15],  # .95 class 3, which has no ground truth at all
            ],
            [0.8, 0.7, 0.95],
            [1, 1, 3],
        ),
        _det([], [], []),
    ]
    results = voc_ap_per_class(detections, ground_truths, num_classes=4)
    assert sorted(results) == [1, 2, 3]
    # Class 1: 2 positives (g1, g3; the difficult g2 is not counted). Ranked over both
    # images, the ignored .75 dropped: .9 TP, .8 FP, .7 TP, .4 FP.
    #   recall    1/2, 1/2, 1,   1
    #   precision 1,   1/2, 2/3, 1/2
    # All-point: 1/2 * 1 + 1/2 * 2/3 = 5/6.
    # 11-point: t = 0 .. .5 -> 1 (6 points), t = .6 .. 1 -> 2/3 (5 points):
    #   (6 + 10/3) / 11 = 28/33.
    # (Counting the difficult hit as FP would give 3/4; counting g2 in the recall, or the
    # IoU-0.5 box as TP, or ranking image by image instead of over the set, changes it too.)
    assert results[1] == (pytest.approx(5 / 6), pytest.approx(28 / 33))
    assert results[2] == (0.0, 0.0)  # ground truth, no detections
    assert all(math.isnan(v) for v in results[3])  # detections, no ground truth


def test_voc_ap_per_class_only_difficult_objects_is_nan():
    ground_truths = [_gt([[0, 0, 10, 10]], [1], difficult=[True])]
    detections = [_det([[0, 0, 10, 10]], [0.9], [1])]
    assert all(math.isnan(v) for v in voc_ap_per_class(detections, ground_truths, 2)[1])


def test_voc_ap_per_class_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 detection sets for 1 images"):
        voc_ap_per_class([_det([], [], [])] * 2, [_gt([], [])], num_classes=2)


# coco_metrics -------------------------------------------------------------------------------


def test_coco_metrics_without_detections_or_ground_truth_is_zero():
    ground_truths = [_gt([[0, 0, 10, 10]], [1]), _gt([], [])]
    empty = [_det([], [], []), _det([], [], [])]
    assert coco_metrics(empty, ground_truths, num_classes=2) == dict.fromkeys(COCO_KEYS, 0.0)
    assert coco_metrics([], [], num_classes=2) == dict.fromkeys(COCO_KEYS, 0.0)
    detections = [_det([[0, 0, 10, 10]], [0.9], [1])]
    assert coco_metrics(detections, [_gt([], [])], 2) == dict.fromkeys(COCO_KEYS, 0.0)


def test_coco_crowd_region_is_ignored_only_for_its_own_class():
    # A class-1 object found (.9), and a class-1 detection (.95) inside a class-2 crowd region.
    crowd = {"crowd_boxes": torch.tensor([[50.0, 50.0, 100.0, 100.0]])}
    detections = [_det([[0, 0, 10, 10], [60, 60, 70, 70]], [0.9, 0.95], [1, 1])]
    per_class = _gt([[0, 0, 10, 10]], [1], crowd_labels=torch.tensor([2]), **crowd)
    # COCOeval: the crowd is class 2's, so the .95 is a class-1 FP ranked first; precision
    # is 1/2 at every recall up to 1, at every IoU threshold: AP = 0.5.
    assert coco_metrics(detections, [per_class], 3)["ap"] == pytest.approx(0.5)
    # Without crowd_labels the region could be anything, so it swallows the .95: AP = 1.
    any_class = _gt([[0, 0, 10, 10]], [1], **crowd)
    assert coco_metrics(detections, [any_class], 3)["ap"] == pytest.approx(1.0)


def test_coco_areas_decide_small_medium_large():
    # A 100 x 100 box is "large" (> 96^2) by its box area; given a segmentation area of 500
    # px^2 it is "small" (< 32^2), as COCOeval would bin it from a COCO JSON.
    detections = [_det([[0, 0, 100, 100]], [0.9], [1])]
    by_box = coco_metrics(detections, [_gt([[0, 0, 100, 100]], [1], size=(200, 200))], 2)
    # -1 is COCOeval's "no such objects"; 1 up to the float rounding of its averaging.
    assert (by_box["ap_small"], by_box["ap_large"]) == (-1.0, pytest.approx(1.0))
    areas = torch.tensor([500.0], dtype=torch.float64)
    by_area = coco_metrics(detections, [_gt([[0, 0, 100, 100]], [1], areas=areas)], 2)
    assert (by_area["ap_small"], by_area["ap_large"]) == (pytest.approx(1.0), -1.0)
    with pytest.raises(ValueError, match=r"areas of shape \[1\], got \(2,\)"):
        coco_metrics(detections, [_gt([[0, 0, 100, 100]], [1], areas=torch.ones(2))], 2)


# coco_metrics against pycocotools on coco128 --------------------------------------------------


def _fake_detections(truth: COCO, seed: int = 0) -> dict[int, tuple[torch.Tensor, list[int]]]:
    """{image id: (xyxy float32 boxes [D, 4], COCO category ids)}, derived from the truth.

    Each non-crowd object is dropped with probability 0.2, else found with every side moved
    by up to 15 % of the box's size; each crowd region gets a jittered box of its own class
    (COCOeval ignores it) and one of a random class (an FP unless crowds ignore every class);
    each image gets 0-3 random boxes of random classes.
    """
    generator = torch.Generator().manual_seed(seed)
    categories = sorted(truth.getCatIds())

    def uniform(n: int) -> list[float]:
        return torch.rand(n, generator=generator, dtype=torch.float64).tolist()

    def random_category() -> int:
        return categories[int(torch.randint(len(categories), (1,), generator=generator))]

    detections = {}
    for image_id in sorted(truth.getImgIds()):
        boxes, classes = [], []
        for ann in truth.imgToAnns[image_id]:
            (drop,) = uniform(1)
            if drop < 0.2 and not ann["iscrowd"]:
                continue
            x, y, w, h = ann["bbox"]
            dx0, dy0, dx1, dy1 = ((u - 0.5) * 0.3 for u in uniform(4))
            boxes.append([x + dx0 * w, y + dy0 * h, x + w + dx1 * w, y + h + dy1 * h])
            classes.append(ann["category_id"])
            if ann["iscrowd"]:
                boxes.append(boxes[-1])
                classes.append(random_category())
        width, height = truth.imgs[image_id]["width"], truth.imgs[image_id]["height"]
        for _ in range(int(torch.randint(4, (1,), generator=generator))):
            u = uniform(4)
            x0, x1 = sorted([u[0] * width, u[1] * width])
            y0, y1 = sorted([u[2] * height, u[3] * height])
            boxes.append([x0, y0, x1 + 1, y1 + 1])
            classes.append(random_category())
        detections[image_id] = (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), classes)
    return detections


def test_coco_metrics_equal_pycocotools_on_coco128(coco128):
    annotations = coco128 / "annotations" / "instances.json"
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        truth = COCO(str(annotations))
    fake = _fake_detections(truth)
    dataset = load_dataset(f"coco:{coco128 / 'images'}:{annotations}", split="all")
    # Distinct scores, so the ranking cannot depend on the order images are visited in.
    total = sum(len(classes) for _, classes in fake.values())
    generator = torch.Generator().manual_seed(1)
    scores = ((torch.randperm(total, generator=generator) + 1) / (total + 1)).float()

    results, detections, ground_truths = [], [], []
    for index, record in enumerate(dataset.records):
        boxes, category_ids = fake[record.image_id]
        image_scores, scores = scores[: len(category_ids)], scores[len(category_ids) :]
        # pycocotools sees exactly the float32 values our path sees.
        for box, score, category_id in zip(
            boxes.tolist(), image_scores.tolist(), category_ids, strict=True
        ):
            x0, y0, x1, y1 = box
            bbox = [x0, y0, x1 - x0, y1 - y0]
            results.append(
                {
                    "image_id": record.image_id,
                    "category_id": category_id,
                    "bbox": bbox,
                    "score": score,
                }
            )
        labels = [dataset.category_id_to_label[c] for c in category_ids]
        detections.append((boxes, image_scores, torch.tensor(labels, dtype=torch.int64)))
        width, height = record.size
        ground_truths.append({**dataset.target(index), "width": width, "height": height})
    assert len(results) > 900 and len(ground_truths) == 128

    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(truth, truth.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    expected = evaluator.stats[:6]
    assert ((expected > 0.1) & (expected < 0.9)).all(), expected  # no -1, nothing trivial

    num_classes = len(dataset.class_names) + 1  # with the background
    ours = coco_metrics(detections, ground_truths, num_classes)
    np.testing.assert_allclose([ours[k] for k in COCO_KEYS], expected, rtol=0, atol=1e-9)

    # Both reader extras are needed for that: without the JSON's areas COCOeval's
    # small/medium/large bins change; without crowd_labels the crowd regions swallow the
    # detections of other classes made on them.
    without_areas = [
        {k: v for k, v in gt.items() if k not in ("areas", "crowd_areas")} for gt in ground_truths
    ]
    stats = coco_metrics(detections, without_areas, num_classes)
    assert stats["ap"] == pytest.approx(expected[0], abs=1e-9)
    assert stats["ap_small"] != pytest.approx(expected[3], abs=1e-3)
    without_labels = [{k: v for k, v in gt.items() if k != "crowd_labels"} for gt in ground_truths]
    assert coco_metrics(detections, without_labels, num_classes)["ap"] > expected[0] + 1e-3
