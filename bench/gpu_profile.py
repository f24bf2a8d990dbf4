"""Where a GPU batch's time goes, for ``python -m bench.gpu``: the evidence behind its figures.

(batch) ``Detector.run_batch`` as the service calls it, prepared images on the CPU, per batch
size: the seconds of its two parts (stack + copy to the device + forward pass; box decoding +
NMS + the cut) and images/s of the whole.
(graphs) the network's forward pass captured in a CUDA graph and replayed, per precision and
batch size, beside the eager figures of ``bench.gpu.network_rates``: whether launch overhead is
worth hiding (docs/gpu-path.md says why the graph machinery was removed and where it is kept).
(profile) ``torch.profiler`` tables of one ``run_batch`` and one AMP training step: the
operations that take the most device and host time.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from model import Detector
from model.data.synthetic import CLASS_NAMES
from model.inference.autotune import NOISE_STD
from model.network.postprocess import Cut
from model.network.ssd import SSD

# The service's default cut (app/settings.py: score threshold 0.3, at most 100 detections).
SERVICE_CUT = Cut(score_threshold=0.3, max_detections=100)
PROFILE_ROWS = 15  # operations per profile table


def _detector(network: SSD, device: str, precision: str) -> Detector:
    return Detector(copy.deepcopy(network), CLASS_NAMES, device=device, precision=precision)


def _prepared(count: int, side: int) -> list[torch.Tensor]:
    """``count`` noise images as ``Detector.prepare`` leaves them: float32 [3, S, S] on the
    CPU."""
    generator = torch.Generator().manual_seed(0)
    return list(NOISE_STD * torch.randn(count, 3, side, side, generator=generator))


def batch_split(
    network: SSD, device: str, precision: str, batches: tuple[int, ...], repeats: int
) -> dict[int, dict[str, float]]:
    """Per batch size, the median seconds of ``run_batch``'s forward part and post-processing
    part and the images/s of the two together, prepared inputs starting on the CPU."""
    detector = _detector(network, device, precision)
    results = {}
    for size in batches:
        inputs = _prepared(size, network.input_size)
        frames = [(640, 480)] * size
        cuts = [SERVICE_CUT] * size
        for _ in range(2):  # cuDNN's first-call set-up for this shape
            detector.run_batch(inputs, frames, cuts)
        runs = [detector.run_batch(inputs, frames, cuts) for _ in range(repeats)]
        forward = statistics.median(run.forward_s for run in runs)
        post = statistics.median(run.postprocess_s for run in runs)
        detections = statistics.median(
            sum(len(found) for found in run.detections) / size for run in runs
        )
        results[size] = {
            "forward_s": forward,
            "postprocess_s": post,
            "images_per_s": size / (forward + post),
            "detections_per_image": detections,
        }
    return results


def graph_rates(
    network: SSD,
    precisions: tuple[str, ...],
    batches: tuple[int, ...],
    timed: Callable[[Callable[[], object], int], float],
) -> dict[str, dict[int, float]]:
    """Images/s of the forward pass replayed from a CUDA graph, per precision and batch size,
    inputs already on the GPU (as ``bench.gpu.network_rates`` times the eager pass).
    ``timed(run, images)`` gives the images/s of ``run``."""
    rates: dict[str, dict[int, float]] = {}
    for precision in precisions:
        detector = _detector(network, "cuda", precision)
        runtime = detector.runtime
        # Autocast's cast cache would hold casts made during capture that the graph then
        # replays stale; PyTorch's CUDA-graph notes say to capture with it off.
        cast = (
            torch.autocast("cuda", dtype=runtime.dtype, cache_enabled=False)
            if precision != "fp32"
            else contextlib.nullcontext()
        )
        rates[precision] = {}
        for size in batches:
            static = runtime.inputs(torch.stack(_prepared(size, network.input_size)))
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.inference_mode(), torch.cuda.stream(side), cast:
                for _ in range(3):  # warm-up on a side stream, as capture requires
                    detector.network(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph), cast:
                detector.network(static)
            rates[precision][size] = timed(graph.replay, size)
            del graph, static
        del detector
        torch.cuda.empty_cache()
    return rates


def profile_tables(
    network: SSD, device: str, precision: str, batch: int, train_step: Callable[[], object]
) -> dict[str, str]:
    """``torch.profiler`` tables (the ``PROFILE_ROWS`` costliest operations by device time, and
    by host time) of three ``run_batch`` calls at ``batch`` and of three ``train_step()``
    calls, after warm-up."""
    detector = _detector(network, device, precision)
    inputs = _prepared(batch, network.input_size)
    frames, cuts = [(640, 480)] * batch, [SERVICE_CUT] * batch
    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    device_key = "self_cuda_time_total" if len(activities) == 2 else "self_cpu_time_total"
    tables = {}
    for name, work in {
        f"run_batch {precision} batch {batch}": lambda: detector.run_batch(inputs, frames, cuts),
        "train_step": train_step,
    }.items():
        for _ in range(2):
            work()
        started = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(3):
                work()
            if device_key == "self_cuda_time_total":
                torch.cuda.synchronize()
        wall = (time.perf_counter() - started) / 3
        averages = prof.key_averages()
        tables[name] = (
            f"{name}: {wall * 1000:.1f} ms per call under the profiler\n"
            + averages.table(sort_by=device_key, row_limit=PROFILE_ROWS)
            + "\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS)
        )
    return tables
