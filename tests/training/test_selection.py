"""The selection protocol's test halves and synthetic-shift set (`docs/SELECTION_PROTOCOL.md`)."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import numpy as np

from tests.support.realdata import DATA_DIR, REPO_ROOT, requires_data
from training import selection, shift

PROTOCOL = REPO_ROOT / "docs" / "SELECTION_PROTOCOL.md"


def _row(patient: str, sha: str, label: str = "NORMAL", name: str = "") -> dict[str, str]:
    return {
        "split": "test",
        "label": label,
        "filename": name or f"{patient}-{sha}.jpeg",
        "patient_id": patient,
        "sha256": sha,
    }


def test_halves_follow_the_written_rule() -> None:
    rows = [_row(f"IM-{i:04d}", f"s{i}") for i in range(40)]
    for r in selection.test_halves(rows):
        digest = hashlib.sha256(("cxr-test-halves-v6" + r["patient_id"]).encode()).hexdigest()
        assert r["half"] == ("B" if int(digest, 16) % 2 else "A")
        assert r["group"] == r["patient_id"]


def test_patients_sharing_an_image_land_in_one_half_under_the_smallest_id() -> None:
    rows = [_row("p3", "x"), _row("p1", "y"), _row("p2", "x"), _row("p2", "z"), _row("p1", "z")]
    rows += [_row(f"q{i}", f"only{i}") for i in range(30)]
    out = selection.test_halves([*rows, {**rows[0], "split": "train"}])
    linked = [r for r in out if r["patient_id"] in {"p1", "p2", "p3"}]
    assert {r["group"] for r in linked} == {"p1"}
    assert len({r["half"] for r in linked}) == 1
    assert len(out) == len(rows)  # train rows are not part of either half
    assert {r["half"] for r in out} == {"A", "B"}


@requires_data
def test_the_committed_halves_are_the_rule_on_the_manifest() -> None:
    with (DATA_DIR / "manifest.csv").open() as f:
        rows = selection.test_halves(csv.DictReader(f))
    committed = list(csv.DictReader((REPO_ROOT / selection.HALVES_FILE).open()))
    assert committed == rows
    counts = {(h, lab): 0 for h in "AB" for lab in ("NORMAL", "PNEUMONIA")}
    for r in rows:
        counts[(r["half"], r["label"])] += 1
    assert counts == {
        ("A", "NORMAL"): 118,
        ("A", "PNEUMONIA"): 191,
        ("B", "NORMAL"): 116,
        ("B", "PNEUMONIA"): 199,
    }


def test_the_protocol_names_the_committed_halves_file() -> None:
    digest = hashlib.sha256((REPO_ROOT / selection.HALVES_FILE).read_bytes()).hexdigest()
    assert re.search(rf"sha256\s+`{digest}`", PROTOCOL.read_text())


def test_every_condition_is_deterministic_and_keeps_the_contract_shape() -> None:
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(10, 245, 48), (48, 1))
    images = np.clip(ramp[None, :, :, None] + rng.normal(0, 8, (3, 48, 48, 1)), 0, 255)
    images = images.astype(np.uint8)
    for condition in shift.CONDITIONS:
        first, again = shift.render(condition, images), shift.render(condition, images)
        assert first.shape == images.shape and first.dtype == np.uint8, condition.name
        np.testing.assert_array_equal(first, again, err_msg=condition.name)
        assert np.abs(first.astype(int) - images).mean() > 0.05, condition.name


def test_the_shift_set_keeps_at_least_two_families_out_of_training() -> None:
    held_out = {c.family for c in shift.CONDITIONS if c.held_out}
    assert {"voi", "j2k"} <= held_out
    assert len({c.name for c in shift.CONDITIONS}) == len(shift.CONDITIONS)
    text = PROTOCOL.read_text()
    for family in {c.family for c in shift.CONDITIONS}:
        assert f"| {family} |" in text, family


def test_rendered_sets_are_cached_by_content(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
    first = shift.render_all(images, tmp_path, progress=False)
    assert len(list(tmp_path.glob("shift-*.npy"))) == len(shift.CONDITIONS)
    again = shift.render_all(images, tmp_path, progress=False)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
