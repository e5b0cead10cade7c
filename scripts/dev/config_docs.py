"""The configuration reference, generated from the field descriptions of `app.settings.Settings`.

Writes `.env.example` and the settings tables in README.md (the settings marked for it) and
docs/DEPLOYMENT.md (every setting), between
`<!-- settings:begin -->` and `<!-- settings:end -->`, so that the documentation says what the
code does. The settings are listed by group (`app.settings.SETTING_GROUPS`): in the Markdown one
table per group under a heading one level below the one that holds the block, with the group's
purpose; in `.env.example` a comment banner per group. `--check` changes nothing and exits 1
when any of them differs (the tests run it).

    python -m scripts.dev.config_docs [--check]
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any

from app.settings import SETTING_GROUPS, SettingGroup, Settings, group_of

REPO_ROOT = Path(__file__).resolve().parents[2]

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"
README = REPO_ROOT / "README.md"
# README: the settings a first reader needs (marked in app/settings.py); DEPLOYMENT: every one.
TABLE_FILES = (README, REPO_ROOT / "docs" / "DEPLOYMENT.md")
ENV_EXAMPLE = REPO_ROOT / ".env.example"
MiB = 1024 * 1024

_ENV_HEADER = """\
# Configuration of the inference service (`app/`), generated from app/settings.py by
# `python -m scripts.dev.config_docs`: edit the field descriptions there, not this file.
# Every variable is optional; the values below are the defaults. Copy to `.env` (read from the
# working directory) or set them in the environment / docker-compose. Invalid values stop the
# service at start-up with a clear error.
"""


def variable(name: str) -> str:
    return f"CXR_{name.upper()}"


def env_value(default: Any) -> str:
    """The default as an environment variable would spell it ("" for unset)."""
    if default is None:
        return ""
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def shown_default(default: Any) -> str:
    if default is None:
        return "unset"
    text = f"`{env_value(default)}`"
    is_size = isinstance(default, int) and not isinstance(default, bool) and default >= MiB
    if is_size and default % MiB == 0:
        text += f" ({default // MiB} MiB)"
    return text


def fields(readme_only: bool = False) -> list[tuple[str, Any, str]]:
    """(variable, default, description) of each setting, group by group."""
    return [row for _, rows in grouped(readme_only) for row in rows]


def grouped(readme_only: bool = False) -> list[tuple[SettingGroup, list[tuple[str, Any, str]]]]:
    """The groups that hold a setting to show, in their order, each with its settings' rows in
    the order `Settings` declares them."""
    by_group: dict[str, list[tuple[str, Any, str]]] = {g.key: [] for g in SETTING_GROUPS}
    for name, info in Settings.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        try:
            group = group_of(name)
        except KeyError:
            raise SystemExit(
                f"Settings.{name} has no group: give it json_schema_extra=in_group(...) in "
                "app/settings.py"
            ) from None
        if readme_only and not extra.get("readme"):
            continue
        description = " ".join((info.description or "").split())
        if not description:
            raise SystemExit(f"Settings.{name} has no description: add one in app/settings.py")
        default = info.get_default(call_default_factory=True)
        by_group[group.key].append((variable(name), default, description))
    return [(g, by_group[g.key]) for g in SETTING_GROUPS if by_group[g.key]]


def markdown_table(readme_only: bool = False, level: int = 3) -> str:
    """One table per group, each under a heading of `level` with the group's purpose."""
    blocks = []
    for group, rows in grouped(readme_only):
        lines = [f"{'#' * level} {group.title}", "", group.purpose, ""]
        lines += ["| variable | default | meaning |", "|---|---|---|"]
        for name, default, description in rows:
            meaning = description.replace("|", "/")
            lines.append(f"| `{name}` | {shown_default(default)} | {meaning} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def env_example() -> str:
    blocks = [_ENV_HEADER]
    for group, rows in grouped():
        blocks.append(f"# ==== {group.title} ====\n# {group.purpose}\n")
        for name, default, description in rows:
            comment = textwrap.wrap(description, 98, break_on_hyphens=False)
            blocks.append(
                "\n".join(f"# {line}" for line in comment) + f"\n{name}={env_value(default)}\n"
            )
    return "\n".join(blocks)


def heading_level(text: str) -> int:
    """One below the last Markdown heading before the settings block (2 when there is none)."""
    level = 1
    fenced = False
    for line in text.split(BEGIN, 1)[0].splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
    return level + 1


def with_table(text: str, table: str, path: Path) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def expected_files() -> dict[Path, str]:
    files = {ENV_EXAMPLE: env_example()}
    for path in TABLE_FILES:
        text = path.read_text(encoding="utf-8")
        table = markdown_table(readme_only=path == README, level=heading_level(text))
        files[path] = with_table(text, table, path)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 on a difference"
    )
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        current = path.read_text(encoding="utf-8") if path.is_file() else ""
        if current == text:
            continue
        stale.append(path.relative_to(REPO_ROOT))
        if not args.check:
            path.write_text(text, encoding="utf-8")
    if args.check and stale:
        names = ", ".join(str(p) for p in stale)
        print(f"out of date with app/settings.py: {names}; run python -m scripts.dev.config_docs")
        return 1
    for path in stale:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
