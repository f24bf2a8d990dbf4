import colorsys

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from model.data import transforms
from model.data.transforms import (
    EvalTransform,
    IoUCrop,
    Normalize,
    PhotometricDistort,
    TrainTransform,
    ZoomOut,
)
from model.network.preprocessing import PIXEL_MEAN, preprocess
from tests.model.data.support import no_boxes, random_image

MEAN_U8 = torch.tensor(PIXEL_MEAN, dtype=torch.float32).to(torch.uint8)[:, None, None]


def _v2(step: v2.Transform, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor):
    """Run a torchvision step the way the pipeline does: image and boxes as tv_tensors."""
    canvas = tuple(image.shape[-2:])
    wrapped = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas)
    out = step(tv_tensors.Image(image), wrapped, labels)
    return tuple(t.as_subclass(torch.Tensor) for t in out)


def _steps_off(**steps) -> dict:
    """TrainTransform arguments that turn every random step off, but those given."""
    off = {
        "distort": PhotometricDistort(0.0, 0.0, (1.0, 1.0), 0.0, (1.0, 1.0), 0.0, 0.0, 0.0),
        "zoom_out": ZoomOut(prob=0.0),
        "crop": IoUCrop(min_ious=()),
        "flip": v2.RandomHorizontalFlip(p=0.0),
    }
    return off | steps


# ---------------------------------------------------------------- horizontal flip


def test_flip_golden_box_and_mirrored_pixels():
    image = random_image(50, 100)
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    labels = torch.tensor([7])
    flip = TrainTransform(100, **_steps_off(flip=v2.RandomHorizontalFlip(p=1.0)))
    out_image, out_boxes, out_labels = flip(image, boxes, labels)
    # (10, 20, 30, 40) in a 100 x 50 image mirrors to (70, 20, 90, 40), relative to it.
    torch.testing.assert_close(out_boxes, torch.tensor([[0.7, 0.4, 0.9, 0.8]]))
    assert torch.equal(out_image, transforms.preprocess([image.flip(-1)], 100)[0])
    assert torch.equal(out_labels, labels)


def test_default_flip_is_the_papers_half():
    image, boxes, labels = (
        random_image(5, 10),
        torch.tensor([[1.0, 1.0, 3.0, 4.0]]),
        torch.tensor([1]),
    )
    transform = TrainTransform(10, **_steps_off(flip=None))
    flips = [transform(image, boxes, labels, seed)[1][0, 0] != 0.1 for seed in range(400)]
    assert 150 < sum(flips) < 250


# ---------------------------------------------------------------- zoom-out


def test_zoom_out_moves_box_by_offset_keeps_size_and_fills_with_mean():
    height, width = 20, 30
    image = random_image(height, width)
    boxes = torch.tensor([[3.0, 4.0, 13.0, 19.0], [0.0, 0.0, 30.0, 20.0]])
    labels = torch.tensor([1, 2])
    zoom = ZoomOut(max_ratio=4.0, prob=1.0)
    zoomed = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out_image, out_boxes, out_labels = _v2(zoom, image, boxes, labels)
        canvas_h, canvas_w = out_image.shape[-2:]
        assert out_image.dtype == torch.uint8
        assert height <= canvas_h <= 4 * height and width <= canvas_w <= 4 * width
        # The second box is the whole image: its corner is the placement offset.
        left, top = (int(v) for v in out_boxes[1, :2])
        assert torch.equal(out_boxes - boxes, torch.tensor([[left, top, left, top]] * 2).float())
        assert torch.equal(out_image[:, top : top + height, left : left + width], image)
        outside = torch.ones(canvas_h, canvas_w, dtype=torch.bool)
        outside[top : top + height, left : left + width] = False
        assert torch.equal(out_image[:, outside], MEAN_U8[:, :, 0].expand(-1, int(outside.sum())))
        assert torch.equal(out_labels, labels)
        zoomed += (canvas_h, canvas_w) != (height, width)
    assert zoomed > 30


