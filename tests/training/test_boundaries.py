"""What training may depend on, and that every declared command exists."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("path", sorted((ROOT / "training").glob("*.py")), ids=lambda p: p.name)
def test_training_takes_only_the_contract_schema_from_the_service(path: Path) -> None:
    """The artifact's schema is the one thing the two sides share; sharing any other code (a
    resize table, a decoder) would let one bug hide on both sides of the parity test."""
    from_app = {m for m in _imported_modules(path) if m == "app" or m.startswith("app.")}
    # ... the evaluation arithmetic (labels and scores, never pixels: the model card's figures and
    # a site's report must be the same sums) and the DICOM test-file writer, which a measurement
    # tool uses to encode inputs (it decodes nothing, so it cannot hide a decoding bug on both
    # sides).
    assert from_app <= {"app.contract", "app.evaluation", "app.testing.dicom_files"}, from_app


def _scripts() -> dict[str, str]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)["project"]["scripts"]


@pytest.mark.parametrize(("name", "target"), sorted(_scripts().items()))
def test_every_declared_command_points_at_a_function(name: str, target: str) -> None:
    module_name, _, attribute = target.partition(":")
    if module_name.startswith("training."):
        pytest.importorskip("matplotlib", reason="the train extra is not installed")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attribute, None)), f"{name} -> {target}"
