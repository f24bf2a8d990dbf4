# The detector service: one uvicorn process (python -m app) serving the shipped model on :8000.
# Two images from this file, with the same settings, probes, user, healthcheck and drain:
# - the default target (`docker build .`, the last stage): torch from the registry, which
#   carries CUDA, so one image serves CPU-only hosts and NVIDIA GPUs (SSD_DEVICE=auto picks the
#   GPU when the NVIDIA container runtime exposes one);
# - `docker build --target cpu .`: no torch and no CUDA, the shipped model exported to ONNX and
#   served by ONNX Runtime on the CPU (SSD_BACKEND=onnxruntime), a fraction of the size.
# README.md, "Deploying", tells which to pick, how to build, run, swap the weights and scale out.
# Stages the default target does not use are built too by the classic builder (Debian's
# docker.io 20.10); they are small, and the cpu target then finds them in the cache.

# ---- build: the virtual environment, from the lock file -------------------------------------
FROM debian:bookworm-slim AS build

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# pip's download cache would only bloat this stage's layer (the wheels are several GB).
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/ssd
# Only the dependency set goes in here, so editing the code does not reinstall several GB.
# The project is installed without its packages (app/ and model/ are not copied yet): that
# installs exactly its pinned dependencies. Its metadata names README.md, whose text does not
# matter here, so an empty one stands in and editing the README does not reinstall either.
COPY pyproject.toml requirements.lock ./
# The same commands as `make install` (Makefile, PIP_INSTALL), for the runtime set: `.` where a
# developer gets `-e ".[dev]"`.
RUN touch README.md \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --quiet --upgrade pip \
    && /opt/venv/bin/python -m pip install --quiet -c requirements.lock .

# ---- onnx: the shipped model exported with the build stage's torch (for the cpu target) ------
FROM build AS onnx
COPY model/ model/
COPY weights/*.safetensors weights/
RUN mkdir /export \
    && /opt/venv/bin/python -m model.export weights/ssd300_shapes.safetensors --format onnx \
        --out /export/ssd300_shapes.onnx

# ---- cpu-build: the cpu target's environment, torch-free, from requirements-cpu.lock --------
FROM debian:bookworm-slim AS cpu-build

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv/ssd
# Every package pinned there, dependencies included (tests/deploy keeps the file a closed
# subset of requirements.lock), so --no-deps; pip check fails the build if one is missing.
# pip and setuptools go afterwards: the service needs neither, and they are about 20 MB of the
# 600 MB this image is meant to stay under (docs/performance.md).
COPY requirements-cpu.lock ./
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --quiet --upgrade pip \
    && /opt/venv/bin/python -m pip install --quiet --no-deps -r requirements-cpu.lock \
    && /opt/venv/bin/python -m pip check \
    && /opt/venv/bin/python -m pip uninstall --quiet --yes pip setuptools

# ---- service: what both images share (Debian's python3, the user, the probes, the command) --
FROM debian:bookworm-slim AS service

# The environment's interpreter is a link to this python3 (the same Debian package as above).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ssd

WORKDIR /srv/ssd
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 8000

# Liveness with the image's own Python (no curl). Uvicorn listens once the model is loaded and
# warmed up; 60 s of start period is many times what that took on 2 cores (docs/performance.md),
# so a slow host gets room before failures count. A check costs one Python start, so one every
# 10 s; urllib gives up (4 s) before Docker's timeout (5 s) kills it, and 3 failures in a row
# (30 s) mark the container unhealthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# Exec form: uvicorn is PID 1 and gets SIGTERM itself, which starts the drain (app/signals.py).
CMD ["/opt/venv/bin/python", "-m", "app", "--host", "0.0.0.0", "--port", "8000"]

# ---- cpu: ONNX Runtime serving the exported shipped model, no torch --------------------------
FROM service AS cpu

COPY --from=cpu-build /opt/venv /opt/venv
COPY app/ app/
COPY model/ model/
# The shipped model, exported above. Another one: export it (python -m model.export), mount the
# .onnx file and point SSD_WEIGHTS at it.
COPY --from=onnx /export/ssd300_shapes.onnx weights/
RUN /opt/venv/bin/python -m compileall -q app model

ENV SSD_BACKEND=onnxruntime SSD_WEIGHTS=weights/ssd300_shapes.onnx
# By number, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# ---- full (the default target): torch, CPU or NVIDIA GPU ------------------------------------
FROM service AS full

COPY --from=build /opt/venv /opt/venv
COPY app/ app/
COPY model/ model/
# The shipped model, baked in. Another one: mount the file and point SSD_WEIGHTS at it.
COPY weights/*.safetensors weights/
# Compiled once here, since the service user cannot write next to the sources. torch's cache,
# where SSD_WEIGHTS=torchvision:coco is fetched at the first start, belongs to the service
# user, so that a named volume mounted there starts out writable by it (docker-compose.yml).
RUN /opt/venv/bin/python -m compileall -q app model \
    && mkdir -p /var/cache/torch && chown 10001:10001 /var/cache/torch

ENV TORCH_HOME=/var/cache/torch
# By number, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
