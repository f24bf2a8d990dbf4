"""The Dockerfile against the Makefile, the lock files, the compose file and the Kubernetes
Deployment (offline).

The images themselves are built and run in test_container.py.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.support import (
    CPU_LOCK_FILE,
    CPU_TARGET,
    FULL_TARGET,
    K8S_DIR,
    LOCK_FILE,
    REPO,
    compose,
    dockerfile_stage,
    dockerfile_stages,
    env_of,
    healthcheck_of,
    image_instructions,
    load_yaml,
    makefile_pip_commands,
    read_pins,
    settings_from_env,
    stage_name,
)

# The project's install target in the Makefile and its counterpart in the image: the editable
# project with its dev tools for a developer, the project alone in the image.
DEVELOPER_TARGET = ["-e", ".[dev]"]
IMAGE_TARGET = ["."]
VENV_PYTHON = "/opt/venv/bin/python"
BASE_IMAGE = "debian:bookworm-slim"
# The project's dependencies the cpu image leaves out: the network and its post-processing run
# inside the exported ONNX graph instead of torch and torchvision; onnx writes that graph (in
# the Dockerfile's onnx stage), ONNX Runtime reads it; the others serve training and evaluation
# only (pyproject.toml's comments).
NOT_IN_CPU_IMAGE = {"torch", "torchvision", "onnx", "tqdm", "pycocotools", "matplotlib"}
# What the cpu image adds to the project's runtime set: the engine that runs the exported graph.
CPU_ENGINE = "onnxruntime"
# Packages that carry CUDA or torch's compiler: none may reach the cpu image.
GPU_PACKAGE = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")


def _runtime() -> list:
    return image_instructions(FULL_TARGET)


def _requirement_closure(requirements: list[Requirement]) -> set[str]:
    """The canonical names of ``requirements`` and of everything they need, with their extras,
    read from the installed distributions' metadata (the dev environment has all of them)."""
    extras_seen: dict[str, set[str]] = {}
    todo = list(requirements)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        extras = set(requirement.extras)
        if name in extras_seen and extras <= extras_seen[name]:
            continue
        extras_seen[name] = extras_seen.get(name, set()) | extras
        for text in importlib.metadata.requires(requirement.name) or []:
            needed = Requirement(text)
            if needed.marker is None or any(
                needed.marker.evaluate({"extra": extra}) for extra in extras_seen[name] | {""}
            ):
                todo.append(needed)
    return set(extras_seen)


def test_build_stage_installs_with_the_makefile_commands() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    make_commands = makefile_pip_commands()
    assert make_commands, "no pip command found in `make -n install`"
    build = dockerfile_stage("build")
    docker_commands = []
    for instruction in build:
        if instruction.keyword == "RUN":
            for part in instruction.args.split("&&"):
                words = part.split()
                if words[:3] == [VENV_PYTHON, "-m", "pip"]:
                    docker_commands.append(words[2:])
    expected = [
        command[: -len(DEVELOPER_TARGET)] + IMAGE_TARGET
        if command[-len(DEVELOPER_TARGET) :] == DEVELOPER_TARGET
        else command
        for command in make_commands
    ]
    assert docker_commands == expected


def test_every_stage_is_debian_bookworm_slim_with_its_python() -> None:
    stages = dockerfile_stages()
    names = {stage_name(stage) for stage in stages}
    for stage in stages:
        parent = stage[0].args.split()[0]
        if parent in names:
            continue  # built on an earlier stage, which is checked itself
        assert parent == BASE_IMAGE, stage[0]
        installs = " ".join(i.args for i in stage if i.keyword == "RUN")
        assert "apt-get install -y --no-install-recommends python3" in installs


def test_default_target_is_the_full_image() -> None:
    """`docker build .` (and compose's `build: .`) builds the last stage."""
    assert stage_name(dockerfile_stages()[-1]) == FULL_TARGET


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (
            FULL_TARGET,
            [
                "--from=build /opt/venv /opt/venv",
                "app/ app/",
                "model/ model/",
                "weights/*.safetensors weights/",
            ],
        ),
        (
            CPU_TARGET,
            [
                "--from=cpu-build /opt/venv /opt/venv",
                "app/ app/",
                "model/ model/",
                "--from=onnx /export/ssd300_shapes.onnx weights/",
            ],
        ),
    ],
)
def test_runtime_copies_only_the_environment_code_and_weights(
    target: str, expected: list[str]
) -> None:
    copies = [i.args for i in image_instructions(target) if i.keyword == "COPY"]
    assert copies == expected


