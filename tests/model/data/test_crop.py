"""The authors' IoU-constrained crop (``model/data/crop.py``)."""

import pytest
import torch

from model.data.crop import CAFFE_MIN_IOUS, IoUCrop, crop_sample
from model.network.boxes import box_iou
from tests.model.data.support import no_boxes, random_boxes, random_image, seeded


def test_crop_sample_keeps_boxes_by_centre_and_clips_them():
    image = random_image(100, 100)
    boxes = torch.tensor(
        [
            [10.0, 10.0, 30.0, 30.0],  # centre (20, 20): inside, untouched
            [40.0, 40.0, 80.0, 80.0],  # centre (60, 60): outside although it overlaps
            [30.0, 30.0, 60.0, 60.0],  # centre (45, 45): inside, clipped to 50
            [40.0, 0.0, 70.0, 20.0],  # centre (55, 10): outside
        ]
    )
    labels = torch.tensor([0, 1, 2, 3])
    crop = torch.tensor([0.0, 0.0, 50.0, 50.0])
    out_image, out_boxes, out_labels = crop_sample(image, boxes, labels, crop)
    assert torch.equal(out_image, image[:, :50, :50])
    torch.testing.assert_close(out_boxes, torch.tensor([[10.0, 10, 30, 30], [30.0, 30, 50, 50]]))
    assert out_labels.tolist() == [0, 2]
    # Moved right by 21: box 0's centre (x = 20) falls out, the kept ones shift by 21.
    _, out_boxes, out_labels = crop_sample(image, boxes, labels, torch.tensor([21.0, 0, 71, 50]))
    assert out_labels.tolist() == [2, 3]
    torch.testing.assert_close(out_boxes, torch.tensor([[9.0, 30, 39, 50], [19.0, 0, 49, 20]]))
    # A centre on the crop's edge counts as inside (Caffe's MeetEmitConstraint).
    _, out_boxes, out_labels = crop_sample(image, boxes, labels, torch.tensor([20.0, 0, 70, 50]))
    assert out_labels.tolist() == [0, 2, 3]
    torch.testing.assert_close(out_boxes[0], torch.tensor([0.0, 10, 10, 30]))


def test_crop_sample_rejects_a_crop_outside_the_image():
    image, (boxes, labels) = random_image(10, 10), no_boxes()
    with pytest.raises(ValueError, match="11"):
        crop_sample(image, boxes, labels, torch.tensor([0.0, 0.0, 11.0, 5.0]))


def test_sampled_crops_meet_their_iou_constraint_and_shape_limits():
    crop = IoUCrop()
    g = seeded(0)
    torch.manual_seed(0)
    seen: set[float | None] = set()
    for _ in range(300):
        height, width = (int(v) for v in torch.randint(20, 120, (2,), generator=g))
        count = int(torch.randint(1, 4, (), generator=g))
        boxes = random_boxes(count, height, width, g, max_side=1.0)
        if count == 1:  # a near-whole-image box, so that even the 0.9 constraint is met
            boxes = torch.tensor([[1.0, 0.0, width, height - 1.0]])
        crop_box, min_iou = crop.sample(boxes, (height, width))
        seen.add(min_iou)
        left, top, right, bottom = crop_box.tolist()
        assert crop_box.dtype == torch.float32 and torch.equal(crop_box, crop_box.round())
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        if min_iou is None:
            assert crop_box.tolist() == [0, 0, width, height]
            continue
        assert box_iou(crop_box[None], boxes).max() >= min_iou
        # Area is scale**2 of the image for scale in [0.3, 1]; relative aspect in [0.5, 2].
        # Rounding to whole pixels moves each side by at most half a pixel.
        w, h = right - left, bottom - top
        assert (w + 0.5) * (h + 0.5) >= 0.3**2 * width * height
        assert 0.5 * (h - 0.5) / height <= (w + 0.5) / width
        assert (w - 0.5) / width <= 2.0 * (h + 0.5) / height
    assert seen == {None, *CAFFE_MIN_IOUS}


def test_unmeetable_constraint_falls_back_to_whole_image():
    # A 2x2 box in 100x100: a patch covers >= 9% of the image, so IoU <= 4 / 900 < 0.9.
    boxes = torch.tensor([[50.0, 50.0, 52.0, 52.0]])
    crop = IoUCrop(min_ious=(0.9,))
    torch.manual_seed(0)
    for _ in range(20):
        crop_box, min_iou = crop.sample(boxes, (100, 100))
        assert min_iou is None and crop_box.tolist() == [0, 0, 100, 100]


def test_no_boxes_only_the_unconstrained_option_can_crop():
    boxes, labels = no_boxes()
    image = random_image(40, 60)
    torch.manual_seed(0)
    chosen = {IoUCrop().sample(boxes, (40, 60))[1] for _ in range(60)}
    assert chosen == {None, 0.0}
    _, out_boxes, out_labels = IoUCrop()(image, boxes, labels)
    assert out_boxes.shape == (0, 4) and out_labels.shape == (0,)


def test_cropped_boxes_are_the_centre_inside_ones_clipped():
    crop = IoUCrop()
    g = seeded(1)
    torch.manual_seed(1)
    for _ in range(200):
        boxes = random_boxes(4, 60, 80, g)
        labels = torch.arange(4)
        crop_box, _ = crop.sample(boxes, (60, 80))
        out_image, out_boxes, out_labels = crop_sample(
            random_image(60, 80), boxes, labels, crop_box
        )
        left, top, right, bottom = crop_box.tolist()
        assert out_image.shape == (3, bottom - top, right - left)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = ((centres >= crop_box[:2]) & (centres <= crop_box[2:])).all(dim=1)
        assert out_labels.tolist() == labels[inside].tolist()
        offset = torch.tensor([left, top, left, top])
        clipped = torch.minimum(
            (boxes[out_labels] - offset).clamp(min=0),
            torch.tensor([right - left, bottom - top] * 2, dtype=torch.float32),
        )
        torch.testing.assert_close(out_boxes, clipped)
        assert (out_boxes[:, 2:] > out_boxes[:, :2]).all()


def test_smallest_side_is_the_least_patch_side_the_sampler_draws():
    # Defaults: scale 0.3, aspect 0.5..2: a patch is at least 0.3 * sqrt(0.5) of a side.
    crop = IoUCrop()
    assert crop.smallest_side == pytest.approx(0.3 * 0.5**0.5)
    # Scale 0.5 clamps the aspect to [0.25, 4]; the range (0.1, 10) is cut to it: 0.5 * 0.5.
    assert IoUCrop(scale_range=(0.5, 1.0), aspect_range=(0.1, 10.0)).smallest_side == 0.25
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        patches = IoUCrop(trials=20000)._random_patches(1000, 1000)
    sides = torch.minimum(patches[:, 2] - patches[:, 0], patches[:, 3] - patches[:, 1])
    # Never below it (but for rounding to whole pixels), and 20,000 draws come within 5 % of
    # it (about 14 of them are expected to).
    assert 1000 * crop.smallest_side - 1 <= sides.min() <= 1050 * crop.smallest_side
