"""The selection protocol's tools (`docs/SELECTION_PROTOCOL.md`): the test halves, the short-list
figures on validation and the synthetic-shift set, and the append-only ledger through which a
candidate is declared, scored on half A, chosen, and scored once on half B.

    python -m training.selection halves --manifest ../shared/data/chest_xray/manifest.csv
    python -m training.selection calibrate --run runs/c7       # after training.train
    python -m training.selection shortlist --model runs/c7/models/c7.json ...
    python -m training.selection round --reason "..."
    python -m training.selection declare --model runs/c7/models/c7.json   # then commit
    python -m training.selection score-a --model ... --data-dir ../shared/data/chest_xray
    python -m training.selection decide
    python -m training.selection score-b --model ... --data-dir ../shared/data/chest_xray

Every step that reads test images refuses what the protocol does not allow (exit code 2).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import subprocess
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.contract import Preprocessing
from app.evaluation import linked_groups
from training import shift
from training.data import CLASSES, Record, read_split
from training.dataset import load_images
from training.metrics import (
    evaluate_scores,
    expected_calibration_error,
    fit_logistic,
    format_summary,
    point_metrics,
    positive_log_odds,
    select_threshold,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

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
    groups = linked_groups([(r["patient_id"], "sha:" + r["sha256"]) for r in rows])
    members: dict[int, list[str]] = {}
    for group_index, r in zip(groups, rows, strict=True):
        members.setdefault(group_index, []).append(r["patient_id"])
    out = []
    for group_index, r in zip(groups, rows, strict=True):
        group = min(members[group_index])
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


# ---------------------------------------------------------------------------------------------
# Figures on validation (T0) and the synthetic-shift set (T1)

PROTOCOL_FILE = Path("docs/SELECTION_PROTOCOL.md")
LEDGER_FILE = Path("models/selection_ledger.jsonl")
# The protocol's baseline of every round (the rule on A, the gates, the veto) ...
INCUMBENT = Path("models/1.0.0/pneumonia_cxr.json")
# ... and the model shipped now, which from round 2 a winner must also match (the amendment).
SHIPPED = Path("models/pneumonia_cxr.json")
TARGET_SENSITIVITY = 0.95
MAX_CANDIDATES_PER_ROUND = 3
BOOTSTRAP = 2000


def shift_figures(
    labels: np.ndarray, clean: np.ndarray, shifted: dict[str, np.ndarray], threshold: float
) -> dict[str, Any]:
    """Per T1 condition and summarised: ROC AUC, sensitivity and specificity at `threshold`, ECE,
    and the change of p(PNEUMONIA) against the clean image (mean and 95th percentile)."""
    per: dict[str, dict[str, float]] = {}
    for name, p in shifted.items():
        m = point_metrics(labels, p, threshold)
        change = np.abs(p - clean)
        per[name] = {
            "roc_auc": round(m["roc_auc"], 4),
            "sensitivity": round(m["recall"], 4),
            "specificity": round(m["specificity"], 4),
            "ece": round(expected_calibration_error(labels, p), 4),
            "mean_abs_change": round(float(change.mean()), 4),
            "p95_abs_change": round(float(np.percentile(change, 95)), 4),
            "mean_abs_change_normals": round(float(change[labels == 0].mean()), 4),
        }

    def mean(key: str) -> float:
        return round(float(np.mean([v[key] for v in per.values()])), 4)

    def worst(key: str, lowest: bool = True) -> dict[str, Any]:
        name = (min if lowest else max)(per, key=lambda n: per[n][key])
        return {"condition": name, "value": per[name][key]}

    pooled = np.concatenate(list(shifted.values()))
    pooled_labels = np.tile(labels, len(shifted))
    return {
        "conditions": per,
        "summary": {
            "specificity_mean": mean("specificity"),
            "specificity_worst": worst("specificity"),
            "sensitivity_mean": mean("sensitivity"),
            "sensitivity_worst": worst("sensitivity"),
            "roc_auc_mean": mean("roc_auc"),
            "roc_auc_worst": worst("roc_auc"),
            "mean_abs_change": round(
                float(np.mean([np.abs(p - clean).mean() for p in shifted.values()])), 4
            ),
            "mean_abs_change_worst": worst("mean_abs_change", lowest=False),
            "ece_pooled": round(expected_calibration_error(pooled_labels, pooled), 4),
        },
    }


def t0_t1_figures(
    labels: np.ndarray,
    groups: list[str],
    clean: np.ndarray,
    shifted: dict[str, np.ndarray],
    threshold: float,
) -> dict[str, Any]:
    return {
        "t0": evaluate_scores(labels, clean, threshold, groups, seed=0),
        "t1": shift_figures(labels, clean, shifted, threshold),
    }


def fit_operating_point(
    labels: np.ndarray, clean_logits: np.ndarray, shifted_logits: dict[str, np.ndarray]
) -> dict[str, Any]:
    """The protocol's recipe: temperature and positive-class bias by maximum likelihood on clean
    T0 and every T1 rendering pooled; then the highest threshold with sensitivity >= 0.95 on
    clean T0."""
    z_clean = positive_log_odds(clean_logits)
    z_all = np.concatenate([z_clean, *[positive_log_odds(v) for v in shifted_logits.values()]])
    y_all = np.tile(labels, 1 + len(shifted_logits)).astype(np.float64)
    slope, bias = fit_logistic(z_all, y_all)
    temperature = 1.0 / slope

    def calibrated(logits: np.ndarray) -> np.ndarray:
        z = positive_log_odds(logits) / temperature + bias
        return 1.0 / (1.0 + np.exp(-z))

    clean = calibrated(clean_logits)
    threshold = select_threshold(labels, clean, TARGET_SENSITIVITY)
    raw_clean = 1.0 / (1.0 + np.exp(-z_clean))
    return {
        "temperature": temperature,
        "logit_bias": [0.0, bias],
        "threshold": threshold,
        "calibrated": calibrated,
        "calibration": {
            "method": "temperature",
            "temperature": round(temperature, 6),
            "logit_bias": [0.0, round(bias, 6)],
            "fitted_on": f"validation and its {len(shifted_logits)} synthetic-shift renderings "
            "(docs/SELECTION_PROTOCOL.md)",
            "val_ece_before": round(expected_calibration_error(labels, raw_clean), 4),
            "val_ece_after": round(expected_calibration_error(labels, clean), 4),
        },
    }


def keras_shift_logits(
    model: Any, images: np.ndarray, spec: Preprocessing, cache_dir: Path | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    from training.train import keras_logits

    clean = keras_logits(model, images, spec)
    rendered = shift.render_all(images, cache_dir)
    return clean, {name: keras_logits(model, x, spec) for name, x in rendered.items()}


def calibrate_run(run: Path, cache_dir: Path | None) -> dict[str, Any]:
    """Apply the protocol's operating-point recipe to a trained run: rewrites its summary.json
    (calibration, decision, validation figures) and adds the T0/T1 figures, before export."""
    import keras

    import training.models  # noqa: F401  (registers the custom layers for loading)
    from training.train import Slice

    summary = json.loads((run / "summary.json").read_text())
    spec = Preprocessing.model_validate(summary["preprocessing"])
    val = Slice.load(read_split(run / "split.csv")["val"], cache_dir, spec)
    model = keras.models.load_model(run / "best.keras", compile=False)
    clean_logits, shifted_logits = keras_shift_logits(model, val.images, spec, cache_dir)
    point = fit_operating_point(val.labels, clean_logits, shifted_logits)
    calibrated = point["calibrated"]
    clean = calibrated(clean_logits)
    shifted = {k: calibrated(v) for k, v in shifted_logits.items()}
    arrays: dict[str, Any] = {"clean": clean_logits, "labels": val.labels, **shifted_logits}
    np.savez(run / "shift_logits.npz", **arrays)
    summary["calibration"] = point["calibration"]
    summary["decision"] = {
        "threshold": round(point["threshold"], 6),
        "target_sensitivity": TARGET_SENSITIVITY,
        "chosen_on": "validation",
    }
    summary["validation_metrics"] = evaluate_scores(
        val.labels, clean, point["threshold"], val.groups, seed=summary.get("seed", 0)
    )
    summary["shift_metrics"] = shift_figures(val.labels, clean, shifted, point["threshold"])
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    validation_plots(run)
    return summary


def validation_plots(run: Path) -> None:
    """Validation ROC and reliability at the recipe's operating point, from `shift_logits.npz`
    and `summary.json` (replacing training's, which were drawn at its own temperature)."""
    from training import plots

    summary = json.loads((run / "summary.json").read_text())
    saved = np.load(run / "shift_logits.npz")
    labels, logits = saved["labels"], saved["clean"]
    cal = summary["calibration"]
    z = positive_log_odds(logits)
    raw = 1.0 / (1.0 + np.exp(-z))
    clean = 1.0 / (1.0 + np.exp(-(z / cal["temperature"] + cal["logit_bias"][1])))
    threshold = summary["decision"]["threshold"]
    plots.roc(labels, clean, threshold, run / "val_roc.png", title="Validation ROC")
    plots.calibration_curve(labels, raw, clean, run / "val_reliability.png")


def onnx_t0_t1(meta_path: Path, cache_dir: Path | None) -> dict[str, Any]:
    """T0/T1 figures of an exported model at its own operating point, through ONNX Runtime with
    the metadata's calibration, on 1.0.0's validation split."""
    from app.contract import load_metadata
    from training.evaluate import predict_logits
    from training.train import Slice

    meta = load_metadata(meta_path)
    split = meta_path.with_name(f"{meta_path.stem}.split.csv")
    val = Slice.load(read_split(split)["val"], cache_dir)
    onnx_path = meta_path.parent / meta.onnx_file

    def probs(images: np.ndarray) -> np.ndarray:
        logits = predict_logits(meta, onnx_path, images, batch_size=64)
        return meta.calibrated_probabilities(logits)[:, meta.positive_index]

    clean = probs(val.images)
    shifted = {k: probs(v) for k, v in shift.render_all(val.images, cache_dir).items()}
    figures = t0_t1_figures(val.labels, val.groups, clean, shifted, meta.decision.threshold)
    figures["validation_rows_sha256"] = _validation_rows_sha(split)
    return figures


def _validation_rows_sha(split: Path) -> str:
    rows = [line for line in split.read_text().splitlines() if line.startswith("val,")]
    return hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()


def shortlist_gates(candidate: dict[str, Any], incumbent: dict[str, Any]) -> dict[str, bool]:
    """G1-G4 of the protocol."""
    c0, i0 = candidate["t0"], incumbent["t0"]
    c1, i1 = candidate["t1"]["summary"], incumbent["t1"]["summary"]
    return {
        "G1_t0_roc_auc": c0["roc_auc"]["value"] >= i0["roc_auc"]["value"] - 0.005,
        "G2_t1_mean_abs_change": c1["mean_abs_change"] <= i1["mean_abs_change"],
        "G3_t1_worst_roc_auc": c1["roc_auc_worst"]["value"] >= i1["roc_auc_worst"]["value"] - 0.005,
        "G4_same_validation": candidate["validation_rows_sha256"]
        == incumbent["validation_rows_sha256"],
    }


# ---------------------------------------------------------------------------------------------
# The ledger and the test halves


class ProtocolError(RuntimeError):
    """A step the protocol does not allow."""


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    return done.stdout.strip()


def protocol_commit() -> str:
    """The commit of the protocol in force; refuses while the file has uncommitted changes."""
    if _git("status", "--porcelain", "--", str(PROTOCOL_FILE)):
        raise ProtocolError(f"{PROTOCOL_FILE} has uncommitted changes")
    return _git("log", "-1", "--format=%H", "--", str(PROTOCOL_FILE))


def checked_halves() -> dict[str, str]:
    """The committed halves, after checking their sha256 against the protocol's."""
    digest = hashlib.sha256((REPO_ROOT / HALVES_FILE).read_bytes()).hexdigest()
    if digest not in (REPO_ROOT / PROTOCOL_FILE).read_text():
        raise ProtocolError(f"{HALVES_FILE} (sha256 {digest}) is not the protocol's list")
    return read_halves(REPO_ROOT / HALVES_FILE)


def read_ledger(text: str | None = None) -> list[dict[str, Any]]:
    if text is None:
        path = REPO_ROOT / LEDGER_FILE
        text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def committed_ledger() -> list[dict[str, Any]]:
    try:
        return read_ledger(_git("show", f"HEAD:{LEDGER_FILE}"))
    except subprocess.CalledProcessError:
        return []


def append(entry: dict[str, Any]) -> dict[str, Any]:
    """Append one line (never rewrite): the entry with the time and the protocol's commit."""
    line = {
        "event": entry.pop("event"),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "protocol": protocol_commit(),
        **entry,
    }
    with (REPO_ROOT / LEDGER_FILE).open("a") as f:
        f.write(json.dumps(line, sort_keys=False) + "\n")
    return line


def current_round(ledger: list[dict[str, Any]]) -> int:
    rounds = [e["round"] for e in ledger if e["event"] == "round"]
    if not rounds:
        raise ProtocolError("no round is open: `python -m training.selection round --reason ...`")
    return int(max(rounds))


def model_identity(meta_path: Path) -> dict[str, str]:
    from app.contract import load_metadata

    meta = load_metadata(meta_path)
    return {
        "name": f"{meta.name} {meta.version}",
        "model_sha256": meta.sha256,
        "metadata_sha256": hashlib.sha256(meta_path.read_bytes()).hexdigest(),
    }


def check_declarable(ledger: list[dict[str, Any]], sha: str, round_: int) -> None:
    declared = [e for e in ledger if e["event"] == "declare" and e["round"] == round_]
    if any(e["model_sha256"] == sha for e in declared):
        raise ProtocolError("this model is already declared in this round")
    if len(declared) >= MAX_CANDIDATES_PER_ROUND:
        raise ProtocolError(f"round {round_} already has {MAX_CANDIDATES_PER_ROUND} candidates")
    if any(e["event"] == "score_a" and e["model_sha256"] == sha for e in ledger):
        raise ProtocolError("this model was scored on A in an earlier round")


def check_scorable_on_a(
    ledger: list[dict[str, Any]], committed: list[dict[str, Any]], sha: str, incumbent: str
) -> int:
    round_ = current_round(ledger)
    if any(
        e["event"] == "score_a" and e["round"] == round_ and e["model_sha256"] == sha
        for e in ledger
    ):
        raise ProtocolError(f"this model was already scored on A in round {round_}")
    if any(e["event"] == "decision" and e["round"] == round_ for e in ledger):
        raise ProtocolError(f"round {round_} is decided; open a new round")
    if sha != incumbent and not any(
        e["event"] == "declare" and e["round"] == round_ and e["model_sha256"] == sha
        for e in committed
    ):
        raise ProtocolError("the model's declaration is not in the committed ledger: commit it")
    return round_


def check_scorable_on_b(ledger: list[dict[str, Any]], sha: str, incumbent: str) -> None:
    if any(e["event"] == "score_b" and e["model_sha256"] == sha for e in ledger):
        raise ProtocolError("this model already has its one scoring on B")
    decisions = [e for e in ledger if e["event"] == "decision"]
    if not decisions:
        raise ProtocolError("no decision on A yet: B is read only after one")
    if sha != incumbent and not any(e.get("winner_sha256") == sha for e in decisions):
        raise ProtocolError("only the winner of a decision on A (or 1.0.0) is scored on B")


def decide(
    scorings: dict[str, dict[str, Any]], incumbent: str, shipped: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The protocol's rule on A. `scorings`: model sha256 -> its A figures (incumbent included);
    `shipped`: the A figures of the model shipped now, when that is not the incumbent (round 2
    and later: a winner must also reach its specificity and not exceed its ECE)."""
    base = scorings[incumbent]

    def v(m: dict[str, Any], key: str) -> float:
        return float(m[key]["value"]) if isinstance(m[key], dict) else float(m[key])

    checks: dict[str, dict[str, bool]] = {}
    for sha, m in scorings.items():
        if sha == incumbent:
            continue
        checks[sha] = {
            "specificity_gain_0.03": v(m, "specificity") >= v(base, "specificity") + 0.03,
            "sensitivity_0.93": v(m, "recall") >= 0.93,
            "sensitivity_within_0.04": v(m, "recall") >= v(base, "recall") - 0.04,
            "roc_auc_within_0.01": v(m, "roc_auc") >= v(base, "roc_auc") - 0.01,
            "ece_not_worse": v(m, "ece") <= v(base, "ece"),
        }
        if shipped is not None:
            checks[sha]["specificity_not_below_shipped"] = v(m, "specificity") >= v(
                shipped, "specificity"
            )
            checks[sha]["ece_not_above_shipped"] = v(m, "ece") <= v(shipped, "ece")
    qualified = [sha for sha, c in checks.items() if all(c.values())]
    qualified.sort(
        key=lambda s: (
            -v(scorings[s], "specificity"),
            v(scorings[s], "ece"),
            -v(scorings[s], "roc_auc"),
        )
    )
    return {"winner_sha256": qualified[0] if qualified else None, "checks": checks}


def veto(
    winner: dict[str, Any], incumbent: dict[str, Any], shipped: dict[str, Any] | None = None
) -> dict[str, bool]:
    """The protocol's safety veto on B: any True vetoes. `shipped`: the B figures of the model
    shipped now, when that is not the incumbent (its ledger line; never re-scored)."""
    vetoes = {
        "sensitivity_below_0.93": winner["recall"]["value"] < 0.93,
        "sensitivity_upper_ci_below_0.95": winner["recall"]["ci95"][1] < 0.95,
        "roc_auc_below_incumbent_minus_0.02": winner["roc_auc"]["value"]
        < incumbent["roc_auc"]["value"] - 0.02,
        "specificity_below_incumbent": winner["specificity"]["value"]
        < incumbent["specificity"]["value"],
    }
    if shipped is not None:
        vetoes["specificity_below_shipped"] = (
            winner["specificity"]["value"] < shipped["specificity"]["value"]
        )
    return vetoes


def shipped_figures(
    ledger: list[dict[str, Any]], shipped_sha: str, incumbent_sha: str, event: str
) -> dict[str, Any] | None:
    """The shipped model's figures on a half from its own ledger line (`score_a`, `score_b`), or
    None while the shipped model is the incumbent itself."""
    if shipped_sha == incumbent_sha:
        return None
    lines = [e for e in ledger if e["event"] == event and e["model_sha256"] == shipped_sha]
    if not lines:
        raise ProtocolError(f"the shipped model has no {event} line in the ledger")
    return dict(lines[-1]["figures"])


def site_arm_figures(
    answers_csv: Path, profile_path: Path, positive: str = "PNEUMONIA"
) -> dict[str, Any]:
    """Amendment 2: half B's figures under a site profile, from the rows `pneumonia-predict` wrote
    for half B's images with the profile loaded (the service's own recalibration and threshold:
    p_<positive> is the site's probability, the threshold the profile's)."""
    halves = checked_halves()
    with (REPO_ROOT / HALVES_FILE).open() as f:
        rows = {f"{r['label']}/{r['filename']}": r for r in csv.DictReader(f) if r["half"] == "B"}
    with answers_csv.open() as f:
        answers = list(csv.DictReader(f))
    by_key = {"/".join(Path(a["path"]).parts[-2:]): a for a in answers}
    if set(by_key) != set(rows) or len(answers) != len(rows):
        raise ProtocolError("the answers are not exactly half B's images, each once")
    if any(a["error_code"] for a in answers):
        raise ProtocolError("some of half B's images were refused")
    assert all(halves[k] == "B" for k in rows)
    keys = sorted(rows)
    profile = json.loads(profile_path.read_text())
    threshold = float(profile["operating"]["threshold"])
    if any(float(by_key[k]["threshold"]) != threshold for k in keys):
        raise ProtocolError("the answers were not made with this site profile loaded")
    labels = np.array([CLASSES.index(rows[k]["label"]) for k in keys])
    p = np.array([float(by_key[k][f"p_{positive}"]) for k in keys])
    called = np.array([by_key[k]["label"] == positive for k in keys])
    figures = evaluate_scores(labels, p, threshold, [rows[k]["group"] for k in keys], BOOTSTRAP)
    if not np.array_equal(called, p >= threshold):
        raise ProtocolError("the service's labels disagree with its probabilities and threshold")
    figures["profile_sha256"] = hashlib.sha256(profile_path.read_bytes()).hexdigest()
    figures["recalibration"] = profile["recalibration"]
    return figures


def score_half(
    meta_path: Path, data_dir: Path, half: str, plots_dir: Path | None = None
) -> dict[str, Any]:
    """A model's figures on one test half at its own operating point (bootstrap by group), with
    its ROC, confusion-matrix and sample-grid plots in `plots_dir` from the same pass."""
    from app.contract import load_metadata
    from training.evaluate import predict_logits

    halves = checked_halves()
    with (REPO_ROOT / HALVES_FILE).open() as f:
        rows = [r for r in csv.DictReader(f) if r["half"] == half]
    records = [
        Record(str(data_dir / "test" / r["label"] / r["filename"]), CLASSES.index(r["label"]),
               r["group"], r["sha256"])
        for r in rows
    ]  # fmt: skip
    assert all(halves[f"{r['label']}/{r['filename']}"] == half for r in rows)
    meta = load_metadata(meta_path)
    images = load_images(records, meta.preprocessing, progress_every=0)
    logits = predict_logits(meta, meta_path.parent / meta.onnx_file, images)
    p = meta.calibrated_probabilities(logits)[:, meta.positive_index]
    labels = np.array([r.label for r in records])
    figures = evaluate_scores(
        labels, p, meta.decision.threshold, [r.patient_id for r in records], BOOTSTRAP, seed=0
    )
    if plots_dir is not None:
        from training import plots

        plots_dir.mkdir(parents=True, exist_ok=True)
        title = f"{meta.version}, test half {half} ({len(records)} images)"
        plots.roc(labels, p, meta.decision.threshold, plots_dir / "roc.png", title=f"ROC, {title}")
        plots.confusion_matrix(
            figures["confusion_matrix"],  # type: ignore[arg-type]
            plots_dir / "confusion_matrix.png",
            title=f"{title} at threshold {meta.decision.threshold:.3f}",
        )
        plots.sample_grid(images, labels, plots_dir / "sample_grid.png", seed=0, scores=p)
        plots.reliability(
            labels, {meta.version: p}, plots_dir / "reliability.png", f"Reliability, {title}"
        )
    return figures


STABILITY_GAMMAS = (0.7, 1.4)


def stability(meta_paths: list[Path], data_dir: Path, step: int = 1) -> dict[str, Any]:
    """Mean |change of p(PNEUMONIA)| when the uploads go through a tone curve: each test X-ray as
    uploaded (its JPEG file) against the same image with gamma applied, stored as a lossless PNG,
    both through the contract's preprocessing (bit-identical to the service's, by the parity
    tests) and the model's calibration. No labels are read."""
    import io
    import tempfile

    from PIL import Image

    from app.contract import load_metadata
    from training.data import load_kaggle_directory
    from training.evaluate import predict_logits
    from training.preprocessing import load_image

    paths = [Path(r.path) for r in load_kaggle_directory(data_dir, "test")][::step]
    out: dict[str, Any] = {
        "n_images": len(paths),
        "step": step,
        "uploads": "each test JPEG, and the same image through 255 * (x / 255) ** gamma as PNG",
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        variants: dict[str, list[Path]] = {"original": paths}
        for g in STABILITY_GAMMAS:
            variants[f"gamma_{g}"] = []
            for i, path in enumerate(paths):
                grey = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
                bent = np.clip(np.rint(255.0 * (grey / 255.0) ** g), 0, 255).astype(np.uint8)
                target = Path(tmp) / f"{g}-{i}.png"
                buf = io.BytesIO()
                Image.fromarray(bent).save(buf, format="PNG")
                target.write_bytes(buf.getvalue())
                variants[f"gamma_{g}"].append(target)
        for meta_path in meta_paths:
            meta = load_metadata(meta_path)
            onnx_path = meta_path.parent / meta.onnx_file
            p = {}
            for name, files in variants.items():
                images = np.stack([load_image(f, meta.preprocessing) for f in files])
                logits = predict_logits(meta, onnx_path, images, batch_size=64)
                p[name] = meta.calibrated_probabilities(logits)[:, meta.positive_index]
            out["models"][f"{meta.name} {meta.version}"] = {
                "sha256": meta.sha256,
                **{
                    f"mean_abs_change_{name}": round(float(np.abs(v - p["original"]).mean()), 4)
                    for name, v in p.items()
                    if name != "original"
                },
            }
    return out


def _print_t0_t1(name: str, figures: dict[str, Any]) -> None:
    t0, t1 = figures["t0"], figures["t1"]["summary"]
    print(
        f"[shortlist] {name}: T0 AUROC {t0['roc_auc']['value']:.4f} sens "
        f"{t0['recall']['value']:.3f} spec {t0['specificity']['value']:.3f} ECE {t0['ece']:.3f} | "
        f"T1 spec mean {t1['specificity_mean']:.3f} worst {t1['specificity_worst']['value']:.3f} "
        f"({t1['specificity_worst']['condition']}), sens mean {t1['sensitivity_mean']:.3f}, "
        f"AUROC worst {t1['roc_auc_worst']['value']:.4f}, mean |dp| {t1['mean_abs_change']:.4f}, "
        f"ECE {t1['ece_pooled']:.3f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cache-dir", type=Path, default=Path("runs/.cache"))
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("halves", help="write the test halves list and print its sha256")
    h.add_argument("--manifest", type=Path, required=True)
    h.add_argument("--out", type=Path, default=HALVES_FILE)
    c = sub.add_parser("calibrate", help="the operating-point recipe on a trained run")
    c.add_argument("--run", type=Path, required=True)
    s = sub.add_parser("shortlist", help="T0/T1 figures and gates of exported models")
    s.add_argument("--model", type=Path, nargs="+", required=True, help="metadata JSON files")
    s.add_argument("--incumbent", type=Path, default=INCUMBENT)
    s.add_argument("--out", type=Path, default=Path("runs/shortlist.json"))
    r = sub.add_parser("round", help="open a round of scorings on A")
    r.add_argument("--reason", required=True, help="what changed since the last round")
    d = sub.add_parser("declare", help="declare a short-listed candidate for A (then commit)")
    d.add_argument("--model", type=Path, required=True)
    d.add_argument("--shortlist", type=Path, default=Path("runs/shortlist.json"))
    a = sub.add_parser("score-a", help="score a declared candidate (or 1.0.0) on half A")
    a.add_argument("--model", type=Path, required=True)
    a.add_argument("--data-dir", type=Path, required=True)
    a.add_argument("--incumbent", type=Path, default=INCUMBENT)
    dd = sub.add_parser("decide", help="apply the decision rule to this round's A scorings")
    dd.add_argument("--shipped", type=Path, default=SHIPPED)
    b = sub.add_parser("score-b", help="the one scoring on half B (winner and 1.0.0)")
    b.add_argument("--model", type=Path, required=True)
    b.add_argument("--data-dir", type=Path, required=True)
    b.add_argument("--incumbent", type=Path, default=INCUMBENT)
    b.add_argument("--shipped", type=Path, default=SHIPPED)
    sa = sub.add_parser("site-arm", help="amendment 2: half B under a site profile fitted on A")
    sa.add_argument("--model", type=Path, default=SHIPPED)
    sa.add_argument("--profile", type=Path, required=True, help="site_profile.json (from A)")
    sa.add_argument("--answers", type=Path, required=True, help="pneumonia-predict CSV of B")
    st = sub.add_parser("stability", help="answers under tone curves of the uploads (no labels)")
    st.add_argument("--model", type=Path, nargs="+", required=True)
    st.add_argument("--data-dir", type=Path, required=True)
    st.add_argument("--out", type=Path, default=Path("runs/selection/stability.json"))
    rec = sub.add_parser("record", help="copy a model's ledger figures (A, B) into its metadata")
    rec.add_argument("--model", type=Path, required=True)
    rec.add_argument("--stability", type=Path, help="the stability JSON to record beside them")
    args = p.parse_args(argv)

    try:
        return _run(args)
    except ProtocolError as exc:
        print(f"[selection] REFUSED: {exc}", flush=True)
        return 2


def _run(args: argparse.Namespace) -> int:
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
    elif args.command == "calibrate":
        summary = calibrate_run(args.run, args.cache_dir)
        cal = summary["calibration"]
        print(
            f"[calibrate] T {cal['temperature']:.4f}, bias {cal['logit_bias'][1]:+.4f}, threshold "
            f"{summary['decision']['threshold']:.4f}; validation ECE {cal['val_ece_before']:.4f} "
            f"-> {cal['val_ece_after']:.4f}"
        )
        _print_t0_t1(
            str(args.run),
            {"t0": summary["validation_metrics"], "t1": summary["shift_metrics"]},
        )
    elif args.command == "shortlist":
        incumbent = onnx_t0_t1(args.incumbent, args.cache_dir)
        _print_t0_t1(str(args.incumbent), incumbent)
        table: dict[str, Any] = {
            "incumbent": {**model_identity(args.incumbent), **incumbent},
            "candidates": [],
        }
        for path in args.model:
            figures = onnx_t0_t1(path, args.cache_dir)
            gates = shortlist_gates(figures, incumbent)
            _print_t0_t1(str(path), figures)
            print(f"[shortlist]   gates {gates}", flush=True)
            table["candidates"].append(
                {"path": str(path), **model_identity(path), **figures, "gates": gates}
            )
        table["candidates"].sort(key=lambda c: -c["t1"]["summary"]["specificity_mean"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=1))
        eligible = [c["name"] for c in table["candidates"] if all(c["gates"].values())]
        print(f"[shortlist] eligible, by T1 specificity: {eligible}; wrote {args.out}")
    elif args.command == "round":
        ledger = read_ledger()
        rounds = [e["round"] for e in ledger if e["event"] == "round"]
        line = append(
            {"event": "round", "round": max(rounds, default=0) + 1, "reason": args.reason}
        )
        print(f"[selection] opened round {line['round']}")
    elif args.command == "declare":
        ledger = read_ledger()
        round_ = current_round(ledger)
        identity = model_identity(args.model)
        table = json.loads(args.shortlist.read_text())
        entry = next(
            (c for c in table["candidates"] if c["model_sha256"] == identity["model_sha256"]),
            None,
        )
        if entry is None:
            raise ProtocolError(f"{args.model} is not in {args.shortlist}: run shortlist first")
        if not all(entry["gates"].values()):
            raise ProtocolError(f"{args.model} fails the short-list gates {entry['gates']}")
        check_declarable(ledger, identity["model_sha256"], round_)
        append(
            {
                "event": "declare",
                "round": round_,
                **identity,
                "gates": entry["gates"],
                "t0": {k: entry["t0"][k] for k in ("roc_auc", "recall", "specificity", "ece")},
                "t1": entry["t1"]["summary"],
                "incumbent_t0": {
                    k: table["incumbent"]["t0"][k]
                    for k in ("roc_auc", "recall", "specificity", "ece")
                },
                "incumbent_t1": table["incumbent"]["t1"]["summary"],
            }
        )
        print(f"[selection] declared {identity['name']} for round {round_}: commit the ledger")
    elif args.command == "score-a":
        ledger = read_ledger()
        identity = model_identity(args.model)
        incumbent_sha = model_identity(args.incumbent)["model_sha256"]
        round_ = check_scorable_on_a(
            ledger, committed_ledger(), identity["model_sha256"], incumbent_sha
        )
        plots_dir = Path("runs/selection") / f"{identity['model_sha256'][:12]}-A-{round_}"
        figures = score_half(args.model, args.data_dir, "A", plots_dir)
        role = "incumbent" if identity["model_sha256"] == incumbent_sha else "candidate"
        append({"event": "score_a", "round": round_, "role": role, **identity, "figures": figures})
        print(f"[score-a] {identity['name']} on A:\n{format_summary(figures)}")
        print(f"  ece          {figures['ece']:.4f}")
    elif args.command == "decide":
        ledger = read_ledger()
        round_ = current_round(ledger)
        scorings = {
            e["model_sha256"]: e["figures"]
            for e in ledger
            if e["event"] == "score_a" and e["round"] == round_
        }
        declared = {e["model_sha256"] for e in ledger if e["event"] == "declare"}
        incumbents = [sha for sha in scorings if sha not in declared]
        if len(incumbents) != 1:
            raise ProtocolError("score 1.0.0 on A in this round before deciding")
        shipped = shipped_figures(
            ledger, model_identity(args.shipped)["model_sha256"], incumbents[0], "score_a"
        )
        result = decide(scorings, incumbents[0], shipped)
        names = {e["model_sha256"]: e["name"] for e in ledger if "name" in e}
        append(
            {
                "event": "decision",
                "round": round_,
                "winner_sha256": result["winner_sha256"],
                "winner": names.get(result["winner_sha256"] or ""),
                "checks": result["checks"],
            }
        )
        print(f"[decide] round {round_}: winner {names.get(result['winner_sha256'] or '')}")
        for sha, checks in result["checks"].items():
            print(f"  {names.get(sha, sha)}: {checks}")
    elif args.command == "score-b":
        ledger = read_ledger()
        identity = model_identity(args.model)
        incumbent_sha = model_identity(args.incumbent)["model_sha256"]
        check_scorable_on_b(ledger, identity["model_sha256"], incumbent_sha)
        plots_dir = Path("runs/selection") / f"{identity['model_sha256'][:12]}-B"
        figures = score_half(args.model, args.data_dir, "B", plots_dir)
        role = "incumbent" if identity["model_sha256"] == incumbent_sha else "winner"
        append({"event": "score_b", "role": role, **identity, "figures": figures})
        print(f"[score-b] {identity['name']} on B:\n{format_summary(figures)}")
        print(f"  ece          {figures['ece']:.4f}")
        b = {e["model_sha256"]: e["figures"] for e in read_ledger() if e["event"] == "score_b"}
        winners = [e["winner_sha256"] for e in ledger if e["event"] == "decision"]
        if winners and winners[-1] in b and incumbent_sha in b:
            shipped_sha = model_identity(args.shipped)["model_sha256"]
            shipped_b = (
                None
                if shipped_sha == winners[-1]
                else shipped_figures(ledger, shipped_sha, incumbent_sha, "score_b")
            )
            vetoes = veto(b[winners[-1]], b[incumbent_sha], shipped_b)
            append({"event": "veto_check", "winner_sha256": winners[-1], "veto": vetoes})
            print(
                f"[score-b] veto conditions {vetoes}: "
                + ("VETOED" if any(vetoes.values()) else "no veto")
            )
    elif args.command == "site-arm":
        ledger = read_ledger()
        identity = model_identity(args.model)
        if any(e["event"] == "site_arm" and e["model_sha256"] == identity["model_sha256"]
               for e in ledger):  # fmt: skip
            raise ProtocolError("this model already has its site-arm reading of B")
        profile = json.loads(args.profile.read_text())
        if profile["model"]["sha256"] != identity["model_sha256"]:
            raise ProtocolError("the site profile was fitted for another model")
        figures = site_arm_figures(args.answers, args.profile)
        append({"event": "site_arm", **identity, "figures": figures})
        print(f"[site-arm] {identity['name']} on B, site profile:\n{format_summary(figures)}")
        print(f"  ece          {figures['ece']:.4f}")
    elif args.command == "stability":
        result = stability(args.model, args.data_dir)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
    elif args.command == "record":
        record(args.model, args.stability)
    return 0


def record(
    meta_path: Path, stability_path: Path | None, ledger: list[dict[str, Any]] | None = None
) -> None:
    """metrics.test_a / metrics.test_b of the metadata, from the ledger (never re-scored)."""
    from app.contract import ModelMetadata, dump_metadata

    sha = model_identity(meta_path)["model_sha256"]
    ledger = read_ledger() if ledger is None else ledger
    a = [e for e in ledger if e["event"] == "score_a" and e["model_sha256"] == sha]
    b = [e for e in ledger if e["event"] == "score_b" and e["model_sha256"] == sha]
    if not b:
        raise ProtocolError("the model has no scoring on B in the ledger")
    raw = json.loads(meta_path.read_text())
    metrics = raw.setdefault("metrics", {})
    metrics.pop("test", None)
    metrics["test_a"] = a[-1]["figures"]
    metrics["test_b"] = b[-1]["figures"]
    selection = {
        "protocol": b[-1]["protocol"],
        "ledger": str(LEDGER_FILE),
        "halves_sha256": hashlib.sha256((REPO_ROOT / HALVES_FILE).read_bytes()).hexdigest(),
    }
    if stability_path is not None:
        selection["stability"] = json.loads(stability_path.read_text())
    raw.setdefault("provenance", {})["selection"] = selection
    ModelMetadata.model_validate(raw)
    meta_path.write_text(dump_metadata(raw))
    print(f"[record] {meta_path}: metrics.test_a and metrics.test_b from the ledger")


if __name__ == "__main__":
    raise SystemExit(main())
