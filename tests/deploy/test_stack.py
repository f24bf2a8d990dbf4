"""``docker-compose up -d detector prometheus``: Prometheus scrapes the detector through the
compose network, counts what it served and evaluates the alert rules and the dashboard's
queries.

The official Prometheus image cannot be pulled here, so a stand-in built from Debian's
``prometheus`` package is tagged with the compose file's image name; it runs with the compose
file's command, mounts and network. Grafana cannot run here at all (test_monitoring_files.py
checks its files).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import httpx
import pytest

from tests.app.support import encode, free_port
from tests.deploy.engine import Engine
from tests.deploy.support import (
    COMPOSE_CPU_FILE,
    COMPOSE_FILE,
    FIGURES,
    READY_TIMEOUT_S,
    alert_rules,
    compose,
    dashboard_exprs,
    metric_names,
    shapes_scene,
)

PROJECT = "ssd-deploy-test"
# The stand-in: Debian's Prometheus started the way the official image starts (its entry point
# is the server; the compose file gives the arguments), as the same unprivileged user.
PROMETHEUS_STAND_IN = b"""\
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends prometheus \\
    && rm -rf /var/lib/apt/lists/* && mkdir /prometheus && chown nobody:nogroup /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
"""
NEVER = "0001-01-01T00:00:00Z"  # Go's zero time: a rule's lastEvaluation before its first
REQUESTS = 3  # detection requests sent, each one image
# Four scrape intervals (15 s, deploy/prometheus/prometheus.yml): the first scrape after the
# requests comes within one; the rest is room for a busy machine.
SCRAPE_TIMEOUT_S = 60.0
T = TypeVar("T")


@dataclass(frozen=True)
class Stack:
    detector: str
    prometheus: str

    def query(self, expr: str) -> dict[str, Any]:
        """Prometheus' HTTP API answer to an instant query (``status`` checked)."""
        response = httpx.get(self.prometheus + "/api/v1/query", params={"query": expr}, timeout=10)
        assert response.status_code == 200, f"{expr}: {response.text}"
        answer = response.json()
        assert answer["status"] == "success", answer
        return answer["data"]


def _wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``check()`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(engine: Engine, detector_image: str) -> Iterator[Stack]:
    """The detector (the image built from the Dockerfile) and Prometheus, up by compose."""
    image = compose()["services"]["prometheus"]["image"]
    engine.docker("build", "--network", "host", "-t", image, "-", input=PROMETHEUS_STAND_IN)
    # The host ports, moved off 8000 and 9090 (compose interpolates these variables).
    ports = {"DETECTOR_PORT": free_port(), "PROMETHEUS_PORT": free_port()}
    env = {name: str(port) for name, port in ports.items()}
    start = time.monotonic()
    try:
        engine.compose("-p", PROJECT, "up", "-d", "detector", "prometheus", env=env)
        stack = Stack(
            f"http://127.0.0.1:{ports['DETECTOR_PORT']}",
            f"http://127.0.0.1:{ports['PROMETHEUS_PORT']}",
        )
        _wait_for(
            lambda: httpx.get(stack.detector + "/readyz", timeout=2).status_code == 200,
            READY_TIMEOUT_S,
            "the detector's /readyz",
        )
        FIGURES["compose up to detector ready"] = f"{time.monotonic() - start:.1f} s"
        yield stack
    finally:
        engine.compose("-p", PROJECT, "down", "-v", "--timeout", "30", env=env)


def test_prometheus_counts_the_images_the_detector_served(stack: Stack) -> None:
    body = encode(shapes_scene(), "JPEG", quality=95)
    for _ in range(REQUESTS):
        response = httpx.post(
            stack.detector + "/detect",
            content=body,
            headers={"content-type": "image/jpeg"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
    start = time.monotonic()

    def counted() -> float | None:
        result = stack.query('sum(ssd_images_total{job="ssd-detector"})')["result"]
        return float(result[0]["value"][1]) if result else None

    _wait_for(lambda: counted() == REQUESTS, SCRAPE_TIMEOUT_S, f"ssd_images_total == {REQUESTS}")
    FIGURES["requests to Prometheus' count"] = f"{time.monotonic() - start:.1f} s"
    [target] = stack.query('up{job="ssd-detector"}')["result"]
    assert target["metric"]["instance"] == "detector:8000" and target["value"][1] == "1"


def test_prometheus_has_every_metric_the_dashboard_and_alerts_use(stack: Stack) -> None:
    names = httpx.get(stack.prometheus + "/api/v1/label/__name__/values", timeout=10).json()
    used = set()
    for expr in [*dashboard_exprs(), *(rule["expr"] for rule in alert_rules())]:
        used |= metric_names(expr)
    assert used <= set(names["data"]), f"unknown to Prometheus: {used - set(names['data'])}"


def test_prometheus_evaluates_the_dashboard_queries(stack: Stack) -> None:
    for expr in dashboard_exprs():
        # Grafana's $__rate_interval is at least four scrape intervals.
        stack.query(expr.replace("$__rate_interval", "1m"))


def test_prometheus_loaded_the_alert_rules_and_evaluates_them(stack: Stack) -> None:
    expected = {rule["alert"] for rule in alert_rules()}

    # A scrape before the detector listened set up == 0 and may have left SSDDetectorDown
    # pending, rightly. Judge the rules by an evaluation that comes after a scrape that
    # succeeded: from then on nothing is wrong with this detector.
    def up_at() -> float | None:
        """The time (Unix seconds) of an instant query that found the latest scrape good."""
        result = stack.query('up{job="ssd-detector"} == 1')["result"]
        return float(result[0]["value"][0]) if result else None

    scraped = _wait_for(up_at, SCRAPE_TIMEOUT_S, "a successful scrape")

    def evaluated() -> list[dict[str, Any]] | None:
        response = httpx.get(stack.prometheus + "/api/v1/rules", timeout=10).json()
        rules = [r for g in response["data"]["groups"] for r in g["rules"]]
        done = all(_unix_time(r["lastEvaluation"]) > scraped for r in rules)
        return rules if rules and done else None

    # One evaluation interval (15 s) after that scrape, at most.
    rules = _wait_for(evaluated, SCRAPE_TIMEOUT_S, "an evaluation of the alert rules")
    assert {rule["name"] for rule in rules} == expected
    assert all(rule["health"] == "ok" for rule in rules), rules
    # Nothing is wrong with this detector, so nothing fires or is about to.
    assert all(rule["state"] == "inactive" for rule in rules), rules


def test_cpu_variant_serves_the_shipped_model_through_compose(
    engine: Engine, cpu_image: str
) -> None:
    """``docker-compose -f docker-compose.yml -f docker-compose.cpu.yml up detector`` runs the
    cpu image (already built and tagged by the fixture) and answers the README's example."""
    files = ["-f", COMPOSE_FILE.name, "-f", COMPOSE_CPU_FILE.name, "-p", PROJECT + "-cpu"]
    env = {"DETECTOR_PORT": str(free_port())}
    url = f"http://127.0.0.1:{env['DETECTOR_PORT']}"
    try:
        engine.compose(*files, "up", "-d", "--no-build", "detector", env=env)
        _wait_for(
            lambda: httpx.get(url + "/readyz", timeout=2).status_code == 200,
            READY_TIMEOUT_S,
            "the cpu detector's /readyz",
        )
        [container] = engine.compose(*files, "ps", "-q", "detector", env=env).stdout.split()
        image = engine.docker("inspect", "-f", "{{.Config.Image}}", container).stdout.strip()
        assert image == cpu_image
        body = encode(shapes_scene(), "JPEG", quality=95)
        response = httpx.post(
            url + "/detect", content=body, headers={"content-type": "image/jpeg"}, timeout=30
        )
        assert response.status_code == 200, response.text
        labels = {detection["label"] for detection in response.json()["detections"]}
        assert labels >= {"circle", "triangle"}, response.json()
    finally:
        engine.compose(*files, "down", "-v", "--timeout", "30", env=env)


def _unix_time(rfc3339: str) -> float:
    """Seconds since the epoch of Prometheus' RFC 3339 time (nanosecond digits allowed); Go's
    zero time (never evaluated) is far in the past."""
    if rfc3339 == NEVER:
        return float("-inf")
    # fromisoformat takes at most microseconds: drop the digits beyond them.
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", rfc3339).replace("Z", "+00:00")
    return datetime.fromisoformat(trimmed).timestamp()
