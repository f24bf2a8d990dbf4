import pytest
import torch
from torch import nn
from torchvision.models.detection import ssd300_vgg16 as torchvision_ssd300

from model import ssd300_vgg16, ssd512_vgg16
from model.network.vgg import L2Norm


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_matches_torchvision_ssd300():
    reference = torchvision_ssd300(weights=None, weights_backbone=None, num_classes=21)
    assert _count(ssd300_vgg16(21)) == _count(reference) == 26_285_486


@pytest.mark.parametrize(
    ("builder", "size", "count"), [(ssd300_vgg16, 300, 8732), (ssd512_vgg16, 512, 24564)]
)
def test_forward_shapes(builder, size, count):
    network = builder(5, width=0.125).eval()
    with torch.no_grad():
        loc, conf = network(torch.randn(2, 3, size, size))
    assert loc.shape == (2, count, 4)
    assert conf.shape == (2, count, 5)
    assert network.input_size == size


def test_predictor_rows_follow_the_default_box_order():
    # With zero weights, each head outputs its bias: box a of a cell gets bias[4a:4a+4].
    network = ssd300_vgg16(3, width=0.125).eval()
    for k, head in enumerate(network.loc_heads):
        nn.init.zeros_(head.weight)
        head.bias.data = torch.arange(head.out_channels, dtype=torch.float32) + 1000 * k
    with torch.no_grad():
        loc, _ = network(torch.randn(1, 3, 300, 300))
    start = 0
    for k, side in enumerate(network.feature_map_sizes):
        boxes = network.loc_heads[k].out_channels // 4
        rows = loc[0, start : start + side * side * boxes].reshape(side * side, boxes, 4)
        expected = (torch.arange(boxes * 4, dtype=torch.float32) + 1000 * k).reshape(boxes, 4)
        assert torch.equal(rows, expected.expand_as(rows))
        start += side * side * boxes
    assert start == loc.shape[1]


def test_base_layers_are_the_papers():
    network = ssd300_vgg16(21)
    convs = [m for m in network.stages[1].modules() if isinstance(m, nn.Conv2d)]
    fc6, fc7 = convs[-2], convs[-1]
    assert (fc6.kernel_size, fc6.dilation, fc6.padding, fc6.out_channels) == (
        (3, 3),
        (6, 6),
        (6, 6),
        1024,
    )
    assert (fc7.kernel_size, fc7.out_channels) == ((1, 1), 1024)
    pools = [m for m in network.stages[0].modules() if isinstance(m, nn.MaxPool2d)]
    assert [p.ceil_mode for p in pools] == [False, False, True]  # pool3 rounds up
    pool5 = [m for m in network.stages[1].modules() if isinstance(m, nn.MaxPool2d)][-1]
    assert (pool5.kernel_size, pool5.stride, pool5.padding) == (3, 1, 1)
    assert isinstance(network.l2norm, L2Norm)
    assert torch.equal(network.l2norm.weight, torch.full((512,), 20.0))


def test_batch_norm_variant_has_a_norm_after_every_conv():
    network = ssd300_vgg16(21, batch_norm=True)
    for stage in network.stages:
        layers = list(stage)
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Conv2d):
                assert isinstance(layers[i + 1], nn.BatchNorm2d)
                assert layer.bias is None
    plain = ssd300_vgg16(21)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


def test_l2norm_scales_each_position_to_the_learned_norm():
    norm = L2Norm(8, scale=20.0)
    out = norm(torch.randn(2, 8, 5, 5))
    torch.testing.assert_close(out.norm(dim=1), torch.full((2, 5, 5), 20.0))


def test_width_scales_channels_but_not_boxes():
    half = ssd300_vgg16(21, width=0.5)
    full = ssd300_vgg16(21)
    assert torch.equal(half.default_boxes, full.default_boxes)
    assert half.loc_heads[1].in_channels == 512
    assert _count(half) < _count(full) / 3


def test_invalid_arguments_are_reported():
    with pytest.raises(ValueError, match="num_classes"):
        ssd300_vgg16(1)
    with pytest.raises(ValueError, match="preset='nope'"):
        ssd300_vgg16(3, preset="nope")
    with pytest.raises(ValueError, match="width"):
        ssd300_vgg16(3, width=0)


def test_from_scratch_activations_start_at_unit_scale():
    # SSD's input keeps the 0-255 scale; the first conv's init compensates (see _init_weights).
    torch.manual_seed(0)
    network = ssd300_vgg16(3, width=0.25).eval()
    x = torch.randn(2, 3, 300, 300) * 58.0  # pixels minus the mean: std ~58
    with torch.no_grad():
        conv4_3 = network.stages[0](x)
        fc7 = network.stages[1](conv4_3)
    assert 0.1 < conv4_3.pow(2).mean().sqrt() < 10
    assert 0.1 < fc7.pow(2).mean().sqrt() < 10
