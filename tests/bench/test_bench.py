"""``python -m bench --quick`` (bench/__main__.py) runs end to end and writes a complete JSON
report; only its structure and that every figure is positive are checked, never a time."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import JPEGS


def _numbers(value: object) -> list[float]:
    if isinstance(value, dict):
        return [n for item in value.values() for n in _numbers(item)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


def test_quick_bench_writes_a_complete_report(tmp_path: Path) -> None:
    if not JPEGS.is_dir():
        pytest.skip(f"the benchmark's real photos are missing: {JPEGS}")
    out = tmp_path / "report.json"
    command = [sys.executable, "-m", "bench", "--quick", "--width", "0.125", "--threads", "1"]
    # The timeout only stops a hang: the quick bench takes well under a minute on a quiet machine.
    subprocess.run([*command, "--out", str(out)], check=True, timeout=600)
    report = json.loads(out.read_text())
    assert {"machine", "model", "command", "date", "auto_choice"} <= set(report)
    assert report["machine"]["torch"] and report["machine"]["cpu_model"]
    assert set(report["torchvision"]) == {"1"}
    assert set(report["detector"]) == {"fp32", "bf16", "int8", "auto"}
    load = {"images_per_s", "p50_ms", "p95_ms", "p99_ms", "requests"}
    assert set(report["service"]["1"]) == load
    # ONNX Runtime beside torch: the exported graph in fp32 and in int8, bare and served
    assert set(report["onnxruntime"]) == {"fp32", "int8"}
    assert all(set(rates) == {"1"} for rates in report["onnxruntime"].values())
    assert set(report["onnxruntime_service"]) == {"fp32", "int8"}
    assert all(set(rows["1"]) == load for rows in report["onnxruntime_service"].values())
    assert set(report["ratios"]) == {
        "detector_auto/torchvision@batch1",
        "detector_auto/fastest_forced@batch1",
        "service@1/detector_auto@batch1",
        "onnxruntime_fp32/detector_fp32@batch1",
        "onnxruntime_int8/detector_int8@batch1",
        "service_onnxruntime_fp32@1/service@1",
        "service_onnxruntime_int8@1/service@1",
    }
    figures = [report[key] for key in ("torchvision", "detector", "service", "ratios")]
    figures += [report["onnxruntime"], report["onnxruntime_service"]]
    numbers = [n for part in figures for n in _numbers(part)]
    assert numbers and all(n > 0 for n in numbers)