def test_zoom_out_ratio_never_exceeds_max_and_prob_zero_is_identity():
    image, boxes, labels = (
        random_image(10, 10),
        torch.tensor([[1.0, 1.0, 5.0, 5.0]]),
        torch.tensor([1]),
    )
    torch.manual_seed(1)
    zoom = ZoomOut(max_ratio=1.5, prob=1.0)
    sides = [_v2(zoom, image, boxes, labels)[0].shape[-1] for _ in range(200)]
    assert max(sides) <= 15 and min(sides) >= 10 and max(sides) >= 14
    out = _v2(ZoomOut(prob=0.0), image, boxes, labels)
    assert torch.equal(out[0], image) and torch.equal(out[1], boxes)
    # torchvision's transform, with the paper's settings by default (sec. 3.6).
    default = ZoomOut()
    assert isinstance(default, v2.RandomZoomOut)
    assert (default.side_range, default.p, default.fill) == ((1.0, 4.0), 0.5, list(PIXEL_MEAN))


# ---------------------------------------------------------------- resize


def test_normalize_is_preprocess_with_boxes_made_relative():
    image = torch.full((3, 50, 200), 200, dtype=torch.uint8)
    out_image, out_boxes, _ = Normalize(30)(
        image, torch.tensor([[20.0, 10, 60, 30]]), torch.tensor([1])
    )
    assert out_image.dtype == torch.float32 and out_image.shape == (3, 30, 30)
    torch.testing.assert_close(out_image[:, 0, 0], torch.tensor([77.0, 83.0, 96.0]))
    torch.testing.assert_close(out_boxes, torch.tensor([[0.1, 0.2, 0.3, 0.6]]))


# ---------------------------------------------------------------- photometric


def test_photometric_changes_image_only_and_keeps_uint8():
    image, boxes, labels = (
        random_image(20, 20),
        torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
        torch.tensor([3]),
    )
    distort = PhotometricDistort(
        brightness_prob=1.0, contrast_prob=1.0, saturation_prob=1.0, hue_prob=1.0
    )
    out_image, out_boxes, out_labels = distort(image, boxes, labels)
    assert out_boxes is boxes and out_labels is labels
    assert out_image.dtype == torch.uint8 and out_image.shape == image.shape
    assert not torch.equal(out_image, image)


def test_brightness_is_a_shift_within_delta_and_contrast_a_gain_within_range():
    image = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    boxes, labels = no_boxes()
    only_brightness = PhotometricDistort(
        brightness_prob=1.0, contrast_prob=0.0, saturation_prob=0.0, hue_prob=0.0
    )
    only_contrast = PhotometricDistort(
        brightness_prob=0.0, contrast_prob=1.0, saturation_prob=0.0, hue_prob=0.0
    )
    torch.manual_seed(0)
    shifts, gains = set(), set()
    for _ in range(50):
        bright = only_brightness(image, boxes, labels)[0].int()
        assert (bright == bright[0, 0, 0]).all() and abs(int(bright[0, 0, 0]) - 100) <= 32
        shifts.add(int(bright[0, 0, 0]))
        gained = only_contrast(image, boxes, labels)[0].int()
        assert (gained == gained[0, 0, 0]).all() and 50 <= int(gained[0, 0, 0]) <= 150
        gains.add(int(gained[0, 0, 0]))
    assert len(shifts) > 10 and len(gains) > 10


def _only(**probs: float) -> PhotometricDistort:
    off = {"brightness_prob": 0.0, "contrast_prob": 0.0, "saturation_prob": 0.0, "hue_prob": 0.0}
    return PhotometricDistort(**(off | probs))


def test_hue_turns_by_at_most_36_degrees_and_saturation_spares_grey():
    # Column 0 is an orange (hue 20 degrees), column 1 a grey, which neither change may touch.
    image = torch.tensor([[200, 128], [100, 128], [50, 128]], dtype=torch.uint8)[:, None, :]
    boxes, labels = no_boxes()
    torch.manual_seed(0)
    turns, saturations = [], []
    for _ in range(40):
        hued = _only(hue_prob=1.0)(image, boxes, labels)[0]
        saturated = _only(saturation_prob=1.0)(image, boxes, labels)[0]
        assert hued[:, 0, 1].tolist() == saturated[:, 0, 1].tolist() == [128, 128, 128]
        hue = colorsys.rgb_to_hsv(*(hued[:, 0, 0].double() / 255).tolist())[0] * 360
        turns.append((hue - 20 + 180) % 360 - 180)
        saturations.append(colorsys.rgb_to_hsv(*(saturated[:, 0, 0].double() / 255).tolist())[1])
    # OpenCV hue delta 18 = 36 degrees; 2 degrees allowed for rounding to uint8.
    assert max(abs(t) for t in turns) <= 38 and max(abs(t) for t in turns) > 20
    assert min(saturations) < 0.6 < 0.9 < max(saturations)  # the orange's own is 0.75


