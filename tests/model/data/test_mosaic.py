"""Mosaic: where four images and their boxes land, worked out by hand."""

import pytest
import torch

from model.data.loader import AugmentedDataset
from model.data.mosaic import Mosaic
from model.data.synthetic import SyntheticShapes
from model.data.transforms import EvalTransform

FILL = (10.0, 20.0, 30.0)


def _solid(height: int, width: int, value: int, box: list[float], label: int):
    image = torch.full((3, height, width), value, dtype=torch.uint8)
    return image, torch.tensor([box], dtype=torch.float32), torch.tensor([label])


def test_four_pieces_sit_around_the_centre_with_their_boxes():
    # size 100: canvas 200 x 200. Each piece is already 100 px on its longer side, so no
    # resize. Centre (120, 80).
    pieces = [
        _solid(50, 100, 1, [10, 10, 30, 40], 1),  # h 50, w 100: x 20..120, y 30..80
        _solid(100, 60, 2, [0, 0, 60, 100], 2),  # x 120..180, y -20..80: top 20 rows cut
        _solid(100, 100, 3, [5, 5, 95, 95], 3),  # x 20..120, y 80..180
        _solid(40, 100, 4, [90, 30, 100, 40], 4),  # x 120..220: 20 columns cut; y 80..120
    ]
    image, boxes, labels = Mosaic(1.0, size=100, fill=FILL)(pieces, (120, 80))
    assert image.shape == (3, 200, 200) and image.dtype == torch.uint8
    # pixel rows/columns just inside each piece's corner at the centre
    assert image[0, 79, 119] == 1 and image[0, 79, 120] == 2
    assert image[0, 80, 119] == 3 and image[0, 80, 120] == 4
    assert image[0, 30, 20] == 1 and image[0, 29, 20] == 10  # fill above piece 0
    assert image[0, 0, 120] == 2  # piece 1 runs off the top: its row 20 is canvas row 0
    assert image[0, 119, 199] == 4 and image[0, 120, 199] == 10
    assert image[:, 190, 5].tolist() == [10, 20, 30]
    expected = [
        [30, 40, 50, 70],  # (10, 10, 30, 40) + (20, 30)
        [120, 0, 180, 80],  # (0, 0, 60, 100) + (120, -20), clipped at the top
        [25, 85, 115, 175],  # (5, 5, 95, 95) + (20, 80)
    ]
    # piece 3's box (90, 30, 100, 40) + (120, 80) = (210, 110, 220, 120) lies wholly in the
    # 20 cut columns, so it is dropped with its label.
    torch.testing.assert_close(boxes, torch.tensor(expected, dtype=torch.float32))
    assert labels.tolist() == [1, 2, 3]


def test_pieces_are_resized_to_the_longer_side_keeping_their_shape():
    # 200 x 400 (h x w) at size 100 -> 50 x 100: scale 0.25; 10 x 20 -> 50 x 100: scale 5.
    big = _solid(200, 400, 7, [40, 20, 240, 180], 1)  # -> (10, 5, 60, 45)
    small = _solid(10, 20, 9, [0, 0, 20, 10], 2)  # -> (0, 0, 100, 50)
    image, boxes, labels = Mosaic(1.0, size=100, fill=FILL)([big, small, big, small], (100, 100))
    # centre (100, 100): piece 0 at (0, 50), 1 at (100, 50), 2 at (0, 100), 3 at (100, 100)
    assert image[0, 50, 0] == 7 and image[0, 49, 0] == 10
    assert image[0, 50, 100] == 9 and image[0, 99, 199] == 9
    expected = [[10, 55, 60, 95], [100, 50, 200, 100], [10, 105, 60, 145], [100, 100, 200, 150]]
    torch.testing.assert_close(boxes, torch.tensor(expected, dtype=torch.float32))
    assert labels.tolist() == [1, 2, 1, 2]


def test_centres_are_drawn_from_the_middle_half_and_checked():
    mosaic = Mosaic(1.0, size=100)
    generator = torch.Generator().manual_seed(0)
    centres = [mosaic.draw_centre(generator) for _ in range(500)]
    xs, ys = zip(*centres, strict=True)
    assert 50 <= min(xs) < 55 and 145 <= max(xs) < 150
    assert 50 <= min(ys) < 55 and 145 <= max(ys) < 150
    with pytest.raises(ValueError, match="takes 4 samples"):
        mosaic([_solid(4, 4, 0, [0, 0, 1, 1], 1)] * 3, (100, 100))
    with pytest.raises(ValueError, match=r"centre must lie on the 200 x 200 canvas"):
        mosaic([_solid(4, 4, 0, [0, 0, 1, 1], 1)] * 4, (201, 0))
    with pytest.raises(ValueError, match="prob must be in"):
        Mosaic(1.5)


def test_the_loader_makes_the_asked_share_of_mosaics_reproducibly():
    shapes = SyntheticShapes(16)
    plain = AugmentedDataset(shapes, EvalTransform(300), seed=1)
    half = AugmentedDataset(shapes, EvalTransform(300), seed=1, mosaic=Mosaic(0.5))
    keys = [(epoch, index) for epoch in range(4) for index in range(16)]
    # EvalTransform draws nothing, so a sample that is not a mosaic is the plain one.
    made = [not torch.equal(half[k][0], plain[k][0]) for k in keys]
    assert 20 <= sum(made) <= 44  # 64 draws at p = 0.5: 32 +- 3 standard deviations
    again = AugmentedDataset(shapes, EvalTransform(300), seed=1, mosaic=Mosaic(0.5))
    for key in keys[:8]:
        assert all(torch.equal(a, b) for a, b in zip(half[key], again[key], strict=True))
    every = AugmentedDataset(shapes, EvalTransform(300), seed=1, mosaic=Mosaic(1.0))
    for key in keys[:4]:
        image, boxes, labels = every[key]
        assert image.shape == (3, 300, 300) and len(boxes) == len(labels) >= 1
