"""The configuration reference (README, docs/DEPLOYMENT.md, .env.example) is generated from the
settings' own descriptions, group by group, and is up to date."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import SETTING_GROUPS, Settings, group_of
from scripts.dev import config_docs

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_generated_files_are_up_to_date() -> None:
    assert config_docs.main(["--check"]) == 0


def test_every_setting_has_a_group() -> None:
    keys = [g.key for g in SETTING_GROUPS]
    assert len(set(keys)) == len(keys)
    for name in Settings.model_fields:
        assert group_of(name) in SETTING_GROUPS, name
    # and every group holds a setting (no empty heading in the reference)
    assert {group_of(name) for name in Settings.model_fields} == set(SETTING_GROUPS)


def test_each_group_is_a_table_under_its_heading_with_its_purpose() -> None:
    deployment = (REPO_ROOT / "docs" / "DEPLOYMENT.md").read_text(encoding="utf-8")
    block = deployment.split(config_docs.BEGIN, 1)[1].split(config_docs.END, 1)[0]
    sections = block.split("\n### ")[1:]
    assert [s.split("\n", 1)[0] for s in sections] == [g.title for g in SETTING_GROUPS]
    for group, section in zip(SETTING_GROUPS, sections, strict=True):
        assert f"\n\n{group.purpose}\n\n| variable | default | meaning |\n" in section
        names = [n for n in Settings.model_fields if group_of(n) == group]
        rows = [line for line in section.splitlines() if line.startswith("| `CXR_")]
        assert [r.split("`")[1] for r in rows] == [f"CXR_{n.upper()}" for n in names]
    env = (REPO_ROOT / ".env.example").read_text(encoding="utf-8")
    for group in SETTING_GROUPS:
        assert f"# ==== {group.title} ====\n# {group.purpose}\n" in env


def test_a_setting_without_a_group_stops_the_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_group(name: str) -> object:
        raise KeyError(name)

    monkeypatch.setattr(config_docs, "group_of", no_group)
    with pytest.raises(SystemExit, match="has no group"):
        config_docs.main(["--check"])


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
    original = config_docs.grouped

    def edited(readme_only: bool = False) -> list[tuple[object, list[tuple[str, object, str]]]]:
        groups = original(readme_only)
        group, rows = groups[0]
        name, default, description = rows[0]
        return [(group, [(name, default, description + " Changed."), *rows[1:]]), *groups[1:]]

    monkeypatch.setattr(config_docs, "grouped", edited)
    assert config_docs.main(["--check"]) == 1
