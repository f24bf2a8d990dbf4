"""The images built and run by a real engine: what a client of ``docker run`` gets, from the
full image (torch) and from the cpu image (ONNX Runtime, no torch) alike.

The container runs as the Kubernetes Deployment runs it (read-only root, /tmp writable, no
capabilities, the image's own user), on a user-defined network with its port published on
127.0.0.1. Each test runs once per image; pytest runs all of one image's tests, in file order,
before the other's: the drain test stops the container, the next one starts it again.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from packaging.utils import canonicalize_name
from PIL import Image

from tests.app.support import Server, box_tuple, encode, free_port, iou, metric
from tests.deploy.engine import Engine
from tests.deploy.support import (
    CIRCLE,
    CPU_LOCK_FILE,
    CPU_TARGET,
    FIGURES,
    FULL_TARGET,
    LOCK_FILE,
    MIN_IOU,
    READY_TIMEOUT_S,
    REPO,
    SCENE_SIZE,
    TRIANGLE,
    alert_rules,
    dashboard_exprs,
    healthcheck_of,
    image_instructions,
    metric_names,
    read_pins,
    shapes_scene,
)
from tests.support.matching import assert_same_detections

NETWORK = "ssd-deploy-test"
# A raccoon photo (650x417): not a shape, but the model's answer for it must be exactly what
# the same code gives outside the container.
PHOTO = "raccoon-1.jpg"
# The photos on which the cpu image must answer as the full image does: raccoon photos of
# several sizes, in which the shapes model finds a few things, and the README's scene.
CPU_PHOTOS = ("raccoon-1.jpg", "raccoon-2.jpg", "raccoon-3.jpg", "raccoon-4.jpg", "raccoon-5.jpg")
# The bar for the exported graph against torch (issue #26): boxes within half a pixel.
BOX_TOLERANCE_PX = 0.5
# Scores closer than this may swap places between the runtimes (tests/support/matching.py).
# The API rounds scores to 4 decimals (app/routes/detect.py), so scores that differ by float
# rounding (~1e-7) may come out 1e-4 apart: twice that.
SCORE_TIE = 2e-4
# For the drain test: SIGTERM makes /readyz 503 for this long before the server stops
# listening, which the test uses to see that the signal has arrived.
DRAIN_S = 3
# The body of the request in flight arrives in two halves around SIGTERM, slower than the
# default minimum body rate allows; 1 B/s turns that check off for this container.
MIN_BODY_RATE = 1


@dataclass(frozen=True)
class Running:
    """A started container: the image's Dockerfile target, its name and base URL."""

    target: str
    name: str
    url: str


@pytest.fixture(scope="module", params=[FULL_TARGET, CPU_TARGET])
def container(request: pytest.FixtureRequest, engine: Engine) -> Iterator[Running]:
    """The running container of each image; its cold start (``docker start`` to /readyz 200)
    is reported."""
    target = request.param
    image = request.getfixturevalue("detector_image" if target == FULL_TARGET else "cpu_image")
    engine.docker("network", "create", NETWORK)
    name = f"ssd-deploy-test-{target}"
    try:
        url, seconds = start_container(
            engine, image, name,
            {"SSD_DRAIN_S": str(DRAIN_S), "SSD_MIN_BODY_RATE": str(MIN_BODY_RATE)},
        )  # fmt: skip
        FIGURES[f"{target} image cold start (docker start to /readyz 200)"] = f"{seconds:.1f} s"
        yield Running(target, name, url)
    finally:
        engine.docker("rm", "-f", name)
        engine.docker("network", "rm", NETWORK)


