# Two commands matter: `make run` (serve the shipped model) and `make test` (the whole suite).
# Both set up .venv from the pinned lock file first; `make install` does only that, idempotently.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The one install command, also run by the Dockerfile's build stage (tests/deploy checks that
# the two agree); only the target differs: here the editable project with its dev tools.
PIP_INSTALL := pip install --quiet -c requirements.lock
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install test test-deploy lint run bench gpu-wheels clean

install: $(STAMP)

# Rebuilt only when the dependency set changes. The lock pins every transitive package that CI
# used (torch 2.14.1 + torchvision 0.29.2 from the registry; the machine's local CPU-only torch
# 2.13.0 wheel has no working torchvision).
$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python >= 3.11 is required")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m $(PIP_INSTALL) -e ".[dev]"
	touch $(STAMP)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest

# Builds and runs both container images (full and cpu) with a private Docker engine, compose with
# Prometheus, and checks the Prometheus, Grafana and Kubernetes files (tests/deploy; root; it
# builds a several-GB image, so it is slow: docs/performance.md has its duration).
test-deploy: install
	$(PY) -m pytest -m deploy tests/deploy

# One uvicorn worker: one copy of the model. docs/operations.md, "More processes", for more.
run: install
	$(PY) -m app --host $(HOST) --port $(PORT)

# Issue #12's comparison in one run: torchvision's SSD300, our Detector per precision, the
# service under 1, 8, 16 and 32 clients; prints a table, writes bench/results/<machine>-<date>.json.
bench: install
	$(PY) -m bench

# The packages the GPU machine lacks (it has torch, torchvision, pillow, numpy, httpx, pytest,
# prometheus-client, safetensors, matplotlib, anyio, h11, click, uvloop; see
# bench/gpu_check.sh), at the lock's versions, as wheels for its CPython 3.12 on x86-64 Linux:
# it reaches no registry, so bench/gpu_check.sh installs them from .gpu-wheels/ (git-ignored).
GPU_WHEELS := fastapi starlette pydantic pydantic_core pydantic-settings python-dotenv \
	typing-inspection typing_extensions annotated-types python-multipart uvicorn httptools \
	fastapi-offline pycocotools opentelemetry-api
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64 any

gpu-wheels:
	rm -rf .gpu-wheels
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(addprefix --platform ,$(GPU_PLATFORMS)) --dest .gpu-wheels \
		$$(for name in $(GPU_WHEELS); do grep -i "^$$name==" requirements.lock || \
			{ echo "$$name is not in requirements.lock" >&2; exit 1; }; done)
	du -sh .gpu-wheels

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
