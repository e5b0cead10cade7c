"""The selection protocol's test halves and synthetic-shift set (`docs/SELECTION_PROTOCOL.md`)."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

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


# --- the operating-point recipe, the gates, the decision rule and the ledger's refusals ---


def _figures(spec: float, sens: float, auc: float, ece: float, sens_hi: float = 1.0) -> dict:
    return {
        "specificity": {"value": spec, "ci95": [spec - 0.05, min(spec + 0.05, 1.0)]},
        "recall": {"value": sens, "ci95": [sens - 0.03, sens_hi]},
        "roc_auc": {"value": auc, "ci95": [auc - 0.01, auc + 0.01]},
        "ece": ece,
    }


def test_the_recipe_recovers_a_known_temperature_and_bias() -> None:
    rng = np.random.default_rng(3)
    n = 4000
    z_true = rng.normal(0, 3, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z_true))).astype(int)
    # the network's logits are the true log-odds stretched by 2 and shifted by +1
    logits = np.stack([np.zeros(n), 2.0 * (z_true - 1.0)], axis=1)
    shifted = {"copy": logits.copy()}
    point = selection.fit_operating_point(labels, logits, shifted)
    assert point["temperature"] == pytest.approx(2.0, rel=0.1)
    assert point["logit_bias"][1] == pytest.approx(1.0, abs=0.15)
    p = point["calibrated"](logits)
    assert (p[labels == 1] >= point["threshold"]).mean() >= 0.95
    assert (p[labels == 1] > point["threshold"] + 1e-12).mean() < 0.95 + 2 / labels.sum()


def test_shift_figures_measure_the_change_against_the_clean_images() -> None:
    labels = np.array([0, 0, 1, 1])
    clean = np.array([0.1, 0.2, 0.8, 0.9])
    figures = selection.shift_figures(
        labels, clean, {"up": clean + 0.05, "same": clean.copy()}, 0.5
    )
    assert figures["conditions"]["up"]["mean_abs_change"] == pytest.approx(0.05)
    assert figures["conditions"]["same"]["mean_abs_change"] == 0.0
    assert figures["summary"]["mean_abs_change"] == pytest.approx(0.025)
    assert figures["summary"]["specificity_worst"]["value"] == 1.0


def test_the_decision_rule_needs_every_criterion_and_prefers_specificity() -> None:
    base = _figures(spec=0.80, sens=0.98, auc=0.973, ece=0.13)
    scorings = {
        "incumbent": base,
        "good": _figures(spec=0.86, sens=0.96, auc=0.975, ece=0.07),
        "better": _figures(spec=0.90, sens=0.95, auc=0.970, ece=0.05),
        "unsafe": _figures(spec=0.97, sens=0.92, auc=0.980, ece=0.04),
        "uncalibrated": _figures(spec=0.95, sens=0.97, auc=0.980, ece=0.14),
        "no_gain": _figures(spec=0.82, sens=0.98, auc=0.980, ece=0.05),
    }
    result = selection.decide(scorings, "incumbent")
    assert result["winner_sha256"] == "better"
    assert not result["checks"]["unsafe"]["sensitivity_0.93"]
    assert not result["checks"]["uncalibrated"]["ece_not_worse"]
    assert not result["checks"]["no_gain"]["specificity_gain_0.03"]
    assert all(result["checks"]["good"].values())
    worse = {"incumbent": base, "x": _figures(spec=0.81, sens=0.98, auc=0.97, ece=0.1)}
    assert selection.decide(worse, "incumbent")["winner_sha256"] is None


def test_b_vetoes_on_safety_only() -> None:
    incumbent = _figures(spec=0.80, sens=0.98, auc=0.973, ece=0.13)
    fine = selection.veto(_figures(spec=0.88, sens=0.96, auc=0.975, ece=0.05), incumbent)
    assert not any(fine.values())
    low = selection.veto(
        _figures(spec=0.9, sens=0.92, auc=0.975, ece=0.05, sens_hi=0.96), incumbent
    )
    assert low["sensitivity_below_0.93"]
    unsure = selection.veto(_figures(0.9, 0.935, 0.975, 0.05, sens_hi=0.945), incumbent)
    assert unsure["sensitivity_upper_ci_below_0.95"]
    assert selection.veto(_figures(0.78, 0.99, 0.99, 0.05), incumbent)[
        "specificity_below_incumbent"
    ]


def test_from_round_two_a_winner_must_also_match_the_shipped_model() -> None:
    """The amendment: beating 1.0.0 is not enough once a successor ships; a candidate also needs
    the shipped model's specificity on A and no higher ECE, and B vetoes one below its
    specificity on B."""
    base = _figures(spec=0.80, sens=0.98, auc=0.973, ece=0.13)
    shipped = _figures(spec=0.89, sens=0.97, auc=0.98, ece=0.11)
    scorings = {
        "incumbent": base,
        "beats_1_0_only": _figures(spec=0.86, sens=0.96, auc=0.975, ece=0.07),
        "beats_both": _figures(spec=0.92, sens=0.96, auc=0.975, ece=0.07),
        "sharper_but_worse_calibrated": _figures(spec=0.95, sens=0.96, auc=0.98, ece=0.12),
    }
    assert selection.decide(scorings, "incumbent")["winner_sha256"] == (
        "sharper_but_worse_calibrated"
    )
    result = selection.decide(scorings, "incumbent", shipped)
    assert result["winner_sha256"] == "beats_both"
    assert not result["checks"]["beats_1_0_only"]["specificity_not_below_shipped"]
    assert not result["checks"]["sharper_but_worse_calibrated"]["ece_not_above_shipped"]
    winner = _figures(spec=0.85, sens=0.97, auc=0.98, ece=0.05)
    assert not any(selection.veto(winner, base).values())
    assert selection.veto(winner, base, shipped)["specificity_below_shipped"]


def test_the_shipped_models_figures_come_from_its_own_ledger_line() -> None:
    ledger = [
        _line("score_a", model_sha256="s", figures={"specificity": 0.89}),
        _line("score_b", model_sha256="s", figures={"specificity": 0.81}),
    ]
    assert selection.shipped_figures(ledger, "s", "inc", "score_b") == {"specificity": 0.81}
    assert selection.shipped_figures(ledger, "inc", "inc", "score_a") is None
    with pytest.raises(selection.ProtocolError):
        selection.shipped_figures(ledger, "unknown", "inc", "score_a")


def _line(event: str, **fields: object) -> dict:
    return {"event": event, **fields}


def test_a_round_takes_at_most_three_candidates_and_never_a_rescored_one() -> None:
    ledger = [_line("round", round=1)] + [
        _line("declare", round=1, model_sha256=f"m{i}") for i in range(3)
    ]
    with pytest.raises(selection.ProtocolError, match="already has 3"):
        selection.check_declarable(ledger, "m9", 1)
    with pytest.raises(selection.ProtocolError, match="already declared"):
        selection.check_declarable(ledger, "m0", 1)
    later = [*ledger, _line("score_a", round=1, model_sha256="m0"), _line("round", round=2)]
    with pytest.raises(selection.ProtocolError, match="earlier round"):
        selection.check_declarable(later, "m0", 2)
    selection.check_declarable(later, "m9", 2)


def test_a_is_scored_only_after_a_committed_declaration_and_once() -> None:
    declared = [_line("round", round=1), _line("declare", round=1, model_sha256="m1")]
    with pytest.raises(selection.ProtocolError, match="not in the committed ledger"):
        selection.check_scorable_on_a(declared, declared[:1], "m1", "inc")
    assert selection.check_scorable_on_a(declared, declared, "m1", "inc") == 1
    assert selection.check_scorable_on_a(declared, [], "inc", "inc") == 1  # the baseline
    scored = [*declared, _line("score_a", round=1, model_sha256="m1")]
    with pytest.raises(selection.ProtocolError, match="already scored on A"):
        selection.check_scorable_on_a(scored, scored, "m1", "inc")
    decided = [*declared, _line("decision", round=1, winner_sha256=None)]
    with pytest.raises(selection.ProtocolError, match="is decided"):
        selection.check_scorable_on_a(decided, decided, "m1", "inc")
    with pytest.raises(selection.ProtocolError, match="no round"):
        selection.check_scorable_on_a([], [], "inc", "inc")


def test_b_is_scored_once_for_the_winner_and_the_incumbent_only() -> None:
    with pytest.raises(selection.ProtocolError, match="no decision"):
        selection.check_scorable_on_b([_line("round", round=1)], "inc", "inc")
    ledger = [_line("decision", round=1, winner_sha256="m1")]
    selection.check_scorable_on_b(ledger, "m1", "inc")
    selection.check_scorable_on_b(ledger, "inc", "inc")
    with pytest.raises(selection.ProtocolError, match="only the winner"):
        selection.check_scorable_on_b(ledger, "m2", "inc")
    twice = [*ledger, _line("score_b", model_sha256="m1")]
    with pytest.raises(selection.ProtocolError, match="one scoring on B"):
        selection.check_scorable_on_b(twice, "m1", "inc")


def test_the_committed_ledger_keeps_the_protocol() -> None:
    """Every line of `models/selection_ledger.jsonl` is in order: A only for declared candidates
    (or the baseline), at most 3 declared a round, B only after a decision and once a model."""
    path = REPO_ROOT / selection.LEDGER_FILE
    if not path.is_file():
        pytest.skip("no selection ledger yet")
    ledger = selection.read_ledger(path.read_text())
    seen: list[dict] = []
    for line in ledger:
        assert re.fullmatch(r"[0-9a-f]{40}", line["protocol"])
        if line["event"] == "declare":
            selection.check_declarable(seen, line["model_sha256"], line["round"])
        elif line["event"] == "score_a":
            baseline = line["model_sha256"] if line["role"] == "incumbent" else ""
            selection.check_scorable_on_a(seen, seen, line["model_sha256"], baseline)
        elif line["event"] == "score_b":
            baseline = line["model_sha256"] if line["role"] == "incumbent" else ""
            selection.check_scorable_on_b(seen, line["model_sha256"], baseline)
        seen.append(line)


def _site_answers(tmp_path: Path, threshold: float, drop: int = 0) -> Path:
    """pneumonia-predict rows for half B's images (p rising with the label, the site's call)."""
    import csv

    with (REPO_ROOT / selection.HALVES_FILE).open() as f:
        rows = [r for r in csv.DictReader(f) if r["half"] == "B"][drop:]
    path = tmp_path / "b.csv"
    with path.open("w", newline="") as f:
        fields = ["path", "label", "p_NORMAL", "p_PNEUMONIA", "threshold", "warnings"]
        w = csv.DictWriter(f, fieldnames=[*fields, "error_code", "error"])
        w.writeheader()
        for i, r in enumerate(rows):
            p = (0.6 if r["label"] == "PNEUMONIA" else 0.2) + (i % 7) / 100
            w.writerow({"path": f"/data/test/{r['label']}/{r['filename']}",
                        "label": "PNEUMONIA" if p >= threshold else "NORMAL",
                        "p_NORMAL": 1 - p, "p_PNEUMONIA": p, "threshold": threshold,
                        "warnings": "", "error_code": "", "error": ""})  # fmt: skip
    return path


def test_the_site_arm_reads_exactly_half_b_under_the_profiles_threshold(tmp_path: Path) -> None:
    profile = tmp_path / "site_profile.json"
    profile.write_text(json.dumps({"operating": {"threshold": 0.4}, "recalibration": {}}))
    figures = selection.site_arm_figures(_site_answers(tmp_path, 0.4), profile)
    assert figures["n"] == 315 and figures["recall"]["value"] == 1.0
    assert figures["specificity"]["value"] == 1.0
    with pytest.raises(selection.ProtocolError, match="exactly half B"):
        selection.site_arm_figures(_site_answers(tmp_path, 0.4, drop=1), profile)
    with pytest.raises(selection.ProtocolError, match="not made with this site profile"):
        selection.site_arm_figures(_site_answers(tmp_path, 0.5), profile)
