import math

import pytest
import torch
import torch.nn.functional as F

from model.network.box_coding import encode_boxes
from model.network.default_boxes import make_default_boxes, preset_spec
from model.network.loss import MultiBoxLoss, pad_targets
from model.network.matching import match

# Eight default boxes (cx, cy, w, h) in a row, 0.1 wide and tall, with no overlap between them.
PRIORS = torch.tensor([[0.05 + 0.1 * i, 0.5, 0.1, 0.1] for i in range(8)])


def _prior_xyxy(i: int) -> torch.Tensor:
    cx, cy, w, h = PRIORS[i].tolist()
    return torch.tensor([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]])


def test_hand_computed_loss_with_three_to_one_mining():
    # One object exactly on prior 2 (class 1): one positive, so exactly 3 negatives are mined.
    gt = [_prior_xyxy(2)]
    labels = [torch.tensor([1])]
    loc = torch.zeros(1, 8, 4)
    loc[0, 2] = torch.tensor([0.5, -2.0, 0.0, 0.0])  # target offsets are all 0
    # Two classes; logit of class 1 is x_i, background 0. Negative loss: log(1 + e^x_i).
    x = torch.tensor([0.1, 3.0, 0.0, -1.0, 2.0, 0.5, 1.0, -2.0])
    conf = torch.stack([torch.zeros(8), x], dim=1)[None]

    terms = MultiBoxLoss(PRIORS)(loc, conf, gt, labels)

    loc_expected = 0.5 * 0.5**2 + (2.0 - 0.5)  # Smooth-L1: 0.125 + 1.5
    pos_ce = math.log(1 + math.exp(-0.0))  # -log softmax([0, 0])[1] = log 2
    hardest = [3.0, 2.0, 1.0]  # priors 1, 4, 6
    neg_ce = sum(math.log(1 + math.exp(v)) for v in hardest)
    assert terms.num_positives == 1
    assert terms.loc.item() == pytest_approx(loc_expected)
    assert terms.conf.item() == pytest_approx(pos_ce + neg_ce)
    assert terms.total.item() == pytest_approx(loc_expected + pos_ce + neg_ce)


def pytest_approx(value: float):
    return pytest.approx(value, rel=1e-5)


def test_negatives_capped_by_what_exists():
    # Two objects on 8 priors: 6 negatives exist, fewer than 3 x 2, so all 6 are used.
    gt = [torch.cat([_prior_xyxy(0), _prior_xyxy(5)])]
    labels = [torch.tensor([1, 2])]
    conf = torch.randn(1, 8, 3, generator=torch.Generator().manual_seed(0))
    terms = MultiBoxLoss(PRIORS)(torch.zeros(1, 8, 4), conf, gt, labels)
    target = torch.zeros(8, dtype=torch.int64)
    target[0], target[5] = 1, 2
    expected = F.cross_entropy(conf[0], target, reduction="sum") / 2
    torch.testing.assert_close(terms.conf, expected)


def test_exactly_three_negatives_per_positive_on_a_real_prior_set():
    priors = make_default_boxes(preset_spec(300, "voc"), [38, 19, 10, 5, 3, 1])
    loss = MultiBoxLoss(priors)
    g = torch.Generator().manual_seed(3)
    boxes = [
        torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.9]]),
        torch.tensor([[0.3, 0.3, 0.35, 0.4]]),
    ]
    labels = [torch.tensor([1, 2]), torch.tensor([3])]
    conf = torch.randn(2, priors.shape[0], 4, generator=g)
    padded, _ = pad_targets(boxes, labels)
    positive = match(padded, priors) >= 0
    ce = F.cross_entropy(
        conf.flatten(0, 1), torch.zeros(2 * priors.shape[0], dtype=torch.int64), reduction="none"
    ).view(2, -1)
    negative = loss._hard_negatives(ce, positive)
    assert negative.sum(dim=1).tolist() == (3 * positive.sum(dim=1)).tolist()
    assert not (negative & positive).any()
    # The mined ones are the hardest: none left out scores higher than the easiest one taken.
    for i in range(2):
        taken = ce[i][negative[i]]
        left = ce[i][~negative[i] & ~positive[i]]
        assert taken.min() >= left.max()


def test_no_ground_truth_gives_a_finite_zero_loss_and_gradients():
    loc = torch.randn(2, 8, 4, requires_grad=True)
    conf = torch.randn(2, 8, 3, requires_grad=True)
    terms = MultiBoxLoss(PRIORS)(
        loc, conf, [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.int64)] * 2
    )
    assert terms.total.item() == 0.0 and terms.num_positives == 0
    terms.total.backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(conf.grad).all()


def test_degenerate_ground_truth_never_produces_nan():
    loc = torch.randn(1, 8, 4, requires_grad=True)
    conf = torch.randn(1, 8, 3, requires_grad=True)
    flat = torch.tensor([[0.2, 0.45, 0.2, 0.55], [0.3, 0.5, 0.4, 0.5]])  # zero width, zero height
    terms = MultiBoxLoss(PRIORS)(loc, conf, [flat], [torch.tensor([1, 2])])
    terms.total.backward()
    assert torch.isfinite(terms.total) and torch.isfinite(loc.grad).all()


def test_image_without_objects_contributes_no_negatives():
    gt = [_prior_xyxy(3), torch.zeros(0, 4)]
    labels = [torch.tensor([1]), torch.zeros(0, dtype=torch.int64)]
    conf = torch.zeros(2, 8, 2)
    conf[1] = 50.0  # confident mistakes everywhere in the empty image: not mined (paper: 3 x 0)
    terms = MultiBoxLoss(PRIORS)(torch.zeros(2, 8, 4), conf, gt, labels)
    assert terms.conf.item() == pytest_approx(4 * math.log(2))


def test_encoded_targets_are_what_the_positive_is_trained_towards():
    gt = torch.tensor([[0.2, 0.42, 0.31, 0.6]])
    target = encode_boxes(gt, PRIORS[2:3])
    loc = torch.zeros(1, 8, 4)
    loc[0, 2] = target[0]
    # IoU of gt with prior 2 is the best (forced match), so the loc loss at the target is 0.
    terms = MultiBoxLoss(PRIORS)(loc, torch.zeros(1, 8, 2), [gt], [torch.tensor([1])])
    assert terms.loc.item() == 0.0 and terms.num_positives == 1
