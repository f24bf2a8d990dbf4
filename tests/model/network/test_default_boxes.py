import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.ops import box_convert
from torchvision.ops import box_iou as torchvision_box_iou

from model.data.synthetic import SyntheticShapes
from model.network.boxes import box_iou
from model.network.default_boxes import (
    DefaultBoxSpec,
    best_iou,
    coverage,
    make_default_boxes,
    preset_spec,
)
from model.network.ssd import feature_map_sides, ssd300_vgg16, ssd512_vgg16


def test_tiny_configuration_matches_hand_computed_boxes():
    # One 2x2 map on a 100 px input, step 50: centres at 0.25 and 0.75.
    # s_k = 20/100 = 0.2; s'_k = sqrt(20 * 45) / 100 = 0.3; ratio 2: (0.2*sqrt2, 0.2/sqrt2).
    spec = DefaultBoxSpec(
        size=100, min_sizes=(20,), max_sizes=(45,), steps=(50,), aspect_ratios=((2,),)
    )
    boxes = make_default_boxes(spec, [2])
    r2 = math.sqrt(2)
    per_cell = [(0.2, 0.2), (0.3, 0.3), (0.2 * r2, 0.2 / r2), (0.2 / r2, 0.2 * r2)]
    centres = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]  # row-major
    expected = torch.tensor([[cx, cy, w, h] for cx, cy in centres for w, h in per_cell])
    assert boxes.shape == (16, 4)
    torch.testing.assert_close(boxes, expected)


@pytest.mark.parametrize(
    ("builder", "sides", "count"),
    [(ssd300_vgg16, [38, 19, 10, 5, 3, 1], 8732), (ssd512_vgg16, [64, 32, 16, 8, 4, 2, 1], 24564)],
)
def test_box_counts_and_feature_map_sizes(builder, sides, count):
    network = builder(21, width=0.125)
    assert network.feature_map_sizes == sides
    assert network.default_boxes.shape == (count, 4)


def test_feature_map_sizes_are_the_real_ones():
    network = ssd300_vgg16(3, width=0.125).eval()
    x = torch.zeros(1, 3, 300, 300)
    sides = []
    with torch.no_grad():
        for stage in network.stages:
            x = stage(x)
            sides.append((x.shape[2], x.shape[3]))
    assert sides == [(s, s) for s in network.feature_map_sizes]


def test_preset_sizes_match_the_authors_scripts():
    voc = preset_spec(300, "voc")
    assert voc.min_sizes == (30, 60, 111, 162, 213, 264)
    assert voc.max_sizes == (60, 111, 162, 213, 264, 315)
    coco = preset_spec(300, "coco")
    assert coco.min_sizes == (21, 45, 99, 153, 207, 261)
    assert coco.max_sizes == (45, 99, 153, 207, 261, 315)
    # ssd_pascal_512.py: min_ratio 15, max_ratio 90, first map 7% / 15% of 512.
    voc512 = preset_spec(512, "voc")
    assert voc512.min_sizes == pytest.approx((35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8))
    assert voc512.max_sizes == pytest.approx((76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6))
    # COCO SSD512: min_ratio 10, max_ratio 90, first map 4% / 10% of 512.
    coco512 = preset_spec(512, "coco")
    assert coco512.min_sizes == pytest.approx((20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8))
    assert coco512.max_sizes == pytest.approx((51.2, 133.12, 215.04, 296.96, 378.88, 460.8, 542.72))
    # "fine": the COCO SSD512 percentages (4 % / 10 %, then 10 % to 90 %) on SSD300.
    fine = preset_spec(300, "fine")
    assert fine.min_sizes == pytest.approx((12, 30, 90, 150, 210, 270))
    assert fine.max_sizes == pytest.approx((30, 90, 150, 210, 270, 330))
    assert preset_spec(512, "fine") == coco512
    assert fine.boxes_per_location == coco.boxes_per_location
    assert voc.steps == (8, 16, 32, 64, 100, 300)
    assert voc.boxes_per_location == [4, 6, 6, 6, 4, 4]
    assert voc512.boxes_per_location == [4, 6, 6, 6, 6, 4, 4]


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="preset='kitti'"):
        preset_spec(300, "kitti")


