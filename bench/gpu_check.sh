#!/usr/bin/env bash
# Issue #27's GPU check in one call: what the machine is, the GPU-marked tests, and the figures
# of `python -m bench.gpu`, all written under $OUT (a folder; ./gpu-check-out when unset).
#
# Run from the repository root on the device machine, after `make gpu-wheels` here (it fills the
# git-ignored .gpu-wheels/ with the packages that machine lacks, about 5 MiB), as:
#
#   run(command="bash bench/gpu_check.sh", carry=[".gpu-wheels"], timeout_s=600)
#
# Stages, each under its own time limit so that one hang cannot eat the call, and each run
# whatever the one before it did (their exit statuses are in $OUT/stages.txt):
#   1. the device, the driver (nvidia-smi), python, torch, CUDA and cuDNN versions   (60 s)
#   2. the carried wheels installed offline into /tmp/site (PYTHONPATH), leaving the
#      machine's own torch and torchvision alone                                        (120 s)
#   3. pytest -m gpu: the GPU-marked tests                                              (180 s)
#   4. python -m bench.gpu: the figures, as $OUT/gpu.json and a table                   (300 s)
# The limits add up to 11 minutes, but the stages take far less each (see bench/gpu.py's
# sizes); the call's own 600 s is the final stop.
#
# GPU_CHECK_DRY_RUN=1 runs the same plumbing on a machine without a GPU: no wheels, no
# nvidia-smi, the tests collected but skipped, and `python -m bench.gpu --dry-run`
# (tests/bench/test_gpu.py runs it so). GPU_CHECK_TESTS names the test paths (default: tests).

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
: >"$OUT/stages.txt"

# stage NAME SECONDS FUNCTION: run FUNCTION (below) under `timeout` in a bash of its own, its
# output also to $OUT/NAME.log, and record its exit status (124: it ran out of time) without
# stopping the script.
stage() {
    local name=$1 seconds=$2 function=$3
    echo "=== $name (at most ${seconds} s)"
    local started=$SECONDS
    timeout --kill-after=10 "$seconds" bash -c "$function" 2>&1 | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    echo "$name exit=$status seconds=$((SECONDS - started))" | tee -a "$OUT/stages.txt"
}

describe() {
    if [ "$DRY_RUN" = 1 ]; then
        echo "dry run: no nvidia-smi"
    else
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    fi
    "$PYTHON" - <<'EOF'
import platform, torch, torchvision
print("python", platform.python_version(), "torch", torch.__version__,
      "torchvision", torchvision.__version__)
print("cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF
}

install_wheels() {
    if [ "$DRY_RUN" = 1 ]; then
        echo "dry run: the wheels are not installed"
        return 0
    fi
    # --no-deps: exactly the carried wheels (make gpu-wheels names every one that is missing);
    # --target: a folder of its own, so nothing of the machine's python3 is replaced.
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu-wheels/*.whl &&
        "$PYTHON" -c 'import fastapi, pydantic_settings, uvicorn, pycocotools, multipart
print("service packages import: fastapi", fastapi.__version__, "uvicorn", uvicorn.__version__)'
}

gpu_tests() {
    # -m gpu replaces pyproject's `-m 'not deploy and not gpu'`; -p no:cacheprovider writes no
    # .pytest_cache into the tree.
    # The files that hold GPU tests (by default): collecting the whole suite would import the
    # dev-only client libraries other tests use (deepstack, schemathesis...), which the GPU
    # machine lacks and the wheels do not carry.
    # shellcheck disable=SC2086  # GPU_CHECK_TESTS may name several paths
    "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" \
        ${GPU_CHECK_TESTS:-$(grep -rl --include='test_*.py' 'pytest.mark.gpu' tests)}
}

figures() {
    if [ "$DRY_RUN" = 1 ]; then
        "$PYTHON" -m bench.gpu --dry-run --out "$OUT/gpu.json" ${GPU_CHECK_PARTS:+--parts "$GPU_CHECK_PARTS"}
    else
        # GPU_CHECK_PARTS: a comma-separated list of bench.gpu's parts (default: all).
        "$PYTHON" -m bench.gpu --out "$OUT/gpu.json" ${GPU_CHECK_PARTS:+--parts "$GPU_CHECK_PARTS"}
    fi
}

export OUT DRY_RUN PYTHON
export -f describe install_wheels gpu_tests figures
stage describe 60 describe
stage wheels 120 install_wheels
stage tests 180 gpu_tests
stage figures 300 figures
echo "=== stages"
cat "$OUT/stages.txt"
