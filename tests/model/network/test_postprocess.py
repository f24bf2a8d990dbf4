import pytest
import torch
from torchvision.models.detection import ssd300_vgg16 as torchvision_ssd300

from model.network.boxes import cxcywh_to_xyxy
from model.network.default_boxes import make_default_boxes, preset_spec
from model.network.postprocess import Cut, Detections, postprocess, postprocess_each

PRIORS = make_default_boxes(preset_spec(300, "voc"), [38, 19, 10, 5, 3, 1])
NUM_CLASSES = 6


def _raw_outputs(n: int, seed: int, busy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Random raw outputs. Busy: thousands of candidates per class, so the top-k cut applies.
    Otherwise background wins except on ~100 default boxes per image (a trained network)."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, PRIORS.shape[0], 4, generator=g) * 0.5
    conf = torch.randn(n, PRIORS.shape[0], NUM_CLASSES, generator=g) * 2.5
    if not busy:
        conf[..., 0] += 12.0
        for image in conf:
            hits = torch.randint(0, PRIORS.shape[0], (100,), generator=g)
            image[hits, torch.randint(1, NUM_CLASSES, (100,), generator=g)] += 14.0
    return loc, conf


@pytest.mark.parametrize(("score_threshold", "busy"), [(0.05, True), (0.3, True), (0.3, False)])
def test_same_detections_as_torchvision_ssd_postprocessing(score_threshold, busy):
    loc, conf = _raw_outputs(2, seed=0, busy=busy)
    reference_model = torchvision_ssd300(
        weights=None,
        weights_backbone=None,
        num_classes=NUM_CLASSES,
        score_thresh=score_threshold,
        nms_thresh=0.45,
        detections_per_img=200,
        topk_candidates=400,
    )
    anchors = [cxcywh_to_xyxy(PRIORS) * 300] * 2
    reference = reference_model.postprocess_detections(
        {"bbox_regression": loc, "cls_logits": conf}, anchors, [(300, 300)] * 2
    )
    ours = postprocess(loc, conf, PRIORS, [(300, 300)] * 2, score_threshold=score_threshold)
    for (boxes, scores, class_ids), ref in zip(ours, reference, strict=True):
        assert len(scores) == len(ref["scores"]) > (20 if busy else 10)
        torch.testing.assert_close(scores, ref["scores"])
        torch.testing.assert_close(boxes, ref["boxes"], atol=1e-3, rtol=1e-5)
        assert torch.equal(class_ids, ref["labels"])


def test_boxes_are_rescaled_to_each_image_and_clipped():
    loc, conf = _raw_outputs(1, seed=1)
    square = postprocess(loc, conf, PRIORS, [(300, 300)], score_threshold=0.1)[0]
    wide = postprocess(loc, conf, PRIORS, [(600, 150)], score_threshold=0.1)[0]
    # IoU is unchanged by axis-aligned scaling, so the same detections survive NMS.
    torch.testing.assert_close(wide[1], square[1])
    torch.testing.assert_close(
        wide[0], square[0] * torch.tensor([2.0, 0.5, 2.0, 0.5]), atol=1e-3, rtol=1e-5
    )
    boxes = wide[0]
    assert boxes.min() >= 0 and (boxes[:, 2] <= 600).all() and (boxes[:, 3] <= 150).all()
    # Without clipping some boxes would leave the image: the random offsets make big boxes.
    assert (boxes[:, [0, 1]] == 0).any()


def test_batch_of_different_sizes_matches_one_by_one():
    loc, conf = _raw_outputs(3, seed=2)
    sizes = [(640, 480), (100, 800), (300, 300)]
    batched = postprocess(loc, conf, PRIORS, sizes, score_threshold=0.2, max_detections=50)
    for i, size in enumerate(sizes):
        single = postprocess(
            loc[i : i + 1], conf[i : i + 1], PRIORS, [size], score_threshold=0.2, max_detections=50
        )[0]
        for a, b in zip(batched[i], single, strict=True):
            assert torch.equal(a, b)


def test_max_detections_keeps_the_best_and_sorting():
    loc, conf = _raw_outputs(2, seed=3)
    full = postprocess(loc, conf, PRIORS, [(300, 300)] * 2, score_threshold=0.05)
    capped = postprocess(
        loc, conf, PRIORS, [(300, 300)] * 2, score_threshold=0.05, max_detections=7
    )
    for f, c in zip(full, capped, strict=True):
        assert len(c[1]) == 7
        assert torch.equal(c[1], f[1][:7])
        assert (c[1][:-1] >= c[1][1:]).all()


def test_top_k_limits_candidates_per_class():
    # One class scores high on every default box: only top_k of them may enter NMS, and NMS
    # cannot return more than that.
    loc = torch.zeros(1, PRIORS.shape[0], 4)
    conf = torch.zeros(1, PRIORS.shape[0], NUM_CLASSES)
    conf[..., 1] = 10.0
    out = postprocess(loc, conf, PRIORS, [(300, 300)], score_threshold=0.5, top_k=5, nms_iou=1.0)
    assert len(out[0][1]) == 5
    assert set(out[0][2].tolist()) == {1}


def test_nothing_above_threshold_gives_empty_results():
    loc, conf = _raw_outputs(2, seed=4)
    out = postprocess(loc, conf, PRIORS, [(10, 10), (20, 20)], score_threshold=1.0)
    assert [len(s) for _, s, _ in out] == [0, 0]
    assert out[0][0].shape == (0, 4)


def test_detections_rows_are_plain_python_in_score_order():
    detections = Detections(
        torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.5, 8.0]]),
        torch.tensor([0.9, 0.5]),
        torch.tensor([2, 1]),
        ["square", "circle"],
    )
    assert detections.rows() == [
        ([1.0, 2.0, 3.0, 4.0], pytest.approx(0.9), 2, "square"),
        ([5.0, 6.0, 7.5, 8.0], 0.5, 1, "circle"),
    ]
    assert all(type(v) in (float, int) for row in detections.rows() for v in row[1:3])


