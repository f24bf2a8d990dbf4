"""``bench/gpu_check.sh`` in its dry run (GPU_CHECK_DRY_RUN=1: no wheels, no nvidia-smi, the
GPU tests skipped, ``python -m bench.gpu --dry-run`` on the CPU) runs every stage and writes a
complete JSON report; only its structure and that every figure is positive are checked, never
a time."""

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.gpu import DRY_RUN, TARGETS
from tests.bench.test_bench import _numbers

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"


def test_the_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_the_dry_run_runs_every_stage_and_writes_a_complete_report(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "GPU_CHECK_DRY_RUN": "1",
        "PYTHON": sys.executable,
    }
    # The timeout only stops a hang: the dry run takes well under a minute on a quiet machine.
    subprocess.run(["bash", str(SCRIPT)], env=env, check=True, timeout=600)
    stages = (tmp_path / "stages.txt").read_text().splitlines()
    assert [line.split()[:2] for line in stages] == [
        [name, "exit=0"] for name in ("describe", "wheels", "tests", "figures")
    ]
    # The default selection: the files that hold GPU tests, all skipped here. (The first run on
    # a GPU collected all of tests/ and stopped at modules importing dev-only client libraries.)
    tests_log = (tmp_path / "tests.log").read_text()
    assert "needs a CUDA GPU" in tests_log and "error" not in tests_log.lower()
    for holder in ("test_detector.py", "test_precision_accuracy.py"):
        assert holder in tests_log
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["errors"] == {} and report["targets"] == TARGETS
    assert report["sizes"]["device"] == "cpu" and report["machine"]["torch"]
    batches = {str(size) for size in DRY_RUN.batches}
    assert set(report["network"]["ours"]) == set(DRY_RUN.precisions)
    assert set(report["network"]["torchvision"]) == set(DRY_RUN.precisions)
    for rates in [*report["network"]["ours"].values(), *report["network"]["torchvision"].values()]:
        assert set(rates) == batches
    assert set(report["service"]) == {str(clients) for clients in DRY_RUN.clients}
    for row in report["service"].values():
        assert set(row) == {"images_per_s", "p50_ms", "p95_ms", "p99_ms", "requests", "stages_ms"}
        stages = set(row["stages_ms"])
        assert stages == {"decode", "queue", "inference", "postprocess", "mean_batch"}
    assert set(report["training"]) == set(DRY_RUN.precisions)
    assert set(report["batch"]) == batches
    assert "graphs" not in report  # CUDA graphs: on a GPU only
    assert set(TARGETS) <= set(report["best"])
    profiles = (tmp_path / "gpu.profile.txt").read_text()
    assert "run_batch bf16 batch 2" in profiles and "train_step" in profiles
    assert "aten::conv2d" in profiles
    figures = [report["network"], report["service"], report["training"], report["batch"]]
    numbers = [n for part in figures for n in _numbers(part)]
    numbers += [value for value in report["best"].values() if not isinstance(value, str)]
    assert numbers and all(n > 0 for n in numbers)
