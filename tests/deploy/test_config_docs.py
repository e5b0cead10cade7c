"""The configuration reference (README, docs/DEPLOYMENT.md, .env.example) is generated from the
settings' own descriptions, and is up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from app.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "config_docs", REPO_ROOT / "scripts" / "config_docs.py"
)
assert _spec is not None and _spec.loader is not None
config_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(config_docs)


def test_the_generated_files_are_up_to_date() -> None:
    assert config_docs.main(["--check"]) == 0


def test_every_setting_is_in_each_file_with_its_default() -> None:
    env = (REPO_ROOT / ".env.example").read_text(encoding="utf-8")
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    deployment = (REPO_ROOT / "docs" / "DEPLOYMENT.md").read_text(encoding="utf-8")
    for name, info in Settings.model_fields.items():
        variable = f"CXR_{name.upper()}"
        assert f"\n{variable}={config_docs.env_value(info.get_default())}\n" in env
        assert f"| `{variable}` |" in deployment
        marked = isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("readme")
        assert (f"| `{variable}` |" in readme) == bool(marked), variable


def test_the_env_example_parses_to_the_defaults(tmp_path: Path) -> None:
    """Settings read from the generated file equal the defaults: the file says what is true."""
    env_file = tmp_path / ".env"
    env_file.write_text((REPO_ROOT / ".env.example").read_text(encoding="utf-8"), encoding="utf-8")
    assert Settings(_env_file=env_file) == Settings(_env_file=None)  # type: ignore[call-arg]


def test_a_changed_description_makes_the_check_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    original = config_docs.fields

    def edited(readme_only: bool = False) -> list[tuple[str, object, str]]:
        rows = original(readme_only)
        name, default, description = rows[0]
        return [(name, default, description + " Changed."), *rows[1:]]

    monkeypatch.setattr(config_docs, "fields", edited)
    assert config_docs.main(["--check"]) == 1
