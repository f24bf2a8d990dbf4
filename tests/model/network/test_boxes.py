import pytest
import torch
from torchvision.ops import box_convert

from model.network.boxes import clip_and_sanitize, xywh_to_xyxy, xyxy_to_xywh


def test_xywh_round_trip_matches_torchvision():
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=generator) * 400
    boxes = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=generator) * 200], dim=1)
    xywh = xyxy_to_xywh(boxes)
    # Hand-written golden, then torchvision's own conversion as the independent check.
    assert xyxy_to_xywh(torch.tensor([[10.0, 20.0, 50.0, 80.0]])).tolist() == [[10, 20, 40, 60]]
    assert torch.equal(xywh, box_convert(boxes, in_fmt="xyxy", out_fmt="xywh"))
    assert torch.equal(xywh[:, :2], boxes[:, :2])
    torch.testing.assert_close(xywh_to_xyxy(xywh), boxes)
    assert torch.equal(xywh_to_xyxy(xywh), box_convert(xywh, in_fmt="xywh", out_fmt="xyxy"))


def test_clip_and_sanitize_golden():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],  # inside: kept as is
            [0.0, 0.0, 0.0, 1.0],  # no width: dropped
            [2.0, 2.0, 1.0, 3.0],  # x_max < x_min: dropped
            [-5.0, 2.0, 10.0, 12.0],  # partly outside: clipped to (0, 2, 10, 10)
            [25.0, 0.0, 30.0, 5.0],  # right of the 20 px image: nothing left, dropped
            [float("nan"), 0.0, 1.0, 1.0],  # not finite: dropped
            [3.0, 3.0, 3.25, 3.5],  # thinner than a pixel but real: kept
        ]
    )
    kept, keep = clip_and_sanitize(boxes, (10, 20))
    assert keep.tolist() == [True, False, False, True, False, False, True]
    assert kept.tolist() == [[0, 0, 1, 1], [0, 2, 10, 10], [3, 3, 3.25, 3.5]]
    assert kept.dtype == torch.float32
    kept, keep = clip_and_sanitize(torch.zeros(0, 4, dtype=torch.float64), (10, 20))
    assert kept.shape == (0, 4) and kept.dtype == torch.float64 and keep.shape == (0,)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        clip_and_sanitize(torch.zeros(3), (10, 20))
