import torch

from model.network.matching import match

# Four default boxes (cx, cy, w, h): A = [0, 0, .5, .5], B = [.5, 0, 1, .5], C = the whole
# image, D = [.5, .5, 1, 1] in xyxy.
PRIORS = torch.tensor(
    [
        [0.25, 0.25, 0.5, 0.5],
        [0.75, 0.25, 0.5, 0.5],
        [0.50, 0.50, 1.0, 1.0],
        [0.75, 0.75, 0.5, 0.5],
    ]
)


def _match(*gts: list[float], threshold: float = 0.5) -> list[int]:
    return match(torch.tensor([list(gts)]), PRIORS, threshold)[0].tolist()


def test_forced_best_match_below_threshold():
    gt = [0.35, 0.35, 0.65, 0.65]  # best IoU is C's, 0.09; A, B and D get 0.071 each
    assert _match(gt) == [-1, -1, 0, -1]


def test_two_ground_truths_wanting_the_same_default_box_both_get_one():
    gt_small = [0.0, 0.0, 0.5, 0.4]  # IoU: A 0.8, C 0.2
    gt_exact = [0.0, 0.0, 0.5, 0.5]  # IoU: A 1.0, C 0.25
    # Bipartite: A goes to the exact box (IoU 1); the other gets its best free box, C (0.2 <
    # 0.5, forced). The popular port would give A to whichever came last and drop the other.
    assert _match(gt_small, gt_exact) == [1, -1, 0, -1]
    assert _match(gt_exact, gt_small) == [0, -1, 1, -1]


def test_ties_go_to_the_lowest_index():
    straddling = [0.25, 0.0, 0.75, 0.5]  # IoU 1/3 with A and with B, 0.25 with C
    assert _match(straddling) == [0, -1, -1, -1]
    # Two identical ground truths: the first gets the best box, the second the next best.
    same = [0.0, 0.0, 0.5, 0.5]
    assert _match(same, same) == [0, -1, 1, -1]


def test_threshold_is_inclusive_and_every_box_takes_its_best_ground_truth():
    top_half = [0.0, 0.0, 1.0, 0.5]  # IoU exactly 0.5 with A, B and C
    assert _match(top_half) == [0, 0, 0, -1]
    assert _match(top_half, threshold=0.51) == [0, -1, -1, -1]


def test_degenerate_and_padding_boxes_never_match():
    zero_area = [0.2, 0.2, 0.2, 0.4]
    padding = [0.0, 0.0, 0.0, 0.0]
    assert _match(zero_area, padding) == [-1, -1, -1, -1]
    assert _match(padding, [0.5, 0.5, 1.0, 1.0]) == [-1, -1, -1, 1]


def test_batch_equals_one_image_at_a_time():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3, 5, 2, generator=g) * 0.7
    gts = torch.cat([xy, xy + 0.05 + torch.rand(3, 5, 2, generator=g) * 0.3], dim=2)
    priors = torch.cat(
        [torch.rand(200, 2, generator=g), torch.rand(200, 2, generator=g) * 0.4 + 0.05], 1
    )
    batched = match(gts, priors)
    for i in range(3):
        assert torch.equal(batched[i], match(gts[i : i + 1], priors)[0])
    assert (batched >= 0).sum(dim=1).min() >= 5  # every ground truth got at least one box


def test_no_ground_truth():
    assert match(torch.zeros(2, 0, 4), PRIORS).tolist() == [[-1] * 4, [-1] * 4]
