"""SSD300 forward pass on the CPU: fp32 channels_last against INT8 (``model.inference.int8``).

Times the full-width network (random weights) and the shipped width-0.25 model, batch
``--batch``, in interleaved rounds, and prints the median ms/image and each candidate's speed
relative to fp32 measured in the same rounds. With ``--onnxruntime`` it adds ONNX Runtime on
the exported raw graph (``model.export``, the bare network): fp32, and the static INT8 of
``model.inference.onnx_int8`` calibrated on the same images. With ``--openvino`` (needs the
``openvino`` and ``nncf`` packages, not project dependencies) it adds OpenVINO fp32 and its
NNCF INT8, for comparison. Never fails on a time.

    .venv/bin/python -m bench.int8 [--batch 8] [--rounds 5] [--onnxruntime] [--openvino]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model import ssd300_vgg16
from model.data.synthetic import SyntheticShapes
from model.evaluation.int8_guard import quantize_network
from model.network.preprocessing import preprocess
from model.network.ssd import SSD
from model.weights.checkpoint import load_checkpoint

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "ssd300_shapes.safetensors"
CALIBRATION_IMAGES = 16


def _candidates(
    network: SSD, x: torch.Tensor, openvino: bool, onnxruntime: bool, folder: Path
) -> dict[str, Callable[[], object]]:
    """Name -> a call that runs one forward pass of ``x`` (Tensor[N, 3, 300, 300]); ONNX
    files go to ``folder``."""
    data = SyntheticShapes(CALIBRATION_IMAGES, split="train")
    images = preprocess([data[i][0] for i in range(len(data))], 300)
    start = time.perf_counter()
    int8 = quantize_network(network, images.split(x.shape[0]))
    print(f"  calibrate + convert: {time.perf_counter() - start:.1f} s")
    fp32 = network.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    calls: dict[str, Callable[[], object]] = {
        "fp32 channels_last": lambda: fp32(x_cl),
        "int8 torch.ao x86": lambda: int8(x_cl),
    }
    if onnxruntime:
        calls.update(_onnxruntime(network, x, data, folder))
    if openvino:
        import nncf
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
        config["INFERENCE_PRECISION_HINT"] = "f32"  # else OpenVINO picks bf16 on AVX-512 BF16
        model = ov.convert_model(network, example_input=x)
        start = time.perf_counter()
        quantized = nncf.quantize(model, nncf.Dataset([b.numpy() for b in images.split(8)]))
        print(f"  nncf.quantize: {time.perf_counter() - start:.1f} s")
        ov_fp32 = core.compile_model(model, "CPU", config)
        ov_int8 = core.compile_model(quantized, "CPU", config)
        x_np = x.numpy()
        calls["openvino fp32"] = lambda: ov_fp32(x_np)
        calls["openvino int8 (nncf)"] = lambda: ov_int8(x_np)
    return calls


def _onnxruntime(
    network: SSD, x: torch.Tensor, data: SyntheticShapes, folder: Path
) -> dict[str, Callable[[], object]]:
    """ONNX Runtime fp32 and static INT8 on the network's raw graph, as many threads as
    torch uses."""
    import onnxruntime as ort
    from PIL import Image

    from model import Detector
    from model.export import export_onnx
    from model.inference.onnx_int8 import quantize_onnx

    detector = Detector(network, [f"class{i}" for i in range(1, network.num_classes)])
    fp32 = export_onnx(detector, folder / f"{id(network)}.onnx", graph="raw")
    images = (Image.fromarray(data[i][0].permute(1, 2, 0).numpy()) for i in range(len(data)))
    start = time.perf_counter()
    int8 = quantize_onnx(fp32, images)
    print(f"  onnx_int8 calibrate + quantize: {time.perf_counter() - start:.1f} s")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    calls: dict[str, Callable[[], object]] = {}
    x_np = x.numpy()
    for name, path in (("onnxruntime fp32", fp32), ("onnxruntime int8 (QDQ)", int8)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        calls[name] = lambda session=session: session.run(None, {"images": x_np})
    return calls


def _time(calls: dict[str, Callable[[], object]], rounds: int, batch: int) -> None:
    """Interleave the calls for ``rounds`` rounds after one warm-up each; print medians."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for call in calls.values():
            call()
        for _ in range(rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["fp32 channels_last"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:22s} {median / batch * 1000:7.1f} ms/image  {base / median:5.2f}x fp32")


def main() -> None:
    """Time fp32 and INT8 on both network widths; print ms/image and ratios to fp32."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--openvino", action="store_true", help="add OpenVINO fp32 and INT8")
    parser.add_argument(
        "--onnxruntime", action="store_true", help="add ONNX Runtime fp32 and static INT8"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    networks = {"full width (random weights)": ssd300_vgg16(21).eval()}
    if SHIPPED.exists():
        networks["shipped width 0.25"] = load_checkpoint(SHIPPED).network.float().eval()
    x = torch.randn(args.batch, 3, 300, 300) * 58  # the 0-255 scale minus the mean
    print(f"SSD300, batch {args.batch}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as folder:
        for name, network in networks.items():
            print(name)
            calls = _candidates(network, x, args.openvino, args.onnxruntime, Path(folder))
            _time(calls, args.rounds, args.batch)


if __name__ == "__main__":
    main()