def test_cpu_image_serves_the_model_its_onnx_stage_exports() -> None:
    """The onnx stage exports the shipped model (the full image's default) to the file that the
    cpu image copies and names in SSD_WEIGHTS, for the ONNX Runtime backend."""
    [export] = [i.args for i in dockerfile_stage("onnx") if i.keyword == "RUN"]
    out = export.split("--out ")[1].split()[0]
    full_settings = settings_from_env(env_of(_runtime()))
    cpu_env = env_of(image_instructions(CPU_TARGET))
    assert f"model.export {full_settings.weights} --format onnx" in export
    [copy] = [i.args for i in image_instructions(CPU_TARGET) if "--from=onnx" in i.args]
    assert copy == f"--from=onnx {out} weights/"
    assert cpu_env["SSD_WEIGHTS"] == "weights/" + out.rsplit("/", 1)[1]
    cpu_settings = settings_from_env(cpu_env)
    assert cpu_settings.backend == "onnxruntime"
    assert str(cpu_settings.weights) == cpu_env["SSD_WEIGHTS"]


def test_cpu_lock_pins_the_runtime_subset_of_the_lock_plus_onnxruntime() -> None:
    """requirements-cpu.lock: exactly the project's serving dependencies and ONNX Runtime with
    everything they need, each at requirements.lock's version; no torch, no CUDA."""
    cpu, full = read_pins(CPU_LOCK_FILE), read_pins(LOCK_FILE)
    differing = {name: (version, full.get(name)) for name, version in cpu.items()
                 if full.get(name) != version}  # fmt: skip
    assert not differing, f"{CPU_LOCK_FILE.name} against {LOCK_FILE.name}: {differing}"
    assert not [name for name in cpu if GPU_PACKAGE.match(name)]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    serving = [Requirement(text) for text in project["dependencies"]]
    serving = [r for r in serving if canonicalize_name(r.name) not in NOT_IN_CPU_IMAGE]
    needed = _requirement_closure([*serving, Requirement(CPU_ENGINE)])
    assert not needed - set(cpu), f"missing in {CPU_LOCK_FILE.name}: {sorted(needed - set(cpu))}"
    assert not set(cpu) - needed, f"not needed in {CPU_LOCK_FILE.name}: {sorted(set(cpu) - needed)}"


def test_cpu_build_installs_the_cpu_lock_alone_and_checks_it() -> None:
    runs = [i.args for i in dockerfile_stage("cpu-build") if i.keyword == "RUN"]
    installs = " ".join(runs)
    assert f"pip install --quiet --no-deps -r {CPU_LOCK_FILE.name}" in installs
    assert "pip check" in installs
    assert installs.endswith("pip uninstall --quiet --yes pip setuptools")  # after the check
    assert "requirements.lock" not in installs and "pyproject" not in installs


@pytest.mark.parametrize("target", [FULL_TARGET, CPU_TARGET])
def test_runs_one_uvicorn_process_as_a_numbered_non_root_user(target: str) -> None:
    runtime = image_instructions(target)
    [user] = [i.args for i in runtime if i.keyword == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    deployment = load_yaml(K8S_DIR / "base" / "deployment.yaml")
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert (pod_security["runAsUser"], pod_security["runAsGroup"]) == (int(uid), int(gid))
    [cmd] = [i for i in runtime if i.keyword == "CMD"]
    # Exec form, so SIGTERM reaches the server with no shell in between.
    assert cmd.exec_form() == [VENV_PYTHON, "-m", "app", "--host", "0.0.0.0", "--port", "8000"]
    [expose] = [i.args for i in runtime if i.keyword == "EXPOSE"]
    assert expose == cmd.exec_form()[-1]


def test_both_images_have_the_same_healthcheck() -> None:
    assert healthcheck_of(image_instructions(CPU_TARGET)) == healthcheck_of(_runtime())


def test_compose_healthcheck_is_the_images() -> None:
    options, command = healthcheck_of(_runtime())
    assert command[:2] == [VENV_PYTHON, "-c"]  # the image's own Python, no curl
    assert "/healthz" in command[2]
    check = compose()["services"]["detector"]["healthcheck"]
    assert check["test"] == ["CMD", *command]
    written = {key.replace("-", "_"): value for key, value in options.items()}
    assert {key: str(check[key]) for key in written} == written
