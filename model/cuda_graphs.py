"""A forward pass captured as one CUDA graph per bucketed batch size, eager where it cannot be.

A CUDA graph records the kernels of one forward pass once and replays them with a single
launch, which removes the per-layer launch cost that dominates small batches on a fast GPU.
A graph replays fixed shapes at fixed addresses, so each bucket (``model.buckets``) gets its
own capture, made the first time a batch of that bucket runs (or at warm-up), with a static
input buffer the batch is copied into and static outputs that are copied out after replay.

Capture is injected (``capture=``): ``capture_cuda_graph`` on a GPU, None for eager, or a
stand-in in tests, so the bucketing, padding and fallback logic runs on a CPU too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from model.buckets import BUCKETS, bucket_buffer, bucket_for, check_buckets, fill_padded

log = logging.getLogger("model.cuda_graphs")

Outputs = tuple[Tensor, Tensor]
Forward = Callable[[Tensor], Outputs]
# capture(forward, static_input) -> (replay, static_outputs): after replay(), static_outputs
# hold forward(static_input) for whatever static_input holds at that moment.
Capture = Callable[[Forward, Tensor], tuple[Callable[[], None], Outputs]]

# Eager passes before capture, on the capture stream: the first runs pick cuDNN algorithms and
# create library handles, which must not happen inside a capture. The PyTorch CUDA-graph docs'
# whole-network example warms up for 3 iterations; 3 here too.
WARMUP_PASSES = 3


def capture_cuda_graph(
    forward: Forward, static_input: Tensor
) -> tuple[Callable[[], None], Outputs]:
    """Capture ``forward(static_input)`` (a CUDA tensor) as a ``torch.cuda.CUDAGraph``.

    Warm-up and capture run on one side stream, as ``torch.cuda.graph``'s documentation asks
    (warm-up on the stream that then captures, so per-stream library handles exist before the
    capture). ``thread_local`` capture mode lets other threads (image decoding) keep working
    while this one captures. Each graph keeps its own memory pool: the buckets' graphs replay
    in any order, which a shared pool does not allow.

    Returns:
        ``graph.replay`` and the static (loc, conf) the replays write into.
    """
    device = static_input.device
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_PASSES):
            forward(static_input)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        static_outputs = forward(static_input)
    return graph.replay, static_outputs


class BucketedForward:
    """Runs ``forward`` on a batch through a captured graph of its bucket when ``capture`` is
    given, else eagerly.

    Args:
        forward: the eager pass, Tensor[N, 3, S, S] on the device -> (loc, conf), computing
            nothing that depends on N other than per-image rows (true of SSD in eval mode).
        capture: makes a replayable pass for a static input (``capture_cuda_graph`` on a GPU);
            None runs every batch eagerly and unpadded (the CPU, where padding only costs).
        buckets: increasing batch sizes to capture; larger batches run eagerly.

    The first failed capture is logged once with its reason, and from then on every batch runs
    eagerly: a network that cannot be captured at one size will not be at another.
    """

    def __init__(
        self, forward: Forward, capture: Capture | None, buckets: Sequence[int] = BUCKETS
    ) -> None:
        self.forward = forward
        self.capture = capture
        self.buckets = check_buckets(buckets)
        self._replays: dict[int, tuple[Tensor, Callable[[], None], Outputs]] = {}

    @property
    def capturing(self) -> bool:
        """Whether batches run through captured graphs (False: eager, by choice or failure)."""
        return self.capture is not None

    @property
    def captured(self) -> tuple[int, ...]:
        """The bucket sizes captured so far, increasing."""
        return tuple(sorted(self._replays))

    def __call__(self, batch: Tensor) -> Outputs:
        """(loc, conf) for ``batch`` Tensor[N, 3, S, S], N rows each, equal to
        ``forward(batch)``; fresh tensors the next call does not overwrite."""
        size = bucket_for(batch.shape[0], self.buckets)
        if self.capture is None or size is None:
            return self.forward(batch)
        replay = self._replays.get(size) or self._capture(size, batch)
        if replay is None:
            return self.forward(batch)
        static_input, run, (loc, conf) = replay
        fill_padded(static_input, batch)
        run()
        count = batch.shape[0]
        # (B, A, 4), (B, A, K) -> (N, A, 4), (N, A, K); cloned, since the next replay of this
        # bucket overwrites the static outputs.
        return loc[:count].clone(), conf[:count].clone()

    def _capture(
        self, size: int, batch: Tensor
    ) -> tuple[Tensor, Callable[[], None], Outputs] | None:
        """Capture the bucket ``size`` with a static input shaped and laid out like ``batch``;
        None (and eager from now on) when capture fails."""
        assert self.capture is not None
        static_input = bucket_buffer(batch, size)
        try:
            run, outputs = self.capture(self.forward, static_input)
        except Exception as exc:  # torch raises RuntimeError, and others from inside forward
            log.warning(
                "could not capture the forward pass for a batch of %d (%r); running eagerly "
                "from now on",
                size,
                exc,
            )
            self.capture = None
            self._replays.clear()
            return None
        self._replays[size] = (static_input, run, outputs)
        log.info("captured the forward pass for batches of up to %d images", size)
        return self._replays[size]
