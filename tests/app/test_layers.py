"""The service's packages are layered by pipeline stage, and imports run one way only:

    base (settings, contract, errors, evaluation, audit)
        <- imaging <- model <- serving <- pacs <- ops <- http <- main

A module may import its own package and the layers below it, never one above; and no two modules
import each other, directly or round a longer circle. Read from the source with `ast`, so a lazy
import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "app"

# Lowest first. `app.site_validation` (the site-validation tool) and `app.cli` (offline tools)
# drive the whole service, and `app.testing` (what tests and tools share to start it) only ever
# starts it, so they sit on top.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("app.settings", "app.contract", "app.errors", "app.evaluation", "app.audit"),
    ("app.imaging",),
    ("app.model",),
    ("app.serving",),
    ("app.pacs",),
    ("app.ops",),
    ("app.http",),
    ("app.main", "app.__main__"),
    ("app.site_validation", "app.testing", "app.cli"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for rank, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def app_imports(path: Path) -> set[str]:
    """The `app.*` modules a source file imports (a `from app.x import y` names `app.x.y` when
    that is a module of its own, else `app.x`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "app"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "app":
                continue
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else node.module)
    return found


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (APP / relative).with_suffix(".py").is_file() or (
        APP / relative / "__init__.py"
    ).is_file()


def import_graph(root: Path = APP) -> dict[str, set[str]]:
    return {module_name(p): app_imports(p) for p in sorted(root.rglob("*.py"))}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in graph.items()
        for target in sorted(targets)
        if target != "app" and layer_of(target) > layer_of(module)
    ]


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of module imports (one representative path per strongly connected group)."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target in graph and state.get(target) is None:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_every_module_is_in_a_layer() -> None:
    for module in import_graph():
        if module != "app":
            layer_of(module)


def test_imports_only_run_down_the_layers() -> None:
    assert upward_imports(import_graph()) == []


def test_no_import_circle() -> None:
    assert import_cycles(import_graph()) == []


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("imaging/formats.py", "from app.http.errors import error_json\n"),
        ("serving/prediction.py", "from app.ops.metrics import ServiceMetrics\n"),
        ("errors.py", "def f() -> None:\n    from app.imaging import dicom\n"),
    ],
)
def test_an_upward_import_is_caught(tmp_path: Path, module: str, line: str) -> None:
    """The checks above can fail: a copy of the tree with one upward import added is caught."""
    import shutil

    copy = tmp_path / "app"
    shutil.copytree(APP, copy, ignore=shutil.ignore_patterns("static", "__pycache__"))
    target = copy / module
    target.write_text(target.read_text(encoding="utf-8") + "\n" + line, encoding="utf-8")
    graph = {
        module_name(APP / p.relative_to(copy)): app_imports(p) for p in sorted(copy.rglob("*.py"))
    }
    assert upward_imports(graph) != []


def test_a_circle_is_caught() -> None:
    graph = {"app.a": {"app.b"}, "app.b": {"app.c"}, "app.c": {"app.a"}, "app.d": set()}
    assert import_cycles(graph) == [["app.a", "app.b", "app.c", "app.a"]]
