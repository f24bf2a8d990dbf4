import math

import torch
from torchvision.models.detection._utils import BoxCoder

from model.network.box_coding import decode_boxes, encode_boxes
from model.network.boxes import box_iou, cxcywh_to_xyxy, xyxy_to_cxcywh


def _random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * 0.8
    wh = torch.rand(n, 2, generator=generator) * 0.5 + 0.01
    return torch.cat([xy, xy + wh], dim=1)


def test_encode_hand_computed():
    default = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    gt = torch.tensor([[0.45, 0.45, 0.65, 0.85]])  # centre (0.55, 0.65), size (0.2, 0.4)
    expected = torch.tensor([[0.05 / 0.02, 0.15 / 0.02, 0.0, math.log(2.0) / 0.2]])
    torch.testing.assert_close(encode_boxes(gt, default), expected)


def test_round_trip():
    g = torch.Generator().manual_seed(0)
    gt = _random_boxes(500, g)
    default = xyxy_to_cxcywh(_random_boxes(500, g))
    torch.testing.assert_close(
        decode_boxes(encode_boxes(gt, default), default), gt, atol=1e-6, rtol=1e-5
    )


def test_equals_torchvision_box_coder_with_weights_10_10_5_5():
    g = torch.Generator().manual_seed(1)
    gt = _random_boxes(300, g)
    anchors = _random_boxes(300, g)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(
        encode_boxes(gt, xyxy_to_cxcywh(anchors)),
        coder.encode_single(gt, anchors),
        atol=1e-5,
        rtol=1e-5,
    )
    offsets = torch.randn(300, 4, generator=g)
    torch.testing.assert_close(
        decode_boxes(offsets, xyxy_to_cxcywh(anchors)),
        coder.decode_single(offsets, anchors),
        atol=1e-6,
        rtol=1e-5,
    )


def test_degenerate_box_encodes_to_finite_values():
    default = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    flat = torch.tensor([[0.3, 0.3, 0.3, 0.6]])  # zero width
    assert torch.isfinite(encode_boxes(flat, default)).all()


def test_huge_predicted_offsets_stay_finite():
    default = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    assert torch.isfinite(decode_boxes(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), default)).all()


def test_box_helpers():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1.0 / 7.0, 0.0]]))
    torch.testing.assert_close(
        cxcywh_to_xyxy(torch.tensor([[1.0, 2.0, 2.0, 4.0]])), torch.tensor([[0.0, 0.0, 2.0, 4.0]])
    )
