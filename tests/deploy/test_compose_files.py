"""docker-compose.yml and its GPU and cpu-image variants, checked offline by Debian's
docker-compose 1.29 and against the service's settings and the Dockerfile. test_stack.py runs
them."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from app.settings import Settings
from tests.deploy.support import (
    COMPOSE_CPU_FILE,
    COMPOSE_FILE,
    COMPOSE_GPU_FILE,
    CPU_TARGET,
    REPO,
    compose,
    dockerfile_stage,
    duration_s,
    env_of,
    image_instructions,
    load_yaml,
    settings_env_names,
    settings_from_env,
    unavailable,
)


def _config(*files: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("docker-compose") is None:
        unavailable("docker-compose is not installed (apt-get install docker-compose)")
    args = [arg for name in files for arg in ("-f", name)]
    return subprocess.run(
        ["docker-compose", *args, "config"], cwd=REPO, capture_output=True, text=True
    )


def test_compose_file_and_its_variants_are_valid() -> None:
    for files in (
        [COMPOSE_FILE.name],
        [COMPOSE_FILE.name, COMPOSE_GPU_FILE.name],
        [COMPOSE_FILE.name, COMPOSE_CPU_FILE.name],
    ):
        result = _config(*files)
        assert result.returncode == 0, f"docker-compose config {files}:\n{result.stderr}"


def test_gpu_variant_reserves_an_nvidia_gpu_for_the_detector_only() -> None:
    result = _config(COMPOSE_FILE.name, COMPOSE_GPU_FILE.name)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    [device] = services["detector"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device["count"] == 1
    assert services["detector"]["environment"]["SSD_DEVICE"] == "cuda"
    assert settings_from_env(services["detector"]["environment"]).device == "cuda"
    assert all("deploy" not in services[name] for name in ("prometheus", "grafana"))


def test_cpu_variant_runs_the_cpu_image_with_its_own_settings() -> None:
    """The detector is built from the Dockerfile's cpu target under a tag of its own, and runs
    with the cpu image's backend and weights (docker-compose.yml names the full image's)."""
    result = _config(COMPOSE_FILE.name, COMPOSE_CPU_FILE.name)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    detector = services["detector"]
    assert detector["build"]["target"] == CPU_TARGET
    dockerfile_stage(detector["build"]["target"])  # KeyError if there is no such stage
    assert detector["image"] != compose()["services"]["detector"]["image"]
    image_env = env_of(image_instructions(CPU_TARGET))
    for name in ("SSD_BACKEND", "SSD_WEIGHTS"):
        assert detector["environment"][name] == image_env[name]
    settings = settings_from_env(detector["environment"])
    assert (settings.backend, settings.device) == ("onnxruntime", "cpu")
    # The rest of the stack is docker-compose.yml's: the variant changes nothing else.
    override = load_yaml(COMPOSE_CPU_FILE)
    assert set(override) == {"services"} and set(override["services"]) == {"detector"}
    assert set(override["services"]["detector"]) == {"build", "image", "environment"}


def test_services_are_detector_prometheus_grafana() -> None:
    assert set(compose()["services"]) == {"detector", "prometheus", "grafana"}


def test_detector_lists_every_setting_with_its_default() -> None:
    """A setting added to app/settings.py must be added here too, with its default."""
    environment = compose()["services"]["detector"]["environment"]
    written = {key for key in environment if key.startswith("SSD_")}
    expected = set(settings_env_names())
    assert not expected - written, f"settings missing in docker-compose.yml: {expected - written}"
    assert not written - expected, f"not settings (typos?): {written - expected}"
    given = settings_from_env(environment)
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        assert getattr(given, name) == default, (
            f"SSD_{name.upper()}={environment['SSD_' + name.upper()]!r} in docker-compose.yml, "
            f"but the default is {default!r}"
        )


def test_stop_grace_period_outlasts_the_shutdown() -> None:
    detector = compose()["services"]["detector"]
    shutdown_s = settings_from_env(detector["environment"]).shutdown_timeout_s
    assert duration_s(detector["stop_grace_period"]) > shutdown_s


def test_detector_publishes_the_image_port_and_prometheus_scrapes_it() -> None:
    services = compose()["services"]
    [mapping] = services["detector"]["ports"]
    container_port = mapping.rsplit(":", 1)[1]
    assert container_port == "8000"  # the Dockerfile's EXPOSE (test_image_files.py)
    scrape = load_yaml(REPO / "deploy" / "prometheus" / "prometheus.yml")["scrape_configs"]
    targets = [t for job in scrape for c in job["static_configs"] for t in c["targets"]]
    assert targets == [f"detector:{container_port}"]


def test_prometheus_and_grafana_mount_the_deploy_folders() -> None:
    services = compose()["services"]
    mounts = {
        volume.split(":")[0]: volume.split(":")[1]
        for name in ("prometheus", "grafana")
        for volume in services[name]["volumes"]
        if volume.startswith("./")
    }
    for source in mounts:
        assert (REPO / source).is_dir(), f"{source} is mounted but does not exist"
    command = services["prometheus"]["command"]
    config = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--config.file="))
    assert config.startswith(mounts["./deploy/prometheus"] + "/")
    assert (REPO / "deploy/prometheus" / config.rsplit("/", 1)[1]).is_file()


@pytest.mark.parametrize("service", ["prometheus", "grafana"])
def test_official_images_are_pinned(service: str) -> None:
    image = compose()["services"][service]["image"]
    name, _, tag = image.partition(":")
    assert name in {"prom/prometheus", "grafana/grafana"}
    assert tag and tag != "latest"