def test_per_image_thresholds_and_caps_equal_separate_runs():
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(2, PRIORS.shape[0], 4, generator=g) * 0.5
    conf = torch.randn(2, PRIORS.shape[0], 3, generator=g) * 1.5  # no saturated (tied) scores
    sizes = [(640, 480), (300, 200)]
    cuts = [Cut(0.05, 200), Cut(0.6, 7)]
    mixed = postprocess_each(loc, conf, PRIORS, sizes, cuts)
    for i, cut in enumerate(cuts):
        [alone] = postprocess_each(loc[i : i + 1], conf[i : i + 1], PRIORS, sizes[i : i + 1], [cut])
        for got, expected in zip(mixed[i], alone, strict=True):
            assert torch.equal(got, expected)
    assert len(mixed[1][1]) == 7 and len(mixed[0][1]) > 7
    with pytest.raises(ValueError, match="need one cut per image: got 2 for 1 images"):
        postprocess_each(loc[:1], conf[:1], PRIORS, sizes[:1], cuts)
    with pytest.raises(ValueError, match=r"score_threshold must be in \[0, 1\], got 1.5"):
        Cut(1.5, 5)
    with pytest.raises(ValueError, match=r"max_detections must be >= 1, got 0"):
        Cut(0.1, 0)
    with pytest.raises(ValueError, match=r"class ids run from 1 to 2, got \[3\]"):
        postprocess_each(loc[:1], conf[:1], PRIORS, sizes[:1], [Cut(classes=frozenset({3}))])


def test_class_filters_and_nms_iou_per_image_equal_filtering_by_hand():
    # A class filter drops the other classes before the cap (so the cap counts only the kept
    # class), and each image keeps its own NMS IoU in one call.
    g = torch.Generator().manual_seed(1)
    loc = torch.randn(3, PRIORS.shape[0], 4, generator=g) * 0.5
    conf = torch.randn(3, PRIORS.shape[0], 3, generator=g) * 1.5
    sizes = [(640, 480), (300, 200), (320, 320)]
    everything = Cut(0.05, 10_000)
    full = postprocess_each(loc, conf, PRIORS, sizes, [everything] * 3)
    cuts = [Cut(0.05, 5, frozenset({2})), Cut(0.05, 10_000, nms_iou=0.2), everything]
    mixed = postprocess_each(loc, conf, PRIORS, sizes, cuts)
    boxes, scores, ids = full[0]
    only_two = (ids == 2).nonzero().flatten()[:5]
    assert mixed[0][2].tolist() == [2] * 5
    assert torch.equal(mixed[0][1], scores[only_two]) and torch.equal(mixed[0][0], boxes[only_two])
    # The lower IoU suppresses more, and equals its own run; the third image is unchanged.
    [alone] = postprocess_each(loc[1:2], conf[1:2], PRIORS, sizes[1:2], [cuts[1]])
    assert all(torch.equal(a, b) for a, b in zip(mixed[1], alone, strict=True))
    assert len(mixed[1][1]) < len(full[1][1])
    assert all(torch.equal(a, b) for a, b in zip(mixed[2], full[2], strict=True))
