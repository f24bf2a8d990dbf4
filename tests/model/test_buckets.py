"""Bucketed batch sizes: the bucket a batch runs at, the zero padding, and the promise that
padding never changes the real images' detections."""

import pytest
import torch

from model import Detector, ssd300_vgg16
from model.buckets import BUCKETS, bucket_buffer, bucket_for, check_buckets, fill_padded, pad_to


def test_the_smallest_bucket_that_holds_the_batch():
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 8, 9, 33, 64)] == [1, 2, 4, 4, 8, 8, 16, 64, 64]
    assert bucket_for(65) is None  # above the largest: run unbucketed
    assert bucket_for(5, (3, 6)) == 6
    with pytest.raises(ValueError, match="at least 1 image, got 0"):
        bucket_for(0)


def test_buckets_must_increase_from_one_up():
    assert check_buckets([1, 2, 4]) == (1, 2, 4)
    assert check_buckets(BUCKETS) == BUCKETS
    for bad in ([], [0, 1], [2, 2], [4, 2]):
        with pytest.raises(ValueError, match="increasing sizes >= 1"):
            check_buckets(bad)


def test_padding_appends_zero_images_and_keeps_the_layout():
    batch = torch.randn(3, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    padded = pad_to(batch, 4)
    assert padded.shape == (4, 3, 5, 5) and padded.dtype == batch.dtype
    assert padded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded[:3], batch) and not padded[3].any()
    assert pad_to(torch.ones(2, 3, 5, 5), 2).is_contiguous()  # the default layout stays


def test_a_refilled_buffer_keeps_its_storage_and_clears_old_rows():
    buffer = bucket_buffer(torch.zeros(1, 3, 4, 4), 4)
    address = buffer.data_ptr()
    fill_padded(buffer, torch.ones(4, 3, 4, 4))
    fill_padded(buffer, torch.full((2, 3, 4, 4), 7.0))  # a smaller batch after a larger one
    assert buffer.data_ptr() == address
    assert (buffer[:2] == 7).all() and not buffer[2:].any()
    with pytest.raises(ValueError, match=r"\(5, 3, 4, 4\) does not fit .* \(4, 3, 4, 4\)"):
        fill_padded(buffer, torch.zeros(5, 3, 4, 4))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_padding_leaves_the_real_images_detections_unchanged(batch_norm):
    # Every layer works per image in eval mode (BatchNorm too, with its running statistics),
    # so the three real images come out the same whether one or five zero images follow.
    torch.manual_seed(0)
    network = ssd300_vgg16(3, batch_norm=batch_norm, width=0.125).eval()
    for head in network.conf_heads:  # confident enough that some boxes pass the threshold
        head.bias.data.view(-1, 3)[:, 1] = 2.0  # (A*C,) -> (A, C)
    detector = Detector(network, ["a", "b"])
    batch = torch.rand(3, 3, 300, 300) * 255 - 120
    sizes = [(640, 480), (300, 300), (77, 901)]
    plain = detector.decode(*detector._eager_forward(batch), sizes, 0.2)
    for size in (4, 8):
        loc, conf = detector._eager_forward(pad_to(batch, size))
        # (B, A, 4), (B, A, K) -> (3, A, 4), (3, A, K): the padding rows are cut away.
        padded = detector.decode(loc[:3], conf[:3], sizes, 0.2)
        assert sum(len(d.labels) for d in plain) > 0
        for ours, theirs in zip(padded, plain, strict=True):
            assert ours.labels == theirs.labels
            torch.testing.assert_close(ours.boxes, theirs.boxes, rtol=0, atol=1e-3)
            torch.testing.assert_close(ours.scores, theirs.scores, rtol=0, atol=1e-5)