def test_all_probabilities_zero_is_identity():
    image, (boxes, labels) = random_image(8, 8), no_boxes()
    off = PhotometricDistort(
        brightness_prob=0.0, contrast_prob=0.0, saturation_prob=0.0, hue_prob=0.0
    )
    assert torch.equal(off(image, boxes, labels)[0], image)


# ---------------------------------------------------------------- full transforms


def _check_output(out, size):
    image, boxes, labels = out
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert boxes.dtype == torch.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert labels.dtype == torch.int64 and labels.shape == (boxes.shape[0],)
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    # pixels 0..255 minus the mean
    mean = torch.tensor(PIXEL_MEAN)[:, None, None]
    assert (image >= -mean - 1e-4).all() and (image <= 255 - mean + 1e-4).all()


@pytest.mark.parametrize("size", [300, 512])
def test_train_transform_output_format(size):
    image = random_image(60, 90)
    boxes = torch.tensor([[5.0, 5.0, 40.0, 50.0], [50.0, 10.0, 88.0, 58.0], [0.0, 0.0, 90, 60]])
    labels = torch.tensor([4, 9, 12])
    transform = TrainTransform(size)
    torch.manual_seed(0)
    for _ in range(8):
        out = transform(image, boxes, labels)
        _check_output(out, size)
        assert set(out[2].tolist()) <= {4, 9, 12}
        assert len(set(out[2].tolist())) == len(out[2])


def test_train_transform_keeps_labels_aligned_with_boxes():
    # Flip only: the box order and labels must survive, and the boxes mirror.
    image = random_image(40, 80)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 10.0], [40.0, 20.0, 80.0, 40.0]])
    labels = torch.tensor([5, 6])
    transform = TrainTransform(64, **_steps_off(flip=v2.RandomHorizontalFlip(p=1.0)))
    _, out_boxes, out_labels = transform(image, boxes, labels)
    assert out_labels.tolist() == [5, 6]
    torch.testing.assert_close(
        out_boxes, torch.tensor([[0.75, 0.0, 1.0, 0.25], [0.0, 0.5, 0.5, 1]])
    )


def test_train_transform_is_deterministic_given_a_seed():
    image = random_image(50, 70)
    boxes = torch.tensor([[5.0, 5.0, 30.0, 40.0], [35.0, 10.0, 68.0, 48.0]])
    labels = torch.tensor([1, 2])
    transform = TrainTransform(64)
    runs = [[transform(image, boxes, labels, s) for s in range(6)] for _ in range(2)]
    for first, second in zip(*runs, strict=True):
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)
    assert any(not torch.equal(runs[0][0][0], other[0]) for other in runs[0][1:])
    # A seeded call leaves the global RNG alone; without a seed the global RNG is used.
    torch.manual_seed(3)
    transform(image, boxes, labels, 123)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(3).get_state())
    torch.manual_seed(3)
    a = transform(image, boxes, labels)
    torch.manual_seed(3)
    b = transform(image, boxes, labels)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_train_transform_zero_boxes_and_tiny_box():
    image = random_image(30, 40)
    boxes, labels = no_boxes()
    tiny = torch.tensor([[10.0, 10.0, 10.5, 10.25]])
    transform = TrainTransform(64)
    torch.manual_seed(0)
    for _ in range(30):
        _check_output(transform(image, boxes, labels), 64)
        _check_output(transform(image, tiny, torch.tensor([1])), 64)


def test_input_boxes_outside_the_image_are_clipped_or_dropped():
    image = random_image(10, 20)
    boxes = torch.tensor([[-5.0, 2.0, 10.0, 12.0], [25.0, 0.0, 30.0, 5.0]])
    _, out_boxes, out_labels = EvalTransform(20)(image, boxes, torch.tensor([1, 2]))
    torch.testing.assert_close(out_boxes, torch.tensor([[0.0, 0.2, 0.5, 1.0]]))
    assert out_labels.tolist() == [1]


