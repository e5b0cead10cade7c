"""Test tiers as markers, set from what each test uses (so no test can forget its own): `process`
for tests whose module (or a `tests.*` helper it imports) starts a process: the service, Orthanc,
PostgreSQL, DCMTK and the other peers, a script, `browser` for those that drive Chromium,
`realdata` for those that need the real X-rays. `slow` is set by hand on the training tests."""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.realdata import DATA_MISSING

# What starts a process of its own, in a test module or a `tests.*` helper it imports: the service
# (uvicorn), a peer (Orthanc, PostgreSQL, DCMTK, dciodvfy, the MLLP peers), a script.
_STARTS_PROCESS = re.compile(
    r"\b(?:subprocess|Popen|UvicornProcess|ServiceProcess|uvicorn_serving_tiny_model)\b"
)


@functools.cache
def _process_names(path: Path) -> frozenset[str]:
    """The top-level functions and classes of a `tests.*` helper module that start a process:
    those whose code names one of the starters, or (transitively) another such definition of the
    module or of a helper it imports them from."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    starters = set(_imported_process_names(tree))
    bodies = {
        node.name: ast.unparse(node)
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }
    found: set[str] = set()
    while True:
        pattern = "|".join(map(re.escape, sorted(starters | found)))
        more = {
            name
            for name, body in bodies.items()
            if name not in found
            and (
                _STARTS_PROCESS.search(body) or (pattern and re.search(rf"\b(?:{pattern})\b", body))
            )
        }
        if not more:
            return frozenset(found)
        found |= more


def _imported_process_names(tree: ast.Module) -> set[str]:
    """Names imported from `tests.*` helper modules that start processes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests."):
            spec = importlib.util.find_spec(node.module)
            if spec is None or not spec.origin:
                continue
            starters = _process_names(Path(spec.origin))
            names |= {a.asname or a.name for a in node.names if a.name in starters}
    return names


@functools.cache
def _starts_processes(path: Path) -> bool:
    """Whether a test module starts processes itself or through what it takes from a helper."""
    source = path.read_text(encoding="utf-8")
    return bool(_STARTS_PROCESS.search(source) or _imported_process_names(ast.parse(source)))


def _module_starts_processes(module: ModuleType | None) -> bool:
    path = getattr(module, "__file__", None)
    return path is not None and _starts_processes(Path(path))


_FIXTURE_BY_NAME = re.compile(r"getfixturevalue\(\s*[\"'](\w+)[\"']")


def _fixture_starts_processes(item: pytest.Item, name: str, seen: set[str]) -> bool:
    """Whether a fixture the test uses (from a conftest or a plugin) starts a process, or asks
    for one by name that does (`request.getfixturevalue`)."""
    if name in seen:
        return False
    seen.add(name)
    info = getattr(item, "_fixtureinfo", None)
    definitions = info.name2fixturedefs.get(name) if info is not None else None
    if not definitions:
        return False
    func = definitions[-1].func
    try:
        source = inspect.getsource(func)
        module_path = Path(inspect.getfile(func))
    except (OSError, TypeError):
        return False
    in_tests = module_path.is_relative_to(Path(__file__).parent)
    if in_tests and (
        _STARTS_PROCESS.search(source) or func.__name__ in _process_names(module_path)
    ):
        return True
    return any(
        _fixture_starts_processes(item, other, seen) for other in _FIXTURE_BY_NAME.findall(source)
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        fixtures = getattr(item, "fixturenames", ())
        seen: set[str] = set()
        if _module_starts_processes(module) or any(
            _fixture_starts_processes(item, name, seen) for name in fixtures
        ):
            item.add_marker(pytest.mark.process)
        if "browser" in fixtures or (module is not None and hasattr(module, "open_offline")):
            item.add_marker(pytest.mark.browser)
        if any(m.kwargs.get("reason") == DATA_MISSING for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.realdata)
