"""The import graph of ``model/`` and ``app/``, read from the source: no cycles, data flowing one
way (``app`` imports ``model``, never the reverse; inside ``model``, each room imports only the
rooms below it), and no torch in the HTTP layer.

Every ``import`` counts, including those inside functions: an import moved into a function
hides a cycle from the interpreter, not from this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "app")
# The only app module that may touch pixels: it decodes request bytes into images.
PIL_ALLOWED = {"app.images"}
# The rooms (subpackages) of model/ and the other rooms each may import: from the network up
# to evaluation and training. The commands (model.train, model.evaluate, model.quantize,
# model.convert, model.predict) and the package itself (model/__init__.py) sit above every
# room, so no room imports them.
ROOMS = {
    "model.network": set(),
    "model.weights": {"model.network"},
    "model.data": {"model.network"},
    "model.inference": {"model.network", "model.weights"},
    "model.evaluation": {"model.network", "model.inference", "model.data"},
    "model.training": {
        "model.network",
        "model.weights",
        "model.data",
        "model.inference",
        "model.evaluation",
    },
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def _imported(name: str, path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (``from a import b`` gives ``a`` and
    ``a.b``, since ``b`` may be a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def _graph() -> dict[str, set[str]]:
    """Each module of model/ and app/ to the modules of model/ and app/ it imports."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        explicit = {n for n in _imported(name, path) if n in modules and n != name}
        # Importing ``a.b`` runs ``a/__init__.py`` first, unless ``a`` is this module's own
        # package, which is already running when this module is imported.
        implicit = {
            ".".join(target.split(".")[:i])
            for target in explicit
            for i in range(1, target.count(".") + 1)
        }
        graph[name] = (explicit | (implicit & modules.keys()) - _ancestors(name)) - {name}
    return graph


def _ancestors(name: str) -> set[str]:
    """The packages that hold module ``name`` (``a.b.c``: ``a`` and ``a.b``)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    # Includes a package's part importing the package back while the package's __init__
    # imports the part (lufficc/SSD's data/datasets/__init__.py shows the one direction).
    assert _cycles(_graph()) == []


def _room(name: str) -> str:
    """The room of a module of model/ (``model.network.ssd``: ``model.network``); a command
    or the package itself is its own."""
    return ".".join(name.split(".")[:2])


def _room_offenders(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Each module of a room to the modules it imports from rooms it may not import."""
    offenders = {}
    for name, targets in graph.items():
        room = _room(name)
        if room not in ROOMS:
            continue
        allowed = ROOMS[room] | {room}
        wrong = sorted(t for t in targets if t.startswith("model") and _room(t) not in allowed)
        if wrong:
            offenders[name] = wrong
    return offenders


def test_every_module_of_model_is_in_a_room_or_a_command():
    commands = {
        "model", "model.train", "model.evaluate", "model.quantize", "model.convert",
        "model.predict", "model.export",
    }  # fmt: skip
    outside = [n for n in _modules() if n.startswith("model") and n not in commands]
    assert [n for n in outside if _room(n) not in ROOMS] == []


def test_each_room_of_model_imports_only_the_rooms_below_it():
    assert _room_offenders(_graph()) == {}
    # The check itself: a room importing one above it, or a command, is named.
    graph = _graph()
    graph["model.network.ssd"] = graph["model.network.ssd"] | {"model.inference.detector"}
    graph["model.weights.checkpoint"] = graph["model.weights.checkpoint"] | {"model.train"}
    assert _room_offenders(graph) == {
        "model.network.ssd": ["model.inference.detector"],
        "model.weights.checkpoint": ["model.train"],
    }


def test_model_never_imports_app():
    offenders = {
        name: sorted(n for n in _imported(name, path) if n.split(".")[0] == "app")
        for name, path in _modules().items()
        if name.split(".")[0] == "model"
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_app_holds_no_torch_and_no_pil_outside_images():
    offenders = {}
    for name, path in _modules().items():
        if name.split(".")[0] != "app":
            continue
        roots = {n.split(".")[0] for n in _imported(name, path)}
        banned = {"torch", "torchvision"} | ({"PIL"} if name not in PIL_ALLOWED else set())
        if roots & banned:
            offenders[name] = sorted(roots & banned)
    assert offenders == {}


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert _cycles(graph) == expected


def test_imports_inside_functions_count(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from model.data import voc\n    import torch.nn\n")
    assert {"model.data", "model.data.voc", "torch.nn"} <= _imported("model.x", source)


def test_a_cycle_hidden_in_a_function_is_found_in_this_tree():
    # Today's tree has none, so check the finder on the graph with one edge added.
    graph = _graph()
    graph["model.network.ssd"] = graph["model.network.ssd"] | {"model.inference.detector"}
    assert any({"model.network.ssd", "model.inference.detector"} <= set(c) for c in _cycles(graph))
