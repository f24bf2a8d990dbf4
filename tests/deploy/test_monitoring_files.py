"""Prometheus configuration and alert rules (checked by promtool) and Grafana's provisioning and
dashboard (Grafana cannot run here: checked offline against what compose mounts and what
Prometheus serves). Live checks against a real scrape are in test_container.py and
test_compose_up.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.deploy.support import (
    GRAFANA_DIR,
    PROMETHEUS_DIR,
    alert_rules,
    compose,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    duration_s,
    load_yaml,
    metric_names,
    unavailable,
)

# Grafana's core panel types that need no plugin.
CORE_PANELS = {"timeseries", "stat", "table", "heatmap", "bargauge", "gauge", "text", "row"}
GRID_COLUMNS = 24  # Grafana's dashboard grid is 24 columns wide


def _promtool(*args: str) -> None:
    if shutil.which("promtool") is None:
        unavailable("promtool is not installed (apt-get install prometheus)")
    result = subprocess.run(["promtool", *args], capture_output=True, text=True)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_promtool_accepts_config_and_rules() -> None:
    _promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    _promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))


def test_alerts_cover_down_latency_rejections_and_queue() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) == {
        "SSDDetectorDown",
        "SSDDetectLatencyHigh",
        "SSDRejectionRateHigh",
        "SSDQueueNearlyFull",
    }
    assert "up{" in rules["SSDDetectorDown"]["expr"]
    latency = rules["SSDDetectLatencyHigh"]
    assert "histogram_quantile(0.99" in latency["expr"] and 'route="/detect"' in latency["expr"]
    assert duration_s(latency["for"]) == 5 * 60  # the issue: above a threshold for 5 minutes
    assert 'status=~"503|504"' in rules["SSDRejectionRateHigh"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"]


def test_queue_alert_threshold_follows_max_queue() -> None:
    # The threshold is a fraction of the capacity each instance exports, not a copy of
    # SSD_MAX_QUEUE (the live /metrics check confirms ssd_queue_capacity exists).
    [rule] = [r for r in alert_rules() if r["alert"] == "SSDQueueNearlyFull"]
    match = re.search(r">\s*(0\.\d+)\s*\*\s*ssd_queue_capacity\{", rule["expr"])
    assert match, f"expected `> FRACTION * ssd_queue_capacity{{...}}` in {rule['expr']!r}"
    assert 0 < float(match.group(1)) < 1


def test_grafana_datasource_is_the_compose_prometheus() -> None:
    [source] = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    prometheus = compose()["services"]["prometheus"]
    [mapping] = prometheus["ports"]
    assert source["url"] == f"http://prometheus:{mapping.rsplit(':', 1)[1]}"
    scrape = load_yaml(PROMETHEUS_DIR / "prometheus.yml")["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape
    uids = {panel["datasource"]["uid"] for panel in dashboard_panels()}
    uids |= {t["datasource"]["uid"] for p in dashboard_panels() for t in p["targets"]}
    assert uids == {source["uid"]}


def test_grafana_loads_the_dashboard_from_the_mounted_folder() -> None:
    [provider] = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "ssd-detector.yml")[
        "providers"
    ]
    grafana = compose()["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(provider["options"]["path"])
    assert (GRAFANA_DIR / "dashboards" / home.name).is_file()


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["type"] in CORE_PANELS, panel["type"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= GRID_COLUMNS
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
    for panel in dashboard_panels():
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert panel["title"] and panel["description"]


def test_dashboard_shows_what_the_issue_lists() -> None:
    """Request rate by route and status; latency p50/p95/p99 overall and by stage; batch sizes;
    queue depth; rejections by reason; images/s and detections/s by label; the model."""
    exprs = dashboard_exprs()

    def shown(metric: str, *also: str) -> bool:
        return any(metric in metric_names(e) and all(a in e for a in also) for e in exprs)

    assert shown("ssd_requests_total", "by (route, status)")
    for quantile in ("0.5", "0.95", "0.99"):
        assert shown("ssd_request_duration_seconds_bucket", f"histogram_quantile({quantile},")
        assert shown("ssd_stage_duration_seconds_bucket", f"histogram_quantile({quantile},")
    assert shown("ssd_stage_duration_seconds_bucket", "stage)")
    assert shown("ssd_batch_size_bucket")
    assert shown("ssd_queue_depth")
    assert shown("ssd_rejected_total", "by (reason)")
    assert shown("ssd_images_total", "rate(")
    assert shown("ssd_detections_total", "by (label)")
    [model] = [p for p in dashboard_panels() if "ssd_model_info" in p["targets"][0]["expr"]]
    assert model["type"] == "table"  # model, version, device and precision as columns
    [organize] = [t for t in model["transformations"] if t["id"] == "organize"]
    columns = set(organize["options"]["indexByName"])
    assert columns == {"instance", "model", "version", "device", "precision"}