@pytest.mark.parametrize(("height", "width"), [(37, 51), (420, 250)])
def test_eval_transform_is_inference_preprocessing(height, width, monkeypatch):
    image = random_image(height, width)
    boxes = torch.tensor([[5.1, 3.7, 25.5, 37.0]])
    calls = []

    def spy(images, size, mean):
        calls.append((images, size, mean))
        return preprocess(images, size, mean)

    monkeypatch.setattr(transforms, "preprocess", spy)
    out_image, out_boxes, out_labels = EvalTransform(300)(image, boxes, torch.tensor([2]))
    # One call with the image itself and the network size: the pixels are inference's.
    assert len(calls) == 1 and calls[0][0][0] is image and calls[0][1:] == (300, PIXEL_MEAN)
    assert torch.equal(out_image, preprocess([image], 300)[0])
    torch.testing.assert_close(out_boxes, boxes / torch.tensor([width, height, width, height]))
    assert out_labels.tolist() == [2]


def test_train_with_randomness_off_equals_eval():
    image = random_image(33, 47)
    boxes = torch.tensor([[1.0, 2.0, 30.0, 31.0]])
    labels = torch.tensor([3])
    off = TrainTransform(96, **_steps_off())
    for a, b in zip(
        off(image, boxes, labels), EvalTransform(96)(image, boxes, labels), strict=True
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("image", "boxes", "labels", "message"),
    [
        (torch.zeros(3, 4, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), "float32"),
        (torch.zeros(1, 4, 4, dtype=torch.uint8), torch.zeros(0, 4), torch.zeros(0).long(), "1, 4"),
        (torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(2, 5), torch.zeros(2).long(), "2, 5"),
        (torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(2, 4), torch.zeros(3).long(), "(3,)"),
    ],
)
def test_bad_samples_raise_with_the_bad_value(image, boxes, labels, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EvalTransform(32)(image, boxes, labels)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"0\.5"):
        ZoomOut(max_ratio=0.5)
    with pytest.raises(ValueError, match=r"1\.2"):
        IoUCrop(min_ious=(0.1, 1.2))
    with pytest.raises(ValueError, match=r"1\.5"):
        ZoomOut(prob=1.5)


# ---------------------------------------------------------------- shrinking large photos


def test_shrink_golden_size_and_boxes_and_small_images_untouched():
    image = random_image(30, 40)
    boxes = torch.tensor([[4.0, 3.0, 20.0, 30.0]])
    labels = torch.tensor([1])
    out_image, out_boxes, out_labels = transforms.Shrink(15)(image, boxes, labels)
    # The shorter side 30 -> 15: everything halves, 40 x 30 -> 20 x 15.
    assert out_image.shape == (3, 15, 20)
    assert torch.equal(out_image, v2.functional.resize(image, [15, 20], antialias=True))
    torch.testing.assert_close(out_boxes, torch.tensor([[2.0, 1.5, 10.0, 15.0]]))
    assert out_labels is labels
    same = transforms.Shrink(30)(image, boxes, labels)
    assert same[0] is image and same[1] is boxes


def test_train_transform_shrinks_a_phone_photo_before_its_other_steps():
    # The smallest crop is 0.3 * sqrt(0.5) of a side: a shorter side of 1415 keeps it at
    # 300 pixels or more in both directions.
    assert TrainTransform(300).steps[0].short_side == 1415
    assert TrainTransform(512).steps[0].short_side == 2414
    seen = []

    class Recorded(PhotometricDistort):
        """No change (every probability 0), but the image size the distortion is given."""

        def __call__(self, image, boxes, labels):
            seen.append(tuple(image.shape))
            return super().__call__(image, boxes, labels)

    distort = Recorded(0.0, 0.0, (1.0, 1.0), 0.0, (1.0, 1.0), 0.0, 0.0, 0.0)
    photo = torch.full((3, 3000, 4000), 128, dtype=torch.uint8)
    boxes = torch.tensor([[1000.0, 750.0, 3000.0, 2250.0]])
    transform = TrainTransform(300, **_steps_off(distort=distort))
    image, out_boxes, _ = transform(photo, boxes, torch.tensor([1]))
    # 3000 x 4000 -> 1415 x round(4000 * 1415 / 3000) = 1415 x 1887 before the distortion.
    assert seen == [(3, 1415, 1887)]
    # Relative boxes do not move: shrinking scales the pixels and the boxes alike.
    assert image.shape == (3, 300, 300)
    torch.testing.assert_close(out_boxes, torch.tensor([[0.25, 0.25, 0.75, 0.75]]))
