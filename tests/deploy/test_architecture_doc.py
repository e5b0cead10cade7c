"""docs/ARCHITECTURE.md names every module, package and test folder: the tree of `app/` and the
table of `tests/` are checked against the files, so that the page cannot drift again."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DOC = REPO_ROOT / "docs" / "ARCHITECTURE.md"
_ENTRY = re.compile(r"^((?:│   |    )*)(?:├── |└── )(\S+)")


def tree_paths(doc: str) -> set[str]:
    """The paths the `app/` tree block names ("app/pacs/scp.py", "app/pacs/")."""
    block = doc.split("```\napp/\n", 1)[1].split("```", 1)[0]
    paths: set[str] = set()
    parents: list[str] = ["app/"]
    for line in block.splitlines():
        match = _ENTRY.match(line)
        if not match:
            continue
        depth = len(match.group(1)) // 4
        del parents[depth + 1 :]
        path = parents[depth] + match.group(2)
        paths.add(path)
        if path.endswith("/"):
            parents.append(path)
    return paths


def missing_from_doc(root: Path, doc: str) -> list[str]:
    """Modules, packages and test folders under `root` that the page does not name."""
    named = tree_paths(doc)
    expected = set()
    for path in (root / "app").rglob("*"):
        relative = path.relative_to(root).as_posix()
        if "__pycache__" in relative or "/static/" in relative:
            continue
        if path.is_dir():
            expected.add(relative + "/")
        elif path.suffix == ".py" and path.name != "__init__.py":
            expected.add(relative)
    missing = sorted(expected - named)
    for folder in sorted((root / "tests").rglob("*")):
        relative = folder.relative_to(root).as_posix() + "/"
        if folder.is_dir() and "__pycache__" not in relative and f"`{relative}`" not in doc:
            missing.append(relative)
    return missing


def test_the_page_names_every_module_package_and_test_folder() -> None:
    assert missing_from_doc(REPO_ROOT, DOC.read_text(encoding="utf-8")) == []


def test_the_check_fails_for_a_module_or_test_folder_added_without_a_line(tmp_path: Path) -> None:
    doc = DOC.read_text(encoding="utf-8")
    for path in tree_paths(doc):
        target = tmp_path / path
        if path.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("")
    (tmp_path / "tests").mkdir()
    assert missing_from_doc(tmp_path, doc) == []
    (tmp_path / "app" / "pacs" / "audit.py").write_text("")
    (tmp_path / "tests" / "app" / "audit").mkdir(parents=True)
    assert missing_from_doc(tmp_path, doc) == ["app/pacs/audit.py", "tests/app/audit/"]
