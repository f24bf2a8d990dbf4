"""The Dockerfile against the Makefile, the compose file and the Kubernetes Deployment (offline).

The image itself is built and run in test_container.py.
"""

from __future__ import annotations

import shutil

import pytest

from tests.deploy.support import (
    K8S_DIR,
    compose,
    dockerfile_stages,
    healthcheck_of,
    load_yaml,
    makefile_pip_commands,
)

# The project's install target in the Makefile and its counterpart in the image: the editable
# project with its dev tools for a developer, the project alone in the image.
DEVELOPER_TARGET = ["-e", ".[dev]"]
IMAGE_TARGET = ["."]
VENV_PYTHON = "/opt/venv/bin/python"


def _runtime() -> list:
    return dockerfile_stages()[-1]


def test_build_stage_installs_with_the_makefile_commands() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    make_commands = makefile_pip_commands()
    assert make_commands, "no pip command found in `make -n install`"
    [build, _] = dockerfile_stages()
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


def test_both_stages_are_debian_bookworm_slim_with_its_python() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2
    assert [stage[0].args.split()[0] for stage in stages] == ["debian:bookworm-slim"] * 2
    for stage in stages:
        installs = " ".join(i.args for i in stage if i.keyword == "RUN")
        assert "apt-get install -y --no-install-recommends python3" in installs


def test_runtime_copies_only_the_environment_code_and_weights() -> None:
    copies = [i.args for i in _runtime() if i.keyword == "COPY"]
    assert copies == [
        "--from=build /opt/venv /opt/venv",
        "app/ app/",
        "model/ model/",
        "weights/*.safetensors weights/",
    ]


def test_runs_one_uvicorn_process_as_a_numbered_non_root_user() -> None:
    runtime = _runtime()
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


def test_compose_healthcheck_is_the_images() -> None:
    options, command = healthcheck_of(_runtime())
    assert command[:2] == [VENV_PYTHON, "-c"]  # the image's own Python, no curl
    assert "/healthz" in command[2]
    check = compose()["services"]["detector"]["healthcheck"]
    assert check["test"] == ["CMD", *command]
    written = {key.replace("-", "_"): value for key, value in options.items()}
    assert {key: str(check[key]) for key in written} == written
