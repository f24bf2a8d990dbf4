"""Metrics (``app/metrics.py``): the fixed names and labels and the batch-size buckets, in
process; and a real Prometheus scraping a real server, since the scrape over HTTP by
Prometheus itself is the point."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from app.metrics import batch_size_buckets
from model import Detector
from tests.app.support import Server, encode, free_port, metric, shapes_image

PROMETHEUS = "/usr/bin/prometheus"


def test_batch_size_buckets_double_up_to_the_maximum() -> None:
    assert batch_size_buckets(1) == [1.0]
    assert batch_size_buckets(8) == [1.0, 2.0, 4.0, 8.0]
    assert batch_size_buckets(12) == [1.0, 2.0, 4.0, 8.0, 12.0]


@pytest.mark.anyio
async def test_exposition_has_the_fixed_names(
    client: httpx.AsyncClient, tiny_detector: Detector
) -> None:
    (
        await client.post(
            "/detect?score_threshold=0",
            content=encode(shapes_image(), "PNG"),
            headers={"Content-Type": "image/png"},
        )
    ).raise_for_status()
    response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    types = {
        "ssd_request_duration_seconds": "histogram",
        "ssd_stage_duration_seconds": "histogram",
        "ssd_batch_size": "histogram",
        "ssd_queue_depth": "gauge",
        "ssd_queue_capacity": "gauge",
        "ssd_images_total": "counter",
        "ssd_detections_total": "counter",
        "ssd_requests_total": "counter",
        "ssd_rejected_total": "counter",
        "ssd_model_info": "gauge",
        "ssd_model_reloads_total": "counter",
        "ssd_model_copies": "gauge",
    }
    for name, kind in types.items():
        assert f"# TYPE {name} {kind}" in text, name
    assert metric(text, "ssd_request_duration_seconds_count", route="/detect") >= 1
    for stage in ("decode", "queue", "inference", "postprocess"):
        assert metric(text, "ssd_stage_duration_seconds_count", stage=stage) >= 1
    for le in ("1.0", "2.0", "4.0", "8.0", "+Inf"):  # SSD_MAX_BATCH_SIZE is 8
        assert f'ssd_batch_size_bucket{{le="{le}",model="tiny"}}' in text
    assert metric(text, "ssd_requests_total", route="/detect", status="200") >= 1
    assert any(line.startswith('ssd_detections_total{label="') for line in text.splitlines())
    for reason in (
        "invalid_image",
        "too_large",
        "unsupported_type",
        "bad_request",
        "overloaded",
        "timeout",
        "slow_upload",
        "disconnected",
    ):
        assert f'ssd_rejected_total{{reason="{reason}"}}' in text
    precision = tiny_detector.precision  # SSD_PRECISION=auto: what it measured fastest
    assert metric(text, "ssd_model_info", model="tiny", device="cpu", precision=precision) == 1
    assert metric(text, "ssd_queue_capacity") == 64  # SSD_MAX_QUEUE of the test server
    assert "process_cpu_seconds_total" in text  # the client library's process metrics
    assert "python_gc_objects_collected_total" in text


def _prometheus_binary() -> str:
    if Path(PROMETHEUS).is_file():
        return PROMETHEUS
    found = shutil.which("prometheus")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail(f"{PROMETHEUS} is missing; .ci/run installs Debian's prometheus package")
    pytest.skip("Prometheus is not installed (apt-get install prometheus); CI installs it")


def _query(base: str, expression: str) -> list[dict]:
    response = httpx.get(base + "/api/v1/query", params={"query": expression}, timeout=10)
    response.raise_for_status()
    return response.json()["data"]["result"]


def test_real_prometheus_scrapes_the_counters(server: Server, tmp_path: Path) -> None:
    binary = _prometheus_binary()
    png = encode(shapes_image(), "PNG")
    for _ in range(3):
        httpx.post(
            server.url + "/detect", content=png, headers={"Content-Type": "image/png"}, timeout=30
        ).raise_for_status()
    httpx.post(server.url + "/detect", content=b"GIF89a", timeout=30)  # one 415
    text = server.metrics()
    ok = metric(text, "ssd_requests_total", route="/detect", status="200")
    unsupported = metric(text, "ssd_rejected_total", reason="unsupported_type")

    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: ssd\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.port}']\n"
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        end = time.monotonic() + 60
        result: list[dict] = []
        while time.monotonic() < end:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                result = _query(base, 'ssd_requests_total{job="ssd",route="/detect",status="200"}')
            except httpx.HTTPError:
                result = []  # not up yet
            if result:
                break
            time.sleep(0.5)
        assert result, "Prometheus never scraped the service"
        assert float(result[0]["value"][1]) == ok
        [up] = _query(base, 'up{job="ssd"}')
        assert up["value"][1] == "1"
        [rejected] = _query(base, 'ssd_rejected_total{reason="unsupported_type"}')
        assert float(rejected["value"][1]) == unsupported
        [info] = _query(base, "ssd_model_info")
        assert info["metric"]["model"] == "tiny" and info["value"][1] == "1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
