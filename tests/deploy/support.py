"""What the deployment tests read: the repository's deploy files, parsed, and small helpers.

Each reader returns the file as the tool that uses it would see it (YAML and JSON as data, the
Dockerfile as instructions, the Makefile's install recipe as make expands it), so that the
tests compare the files with each other and with ``app.settings`` instead of restating them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.utils import canonicalize_name
from PIL import Image, ImageDraw

from app.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_GPU_FILE = REPO / "docker-compose.gpu.yml"
COMPOSE_CPU_FILE = REPO / "docker-compose.cpu.yml"
DOCKERFILE = REPO / "Dockerfile"
LOCK_FILE = REPO / "requirements.lock"
CPU_LOCK_FILE = REPO / "requirements-cpu.lock"
# The Dockerfile's two images: its default target (the last stage) and the torch-free one.
FULL_TARGET = "full"
CPU_TARGET = "cpu"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"
K8S_DIR = REPO / "deploy" / "k8s"
# Start to /readyz 200 takes seconds (docs/performance.md); the first start after a build reads
# its several GB from a cold disk cache, and the machine may be busy.
READY_TIMEOUT_S = 120.0

# The README's curl example: a 480x360 scene, a red circle in (40, 60)-(220, 240) and a green
# triangle in (300, 150)-(440, 280), which the shipped model finds with scores above 0.99.
SCENE_SIZE = (480, 360)
CIRCLE = (40.0, 60.0, 220.0, 240.0)
TRIANGLE = (300.0, 150.0, 440.0, 280.0)
MIN_IOU = 0.7  # the README example's boxes overlap the drawn ones by 0.93 and 0.88

# The figures the tests measure (build time, image size, cold start ...), printed at the end of
# the run by conftest.py's terminal summary.
FIGURES: dict[str, str] = {}


def unavailable(reason: str) -> None:
    """Skip for ``reason``, except under CI (``CI=true``), where a deployment test that cannot
    run is a failure: CI installs everything these tests need (.ci/run)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the deployment tests, but: {reason}", pytrace=False)
    pytest.skip(reason)


def load_yaml(path: Path) -> Any:
    """One YAML document."""
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    """docker-compose.yml as written (not as ``docker-compose config`` normalises it)."""
    return load_yaml(COMPOSE_FILE)


def settings_env_names() -> dict[str, str]:
    """Every setting's environment variable, mapped to its field name."""
    return {ENV_PREFIX + name.upper(): name for name in Settings.model_fields}


def settings_from_env(env: dict[str, Any]) -> Settings:
    """The ``Settings`` that the ``SSD_*`` entries of ``env`` give (other names ignored), read
    by the app's own validation. Raises ``KeyError`` for an ``SSD_*`` name that is no setting."""
    names = settings_env_names()
    given = {names[key]: str(value) for key, value in env.items() if key.startswith(ENV_PREFIX)}
    return Settings(**given)


def duration_s(text: str) -> float:
    """A Compose duration (``30s``, ``1m30s``, ``500ms``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Compose duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def shapes_scene() -> Image.Image:
    """The README example's scene (PIL's end pixels are inclusive: right/bottom minus one)."""
    image = Image.new("RGB", SCENE_SIZE, (236, 236, 228))
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = CIRCLE
    draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=(214, 32, 32))
    x0, y0, x1, y1 = TRIANGLE
    draw.polygon([((x0 + x1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=(40, 170, 60))
    return image


# ---- Dockerfile -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: keyword (upper case) and its argument text, continuation
    lines joined."""

    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        """The argument as a JSON array (exec form); ``ValueError`` if it is not one."""
        value = json.loads(self.args)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{self.keyword} is not in exec form: {self.args}")
        return value


def stage_name(stage: list[Instruction]) -> str | None:
    """The stage's ``AS`` name, or None."""
    words = stage[0].args.split()
    return words[2] if len(words) == 3 and words[1].lower() == "as" else None


def dockerfile_stage(name: str) -> list[Instruction]:
    """The stage named ``name`` (``FROM ... AS name``)."""
    named = {stage_name(stage): stage for stage in dockerfile_stages()}
    if name not in named:
        raise KeyError(f"no stage {name!r} in the Dockerfile; stages: {list(named)}")
    return named[name]


def image_instructions(target: str) -> list[Instruction]:
    """What builds the image of ``target``: the instructions of its ancestor stages (a stage
    ``FROM`` another stage inherits its settings) and then its own, FROM lines left out."""
    stage = dockerfile_stage(target)
    parent = stage[0].args.split()[0]
    names = {stage_name(s) for s in dockerfile_stages()}
    inherited = image_instructions(parent) if parent in names else []
    return inherited + stage[1:]


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    """The ``ENV`` variables they set (``KEY=value`` form), later ones winning."""
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def read_pins(path: Path) -> dict[str, str]:
    """A pip requirements file of ``name==version`` lines as ``{canonical name: version}``
    (comments and blank lines skipped); ``ValueError`` naming any other line."""
    pins = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version or any(c in name for c in "[]<>=!~;@ "):
            raise ValueError(f"{path.name}:{number}: not a name==version pin: {raw!r}")
        pins[canonicalize_name(name)] = version
    return pins


def dockerfile_stages(path: Path = DOCKERFILE) -> list[list[Instruction]]:
    """The Dockerfile's instructions, one list per stage (each starting with its FROM)."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    stages: list[list[Instruction]] = []
    for text in logical:
        keyword, _, args = text.partition(" ")
        instruction = Instruction(keyword.upper(), " ".join(args.split()))
        if instruction.keyword == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


def healthcheck_of(stage: list[Instruction]) -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options (``{"interval": "10s", ...}``) and its exec-form command."""
    [check] = [i for i in stage if i.keyword == "HEALTHCHECK"]
    options = dict(re.findall(r"--([a-z-]+)=(\S+)", check.args))
    command = check.args[check.args.index("CMD ") + len("CMD ") :]
    return options, Instruction("CMD", command).exec_form()


def makefile_pip_commands() -> list[list[str]]:
    """The pip commands of ``make install``'s recipe as make would run them (``make -n`` with
    pyproject.toml taken as changed), each without the interpreter in front: ``["pip",
    "install", ...]``."""
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "-W", "pyproject.toml", "install"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    commands = []
    for line in result.stdout.splitlines():
        words = shlex.split(line)
        if words[1:3] == ["-m", "pip"]:
            commands.append(words[2:])
    return commands


# ---- Prometheus and Grafana -----------------------------------------------------------------

# PromQL words that look like metric names but are not (aggregations' modifiers, set and
# grouping operators, offsets, the bool modifier).
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names or part of a string, a duration or a Grafana variable."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # ranges and subqueries
    text = re.sub(r"\$\w+", "", text)  # Grafana variables
    # Grouping modifiers and their label lists, so `sum by (le) (...)` reads as a call.
    text = re.sub(r"\s*\b(by|without|on|ignoring|group_left|group_right)\s*(\([^)]*\))?", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)\s*(\()?", text):
        name, call = match.groups()
        if not call and name.lower() not in _PROMQL_WORDS:
            names.add(name)
    return names


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of deploy/prometheus/alerts.yml."""
    groups = load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    """The one provisioned Grafana dashboard."""
    [path] = (GRAFANA_DIR / "dashboards").glob("*.json")
    return json.loads(path.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    """The dashboard's panels, rows' nested panels included, rows themselves left out."""
    panels = []
    for panel in dashboard()["panels"]:
        panels.extend(panel.get("panels", []))
        if panel["type"] != "row":
            panels.append(panel)
    return panels


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    return [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]
