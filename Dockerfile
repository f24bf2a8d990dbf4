# The detector service: one uvicorn process (python -m app) serving the shipped model on :8000.
# One image for CPU-only hosts and NVIDIA GPUs: the registry's torch build carries CUDA, and
# SSD_DEVICE=auto picks the GPU when the NVIDIA container runtime exposes one.
# README.md, "Deploying", tells how to build, run, swap the weights and scale out.

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

# ---- runtime: Debian's python3, the environment, the code and the shipped weights -----------
FROM debian:bookworm-slim

# The environment's interpreter is a link to this python3 (the same Debian package as above).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ssd

COPY --from=build /opt/venv /opt/venv
WORKDIR /srv/ssd
COPY app/ app/
COPY model/ model/
# The shipped model, baked in. Another one: mount the file and point SSD_WEIGHTS at it.
COPY weights/*.safetensors weights/
# Compiled once here, since the service user cannot write next to the sources. torch's cache,
# where SSD_WEIGHTS=torchvision:coco is fetched at the first start, belongs to the service
# user, so that a named volume mounted there starts out writable by it (docker-compose.yml).
RUN /opt/venv/bin/python -m compileall -q app model \
    && mkdir -p /var/cache/torch && chown 10001:10001 /var/cache/torch

ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    TORCH_HOME=/var/cache/torch
# By number, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
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
