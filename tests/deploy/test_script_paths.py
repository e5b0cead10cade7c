"""Every script that the repository names exists where it is named: paths under `scripts/` and
`python -m scripts.<package>.<module>` invocations in the docs, CI, deployment files, code and
tests; no script edits `sys.path` to find the project; docs/ARCHITECTURE.md lists each script."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
_PATH = re.compile(r"(?<![\w/.-])scripts/[\w./-]+\.(?:sh|py)\b")
_MODULE = re.compile(r"-m (scripts(?:\.\w+)+)")


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached"],
        cwd=REPO_ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    wanted = (".md", ".py", ".sh", ".yml", ".yaml", ".toml", ".example")
    names = {"Dockerfile", "run"}
    return [
        REPO_ROOT / name
        for name in listed
        if name
        and not name.startswith(("runs/", "models/"))
        and (name.endswith(wanted) or Path(name).name in names)
        and (REPO_ROOT / name).is_file()
        and REPO_ROOT / name != Path(__file__).resolve()  # its own example of an old path
    ]


def named_scripts(files: list[Path]) -> dict[str, set[str]]:
    """{path or module named: the files that name it}."""
    named: dict[str, set[str]] = {}
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        where = (
            file.relative_to(REPO_ROOT).as_posix() if file.is_relative_to(REPO_ROOT) else str(file)
        )
        for found in _PATH.findall(text):
            named.setdefault(found, set()).add(where)
        for module in _MODULE.findall(text):
            named.setdefault(module.replace(".", "/") + ".py", set()).add(where)
    return named


def _exists(path: str) -> bool:
    """A script, or for `python -m scripts.ci.<name>` the package `scripts.ci`."""
    return (REPO_ROOT / path).is_file() or (
        path.endswith(".py") and (REPO_ROOT / path[: -len(".py")] / "__init__.py").is_file()
    )


def test_every_script_named_exists() -> None:
    missing = {
        path: sorted(where)
        for path, where in named_scripts(_tracked_text_files()).items()
        if not _exists(path)
    }
    assert missing == {}


def test_no_script_edits_sys_path() -> None:
    editing = [
        path.relative_to(REPO_ROOT).as_posix()
        for path in (REPO_ROOT / "scripts").rglob("*.py")
        if "sys.path" in path.read_text(encoding="utf-8")
    ]
    assert editing == []


def test_the_architecture_page_lists_every_script() -> None:
    doc = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = doc.split("\n## Scripts\n", 1)[1].split("\n## ", 1)[0]
    unlisted = [
        path.relative_to(REPO_ROOT).as_posix()
        for path in sorted((REPO_ROOT / "scripts").rglob("*"))
        if path.suffix in (".sh", ".py")
        and path.name != "__init__.py"
        and "__pycache__" not in path.parts
        and f"`{path.name}`" not in section
    ]
    assert unlisted == []


def test_the_check_finds_an_old_path(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("run `scripts/benchmark.py`, then `python -m scripts.ci.smoke_http`\n")
    named = named_scripts([doc])
    assert set(named) == {"scripts/benchmark.py", "scripts/ci/smoke_http.py"}
    assert not (REPO_ROOT / "scripts" / "benchmark.py").exists()
