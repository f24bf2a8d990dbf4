"""The captured forward per bucket, checked on the CPU: capture is injected, so a stand-in with
a CUDA graph's contract (static input and outputs, replay recomputes in place) runs the
bucketing, padding and output copying, and a failing one runs the fallback to eager. On a GPU
(marked ``gpu``) real graphs are captured for every bucket and compared with eager passes."""

import logging

import pytest
import torch

from model import Detector, ssd300_vgg16
from model.buckets import BUCKETS, pad_to
from model.cuda_graphs import BucketedForward


@pytest.fixture(scope="module")
def detector() -> Detector:
    torch.manual_seed(0)
    return Detector(ssd300_vgg16(3, width=0.125).eval(), ["a", "b"])


def _batch(count: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    batch = torch.rand(count, 3, 300, 300, generator=generator) * 255 - 120
    return batch.contiguous(memory_format=torch.channels_last)  # the CPU runtime's layout


class ReplayLike:
    """A stand-in for ``capture_cuda_graph``: runs ``forward`` once to make static outputs,
    and each replay writes ``forward(static_input)`` into them, as a graph replay would."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def __call__(self, forward, static_input):
        self.inputs.append(static_input)
        outputs = forward(static_input)

        def replay() -> None:
            for static, fresh in zip(outputs, forward(static_input), strict=True):
                static.copy_(fresh)

        return replay, outputs


def test_on_the_cpu_the_detector_runs_eagerly_and_exactly(detector):
    assert not detector._forward.capturing
    batch = _batch(3)
    with torch.inference_mode():
        loc, conf = detector.network(batch)
    ours = detector.forward(batch)
    assert torch.equal(ours[0], loc) and torch.equal(ours[1], conf)
    assert detector._forward.captured == ()


def test_a_captured_bucket_gives_the_eager_outputs_for_the_real_rows(detector):
    capture = ReplayLike()
    forward = BucketedForward(detector._eager_forward, capture)
    with torch.inference_mode():
        eager = detector._eager_forward(_batch(3))
        first = forward(_batch(3))
        second = forward(_batch(2, seed=2))  # same bucket (4): replayed, not captured again
    assert forward.captured == (2, 4)  # 3 -> 4, 2 -> 2
    assert first[0].shape[0] == 3 and second[0].shape[0] == 2
    torch.testing.assert_close(first, eager, rtol=0, atol=1e-5)
    # The first result is a copy: a later replay of the bucket did not overwrite it.
    with torch.inference_mode():
        forward(_batch(3, seed=3))
    torch.testing.assert_close(first, eager, rtol=0, atol=1e-5)
    static = capture.inputs[0]
    assert static.shape == (4, 3, 300, 300)
    assert static.is_contiguous(memory_format=torch.channels_last)
    assert not static[3].any()  # the padding image is zeros


def test_batches_above_the_largest_bucket_run_eagerly(detector):
    capture = ReplayLike()
    forward = BucketedForward(detector._eager_forward, capture, buckets=(1, 2))
    with torch.inference_mode():
        loc, _ = forward(_batch(3))
    assert loc.shape[0] == 3 and forward.captured == () and capture.inputs == []


def test_a_failed_capture_is_logged_once_and_eager_takes_over(detector, caplog):
    calls = []

    def refuse(forward, static_input):
        calls.append(static_input.shape[0])
        raise RuntimeError("operation not permitted when stream is capturing")

    forward = BucketedForward(detector._eager_forward, refuse)
    with caplog.at_level(logging.WARNING, logger="model.cuda_graphs"), torch.inference_mode():
        results = [forward(_batch(count)) for count in (3, 1, 3)]
        eager = detector._eager_forward(_batch(3))
    assert calls == [4]  # one attempt; no retry at this or another bucket
    assert not forward.capturing and forward.captured == ()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "batch of 4" in warnings[0] and "stream is capturing" in warnings[0]
    assert torch.equal(results[0][1], eager[1]) and torch.equal(results[2][1], eager[1])
    assert results[1][0].shape[0] == 1


def test_warm_up_captures_every_bucket_up_to_the_batch_size(detector, monkeypatch):
    # On a GPU warm-up captures the buckets the service's batches can reach; here a stand-in
    # capture shows which bucket sizes it runs.
    monkeypatch.setattr(
        detector, "_forward", BucketedForward(detector._eager_forward, ReplayLike())
    )
    detector.warm_up(max_batch_size=3)
    assert detector._forward.captured == (1, 2, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_on_a_gpu_every_bucket_is_captured_and_replays_the_eager_outputs(precision):
    torch.manual_seed(0)
    network = ssd300_vgg16(3, width=0.5, batch_norm=True).eval()
    detector = Detector(network, ["a", "b"], device="cuda", precision=precision)
    detector.warm_up(max_batch_size=BUCKETS[-1])
    # A failed capture would fall back to eager with a warning: here it must not.
    assert detector._forward.capturing and detector._forward.captured == BUCKETS
    for bucket in BUCKETS:
        for count in sorted({bucket, max(1, bucket - 1)}):  # a full bucket and a padded one
            batch = detector.runtime.inputs(_batch(count, seed=bucket))
            with torch.inference_mode():
                graph = detector.forward(batch)
                # Eager on the same padded shape runs the same kernels as the replay, so the
                # two agree up to the order of floating-point sums (cuDNN may split them).
                loc, conf = detector._eager_forward(pad_to(batch, bucket))
            torch.testing.assert_close(graph, (loc[:count], conf[:count]), rtol=1e-3, atol=1e-3)
    assert detector._forward.captured == BUCKETS  # replays only, nothing captured again