def test_coco_preset_equals_torchvision_default_box_generator():
    # torchvision's own SSD300 COCO configuration, with clipping turned off.
    generator = DefaultBoxGenerator(
        [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
        steps=[8, 16, 32, 64, 100, 300],
        clip=False,
    )
    sides = [38, 19, 10, 5, 3, 1]
    reference = generator._grid_default_boxes([[s, s] for s in sides], [300, 300])
    ours = make_default_boxes(preset_spec(300, "coco"), sides)
    torch.testing.assert_close(ours, reference.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("size", "preset"), [(300, "voc"), (512, "voc"), (512, "coco")])
def test_other_presets_agree_with_torchvision_layout(size, preset):
    spec = preset_spec(size, preset)
    network_sides = (ssd300_vgg16 if size == 300 else ssd512_vgg16)(
        2, width=0.125
    ).feature_map_sizes
    scales = [s / size for s in spec.min_sizes] + [spec.max_sizes[-1] / size]
    generator = DefaultBoxGenerator(
        [list(r) for r in spec.aspect_ratios], scales=scales, steps=list(spec.steps), clip=False
    )
    reference = generator._grid_default_boxes([[s, s] for s in network_sides], [size, size])
    torch.testing.assert_close(
        make_default_boxes(spec, network_sides), reference.float(), rtol=0, atol=1e-6
    )


def test_boxes_are_not_clipped():
    boxes = preset_spec(300, "voc")
    default = make_default_boxes(boxes, [38, 19, 10, 5, 3, 1])
    assert default[:, 2:].max() > 1.0  # the largest ar=2 box on the 1x1 map is wider than 1


def test_fine_preset_gives_small_synthetic_objects_a_default_box():
    # Why "fine" exists: objects of 8-16 px (in the 300 px input) almost never overlap a
    # "coco" box (21 px and up) at IoU >= 0.5, so only the bipartite pass can match them.
    samples = [SyntheticShapes(150, split="test")[i] for i in range(150)]
    boxes = torch.cat(
        [t["boxes"] * 300 / torch.tensor(image.shape[1:]).flip(0).repeat(2) for image, t in samples]
    )
    sides = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1).sqrt()
    small = boxes[(sides >= 8) & (sides < 16)]
    assert len(small) > 50

    def covered(preset: str) -> float:
        priors = make_default_boxes(preset_spec(300, preset), [38, 19, 10, 5, 3, 1]) * 300
        best = box_iou(small, box_convert(priors, "cxcywh", "xyxy")).max(dim=1).values
        return (best >= 0.5).float().mean().item()

    assert covered("coco") < 0.15
    assert covered("fine") > covered("coco") + 0.25  # measured 0.12 and 0.47


@pytest.mark.parametrize(
    ("builder", "size"), [(ssd300_vgg16, 300), (ssd512_vgg16, 512)], ids=["300", "512"]
)
def test_feature_map_sides_without_a_network_equal_the_networks(builder, size):
    assert list(feature_map_sides(size)) == builder(2, width=0.125).feature_map_sizes


def test_coverage_of_default_boxes_and_of_a_box_far_smaller_than_any():
    spec, sides = preset_spec(300, "voc"), feature_map_sides(300)
    priors = make_default_boxes(spec, list(sides))
    # Three boxes that are default boxes (conv4_3: rows 0..5775, conv7: 5776.., the 1x1 map's
    # last one) and a 1 px box, whose IoU with the smallest default box (30 px) is 1/900.
    exact = box_convert(priors[[1234, 6000, 8731]], "cxcywh", "xyxy")
    tiny = torch.tensor([[0.5, 0.5, 0.5 + 1 / 300, 0.5 + 1 / 300]])
    boxes = torch.cat([exact, tiny])
    assert coverage(boxes, spec, sides) == 0.75
    best = best_iou(boxes, spec, sides)
    np.testing.assert_allclose(best[:3], np.ones(3), atol=1e-6)
    np.testing.assert_allclose(best[3], 1 / 900, rtol=1e-4)
    assert coverage(boxes, spec, sides, iou=0.0) == 1.0
    assert coverage(torch.zeros(0, 4), spec, sides) == 1.0


@pytest.mark.parametrize(
    ("size", "preset", "clip"),
    [(300, "voc", "none"), (512, "fine", "none"), (300, "coco", "wh"), (300, "voc", "cxcywh")],
)
def test_best_iou_equals_torchvisions_box_iou_over_every_default_box(size, preset, clip):
    # Random boxes of every size, many near or past the image's edges, where the clipped
    # centres of "cxcywh" matter; the brute force takes the IoU with all 8,732 or 24,564.
    generator = torch.Generator().manual_seed(0)
    centres = torch.rand(2000, 2, generator=generator) * 1.2 - 0.1
    sides = torch.exp(torch.rand(2000, 2, generator=generator) * 5 - 5.5)  # 0.004 to 0.6
    boxes = torch.cat([centres - sides / 2, centres + sides / 2], dim=1).double()
    spec = replace(preset_spec(size, preset), clip=clip)
    priors = make_default_boxes(spec, list(feature_map_sides(size))).double()
    reference = torchvision_box_iou(boxes, box_convert(priors, "cxcywh", "xyxy")).amax(dim=1)
    ours = best_iou(boxes, spec, feature_map_sides(size))
    np.testing.assert_allclose(ours, reference.numpy(), rtol=0, atol=1e-6)
    assert 0.05 < (reference >= 0.5).double().mean() < 0.95  # both sides of the threshold
