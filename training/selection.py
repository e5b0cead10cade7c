"""The selection protocol's tools (`docs/SELECTION_PROTOCOL.md`): the test halves, the short-list
figures on validation and the synthetic-shift set, and the append-only ledger through which a
candidate is declared, scored on half A, chosen, and scored once on half B.

    python -m training.selection halves --manifest ../shared/data/chest_xray/manifest.csv
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from collections.abc import Iterable
from pathlib import Path

HALVES_SALT = "cxr-test-halves-v6"
HALVES_FILE = Path("models/test_halves.csv")
HALVES_COLUMNS = ("filename", "label", "patient_id", "group", "half", "sha256")


def test_halves(manifest_rows: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """The official test split divided by patient into selection half A and report half B.

    Images are grouped by `patient_id`; groups that share an image sha256 are merged (a duplicate
    image must not sit in both halves); a group goes to B when
    `int(sha256(HALVES_SALT + smallest patient_id of the group), 16) % 2 == 1`, else to A.
    """
    rows = [r for r in manifest_rows if r["split"] == "test"]
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_with_sha: dict[str, str] = {}
    for r in rows:
        find(r["patient_id"])
        other = first_with_sha.setdefault(r["sha256"], r["patient_id"])
        a, b = find(other), find(r["patient_id"])
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[str, list[str]] = {}
    for r in rows:
        members.setdefault(find(r["patient_id"]), []).append(r["patient_id"])
    out = []
    for r in rows:
        group = min(members[find(r["patient_id"])])
        digest = hashlib.sha256((HALVES_SALT + group).encode()).hexdigest()
        half = "B" if int(digest, 16) % 2 == 1 else "A"
        out.append({**{k: r[k] for k in HALVES_COLUMNS if k in r}, "group": group, "half": half})
    out.sort(key=lambda r: (r["label"], r["filename"]))
    return out


def write_halves(rows: list[dict[str, str]], path: Path) -> str:
    """Write the halves CSV; returns its sha256 (of the file's bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HALVES_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_halves(path: Path = HALVES_FILE) -> dict[str, str]:
    """filename (as `LABEL/filename`) -> half, from the committed list."""
    with path.open() as f:
        return {f"{r['label']}/{r['filename']}": r["half"] for r in csv.DictReader(f)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("halves", help="write the test halves list and print its sha256")
    h.add_argument("--manifest", type=Path, required=True)
    h.add_argument("--out", type=Path, default=HALVES_FILE)
    args = p.parse_args(argv)

    if args.command == "halves":
        with args.manifest.open() as f:
            rows = test_halves(csv.DictReader(f))
        sha = write_halves(rows, args.out)
        counts: dict[tuple[str, str], int] = {}
        for r in rows:
            counts[(r["half"], r["label"])] = counts.get((r["half"], r["label"]), 0) + 1
        print(
            f"[halves] {len(rows)} test images, {len({r['group'] for r in rows})} groups: "
            + ", ".join(f"{h} {lab} {n}" for (h, lab), n in sorted(counts.items()))
        )
        print(f"[halves] {args.out} sha256 {sha}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