def start_container(
    engine: Engine, image: str, name: str, env: dict[str, str]
) -> tuple[str, float]:
    """Create and start ``image`` as ``name`` on NETWORK, the Deployment's way, with ``env``
    added; returns its base URL once /readyz answers 200, and the seconds that took."""
    port = free_port()
    settings = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    engine.docker(
        "create", "--name", name, "--network", NETWORK,
        "-p", f"127.0.0.1:{port}:8000",
        "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
        *settings, image,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    engine.docker("start", name)
    while httpx_status(url + "/readyz") != 200:
        state = json.loads(engine.docker("inspect", "-f", "{{json .State}}", name).stdout)
        logs = engine.docker("logs", name).stderr
        assert state["Running"], f"{name} exited ({state['ExitCode']}):\n{logs}"
        assert time.monotonic() - start < READY_TIMEOUT_S, f"{name} not ready:\n{logs}"
        time.sleep(0.1)
    return url, time.monotonic() - start


def httpx_status(url: str) -> int | None:
    """The status of GET ``url``, or None if nothing answers."""
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


def test_detects_the_shapes_of_the_readme_example(container: Running) -> None:
    body = encode(shapes_scene(), "JPEG", quality=95)
    response = httpx.post(
        container.url + "/detect",
        content=body,
        headers={"content-type": "image/jpeg"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["image"] == {"width": SCENE_SIZE[0], "height": SCENE_SIZE[1]}
    assert answer["model"]["name"] == "ssd300_shapes"
    best = {}
    for detection in answer["detections"]:
        best.setdefault(detection["label"], detection)  # sorted by score
    for label, drawn in (("circle", CIRCLE), ("triangle", TRIANGLE)):
        assert label in best, answer
        assert best[label]["score"] > 0.9
        assert iou(box_tuple(best[label]), drawn) > MIN_IOU, best[label]


def test_answers_photos_as_its_reference_does(
    request: pytest.FixtureRequest,
    engine: Engine,
    container: Running,
    raccoon: Path,
    tmp_path: Path,
) -> None:
    """Each image against the implementation it must equal:

    - full image: a raccoon photo through ``python -m app`` on this machine (same code, same
      weights, same torch build, same thread count) gives exactly the same detections;
    - cpu image: five raccoon photos and the README's scene through the full image at fp32
      (what the exported graph computes; the full image's ``auto`` may pick bf16 or int8) give
      the same detections in the same order, labels equal and boxes within half a pixel.
    """
    if container.target == FULL_TARGET:
        _answers_as_python_m_app(container, raccoon / "JPEGImages" / PHOTO, tmp_path)
    else:
        full_image = request.getfixturevalue("detector_image")  # built before the cpu image
        _answers_as_the_full_image(engine, container, full_image, raccoon)


def _answers_as_python_m_app(container: Running, photo: Path, tmp_path: Path) -> None:
    data = photo.read_bytes()
    files = {"image": (photo.name, data, "image/jpeg")}
    inside = httpx.post(container.url + "/detect", files=files, timeout=30)
    assert inside.status_code == 200, inside.text
    cores = len(os.sched_getaffinity(0))  # what torch uses in the container too
    local = Server({"SSD_DEVICE": "cpu", "OMP_NUM_THREADS": str(cores)}, tmp_path / "app.log")
    try:
        local.wait_ready()
        outside = httpx.post(local.url + "/detect", files=files, timeout=30)
    finally:
        local.stop()
    assert outside.status_code == 200, outside.text
    with Image.open(photo) as image:
        assert inside.json()["image"] == {"width": image.width, "height": image.height}
    assert inside.json()["model"] == outside.json()["model"]
    assert inside.json()["detections"], "the shipped model finds something in this photo"
    assert inside.json()["detections"] == outside.json()["detections"]


def _answers_as_the_full_image(
    engine: Engine, container: Running, full_image: str, raccoon: Path
) -> None:
    bodies = {name: (raccoon / "JPEGImages" / name).read_bytes() for name in CPU_PHOTOS}
    bodies["readme-scene.jpg"] = encode(shapes_scene(), "JPEG", quality=95)
    name = "ssd-deploy-test-reference"
    try:
        reference, _ = start_container(
            engine, full_image, name, {"SSD_PRECISION": "fp32", "SSD_DEVICE": "cpu"}
        )
        found = 0
        for photo, body in bodies.items():
            files = {"image": (photo, body, "image/jpeg")}
            slim = httpx.post(container.url + "/detect", files=files, timeout=30)
            full = httpx.post(reference + "/detect", files=files, timeout=30)
            assert slim.status_code == full.status_code == 200, (slim.text, full.text)
            ours, theirs = slim.json(), full.json()
            assert ours["image"] == theirs["image"]
            assert ours["model"]["name"] == theirs["model"]["name"]
            try:
                assert_same_detections(
                    _as_arrays(ours["detections"]), _as_arrays(theirs["detections"]),
                    box_px=BOX_TOLERANCE_PX, tie=SCORE_TIE,
                )  # fmt: skip
            except AssertionError as exc:
                raise AssertionError(f"{photo}: {exc}") from None
            found += len(ours["detections"])
        assert found, "the shipped model finds something in these photos"
        FIGURES["cpu image against the full image"] = f"{found} detections on {len(bodies)} photos"
    finally:
        engine.docker("rm", "-f", name)


def _as_arrays(detections: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """An answer's detections as (labels, boxes [K, 4] xyxy px, scores [K])."""
    boxes = np.array([box_tuple(d) for d in detections], dtype=np.float64).reshape(-1, 4)
    return [d["label"] for d in detections], boxes, np.array([d["score"] for d in detections])


def test_torch_is_in_the_full_image_only(engine: Engine, container: Running) -> None:
    """The full image imports the lock's torch; the cpu image has exactly requirements-cpu.lock
    installed (not even pip), and ``import torch`` fails in it."""
    probe = engine.docker(
        "exec", container.name, "python", "-c", "import torch; print(torch.__version__)",
        check=False,
    )  # fmt: skip
    if container.target == FULL_TARGET:
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.strip().split("+")[0] == read_pins(LOCK_FILE)["torch"]
        return
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr, probe
    listing = engine.docker(
        "exec", container.name, "python", "-c",
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))",
    )  # fmt: skip
    installed = {canonicalize_name(k): v for k, v in json.loads(listing.stdout).items()}
    assert installed == read_pins(CPU_LOCK_FILE)


def test_runs_the_image_command_as_pid_1_without_root(engine: Engine, container: Running) -> None:
    status = engine.docker("exec", container.name, "cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, re.MULTILINE)
    assert uids and all(int(uid) != 0 for uid in uids.group(1).split()), status
    runtime = image_instructions(container.target)
    [user] = [i.args for i in runtime if i.keyword == "USER"]
    assert uids.group(1).split()[0] == user.partition(":")[0]
    cmdline = engine.docker("exec", container.name, "cat", "/proc/1/cmdline").stdout
    [cmd] = [i for i in runtime if i.keyword == "CMD"]
    assert cmdline.split("\0")[:-1] == cmd.exec_form()  # no shell in between


def test_healthcheck_turns_healthy(engine: Engine, container: Running) -> None:
    options, _ = healthcheck_of(image_instructions(container.target))
    # Docker decides: "starting" until a check passes, "unhealthy" after `retries` failures
    # past the start period. Waited out until it has decided, since a busy machine delays
    # the checks; the deadline is only for an engine that never runs them.
    seconds = {key: float(options[key].rstrip("s")) for key in ("interval", "start-period")}
    deadline = time.monotonic() + seconds["start-period"] + 4 * seconds["interval"] + 60
    while True:
        health = json.loads(engine.docker("inspect", "-f", "{{json .State.Health}}",
                                          container.name).stdout)  # fmt: skip
        if health["Status"] != "starting" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert health["Status"] == "healthy", health
    assert health["Log"][-1]["ExitCode"] == 0


def test_metrics_name_everything_the_dashboard_and_alerts_use(container: Running) -> None:
    text = httpx.get(container.url + "/metrics", timeout=10).text
    exported = {
        match.group(1) for match in re.finditer(r"^([a-zA-Z_:][\w:]*)[{ ]", text, re.MULTILINE)
    }
    used = set()
    for expr in [*dashboard_exprs(), *(rule["expr"] for rule in alert_rules())]:
        used |= metric_names(expr)
    # `up` is made by Prometheus for each scrape, not exported (test_compose_up.py sees it).
    assert used - {"up"} <= exported, f"not in /metrics: {sorted(used - {'up'} - exported)}"
    assert metric(text, "ssd_images_total") >= 2  # the detections above were counted


def test_docker_stop_drains_a_request_in_flight(engine: Engine, container: Running) -> None:
    """A request whose body is still arriving at SIGTERM gets its 200; the process then exits
    by itself, status 0, well before Docker would kill it."""
    body = encode(shapes_scene(), "JPEG", quality=95)
    host, port = container.url.removeprefix("http://").split(":")
    head = (
        f"POST /detect HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    half = len(body) // 2
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head + body[:half])
        time.sleep(1.0)  # the handler has started and waits for the rest of the body
        stopped: dict[str, float] = {}

        def stop() -> None:
            begin = time.monotonic()
            # Docker's timeout before SIGKILL: the compose file's stop_grace_period.
            engine.docker("stop", "-t", "30", container.name, timeout=60)
            stopped["seconds"] = time.monotonic() - begin

        stopper = threading.Thread(target=stop)
        began = time.monotonic()
        stopper.start()
        # SIGTERM has arrived once /readyz says 503, which it does for DRAIN_S seconds; the
        # signal itself may take a while to travel through a busy engine.
        deadline = time.monotonic() + 60
        while httpx_status(container.url + "/readyz") != 503:
            assert time.monotonic() < deadline, "/readyz never turned 503 after docker stop"
            time.sleep(0.05)
        sock.sendall(body[half:])
        response = _read_response(sock)
        answered = time.monotonic() - began
        stopper.join()
    status_line, _, payload = response.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 200"), response[:500]
    answer = json.loads(payload.split(b"\r\n\r\n", 1)[1])
    assert {d["label"] for d in answer["detections"]} >= {"circle", "triangle"}
    state = json.loads(engine.docker("inspect", "-f", "{{json .State}}", container.name).stdout)
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    # Exit status 0, not 137: it exited by itself, before Docker's SIGKILL at 30 s.
    FIGURES[f"{container.target} image: docker stop with a request in flight"] = (
        f"{stopped['seconds']:.1f} s, the request answered after {answered:.1f} s"
    )


def test_starts_again_after_docker_stop(engine: Engine, container: Running) -> None:
    """The stopped container starts again (as ``restart: unless-stopped`` does after a host
    reboot) and gets ready; the time it takes is the start with the disk cache warm, beside
    the cold start the fixture reports."""
    start = time.monotonic()
    engine.docker("start", container.name)
    while httpx_status(container.url + "/readyz") != 200:
        state = json.loads(engine.docker("inspect", "-f", "{{json .State}}", container.name).stdout)
        assert state["Running"], engine.docker("logs", container.name).stderr
        assert time.monotonic() - start < READY_TIMEOUT_S, engine.docker(
            "logs", container.name
        ).stderr
        time.sleep(0.1)
    FIGURES[f"{container.target} image second start (docker start to /readyz 200)"] = (
        f"{time.monotonic() - start:.1f} s"
    )


def _read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_repository_files_stay_out_of_the_build_context(engine: Engine, base_image: str) -> None:
    """What .dockerignore lets through, as the engine sees it: a build that copies the whole
    context and lists it."""
    probe = b"FROM " + base_image.encode() + b"\nCOPY . /context\n"
    # A training state left in weights/ (as `--out weights/x.safetensors` writes) stays out.
    state = REPO / "weights" / "context-probe.state.safetensors"
    state.write_bytes(b"training state")
    try:
        engine.docker("build", "-t", "ssd-context-probe", "-f", "-", str(REPO), input=probe)
    finally:
        state.unlink()
    listing = engine.docker("run", "--rm", "ssd-context-probe", "find", "/context", "-type", "f")
    engine.docker("rmi", "ssd-context-probe")
    sent = {line.removeprefix("/context/") for line in listing.stdout.split()}
    expected = {"pyproject.toml", "requirements.lock", "requirements-cpu.lock"}
    for folder in ("app", "model"):
        expected |= {
            str(path.relative_to(REPO))
            for path in (REPO / folder).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        }
    expected |= {
        str(p.relative_to(REPO))
        for p in (REPO / "weights").glob("*.safetensors")
        if not p.name.endswith(".state.safetensors")
    }
    assert sent == expected
    assert not any(".state." in name for name in sent)
    assert not any(name.startswith((".venv/", ".git/", "runs/", "bench/")) for name in sent)
