"""`pneumonia-validate-site`: measure the served model on a site's own labelled cases, fit the
site's recalibration and threshold, and write a report, a profile and every figure.

    pneumonia-validate-site DATA --out OUT [--target-sensitivity 0.95] [--service URL]
                            [--model models/pneumonia_cxr.onnx] [--evaluate-split]

DATA is a Kaggle-style folder (NORMAL/, PNEUMONIA/, nested sub-folders become subgroups) or a
folder of DICOM files with labels.csv (see `app.site_validation.cases`). Every image goes through
the service's HTTP contract exactly as a client sends it: to the real app built in this process from
`--model`, or to a running service at `--service`. Writes OUT/report.html (one self-contained
page), OUT/site_profile.json (see `app.model.site_profile`) and OUT/results.json (every figure
and each image's answer; patient keys are salted hashes, no header value is written).

`--evaluate-split` also fits a profile on half the patients and checks it on the other half
(OUT/split_half/site_profile.json), the acceptance check of this procedure: ECE <= 0.05,
sensitivity >= target - 0.02 and specificity >= 0.85 at the site threshold on the held-out half.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from app.evaluation import linked_groups
from app.model import site_profile
from app.site_validation import analysis, metrics
from app.site_validation.cases import Case, Cases, CasesError, find_cases
from app.site_validation.fitting import FitError
from app.site_validation.report import render
from app.site_validation.scoring import ServedModel, ServiceUnavailable, open_service, score_all

DISCLAIMER = (
    "Research use only. This report measures a research model on this site's labelled images; it "
    "does not make the model a medical device, and a qualified clinician must review every image."
)
ACCEPT_ECE = 0.05
ACCEPT_SENSITIVITY_SLACK = 0.02
ACCEPT_SPECIFICITY = 0.85
DEFAULT_CONFIDENCE = 0.90
DEFAULT_SPLIT_REPEATS = 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumonia-validate-site",
        description="Measure the pneumonia model on a site's own labelled X-rays, fit a site "
        "recalibration and threshold, and write report.html, site_profile.json, results.json.",
    )
    parser.add_argument(
        "data", type=Path, help="NORMAL/ + PNEUMONIA/ folder, or DICOM + labels.csv"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the outputs")
    parser.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.95,
        help="sensitivity the site threshold must hold on new patients (default %(default)s)",
    )
    parser.add_argument(
        "--margin-confidence",
        type=float,
        default=DEFAULT_CONFIDENCE,
        help="one-sided confidence of the Clopper-Pearson lower bound that must reach the target "
        "sensitivity (default %(default)s)",
    )
    parser.add_argument(
        "--service", help="URL of a running service (default: build the service in process)"
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=Path("models/pneumonia_cxr.onnx"),
        help="ONNX file (its metadata JSON beside it) or the metadata JSON, for the in-process "
        "service (default %(default)s; not used with --service)",
    )
    parser.add_argument("--name", help="the profile's name (default: DATA's folder name and date)")
    parser.add_argument(
        "--evaluate-split", action="store_true", help="also run the split-half check"
    )
    parser.add_argument(
        "--split-repeats",
        type=int,
        default=DEFAULT_SPLIT_REPEATS,
        help="further random halvings to show how much the split-half figures vary",
    )
    parser.add_argument(
        "--folds", type=int, default=analysis.DEFAULT_FOLDS, help="cross-validation folds"
    )
    parser.add_argument(
        "--resamples",
        type=int,
        default=analysis.DEFAULT_RESAMPLES,
        help="patient bootstrap resamples for the intervals",
    )
    parser.add_argument("--seed", type=int, default=0, help="for folds, halves and resamples")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    return parser


def _metadata_path(model: Path) -> Path:
    path = model.with_suffix(".json") if model.suffix.lower() == ".onnx" else model
    if not path.is_file():
        raise CasesError(f"no model metadata at {path} (give --model the ONNX file or its JSON)")
    return path


def _union_patients(cases: list[Case], digests: list[str]) -> list[str]:
    """One group per patient, byte-identical images joined with their patients; each group named
    by the smallest of its keys ("image:<digest>" before "patient:<id>")."""
    keys = [
        ["patient:" + case.patient, *(["image:" + digest] if digest else [])]
        for case, digest in zip(cases, digests, strict=True)
    ]
    groups = linked_groups(keys)
    names: dict[int, str] = {}
    for group, item_keys in zip(groups, keys, strict=True):
        names[group] = min([names.get(group, item_keys[0]), *item_keys])
    return [names[group] for group in groups]


def make_profile(
    name: str,
    served: ServedModel,
    fit: analysis.SiteFit,
    counts: dict[str, int],
    n_refused: int,
    kind: str,
    target: float,
    confidence: float,
    created: str,
    figures: dict[str, float | None],
) -> site_profile.SiteProfile:
    margin = (
        f"highest threshold whose one-sided {confidence:.0%} Clopper-Pearson lower bound on "
        f"sensitivity is >= {target:.0%} ({fit.margin.positives_called} of "
        f"{fit.margin.positives} positive images called, bound {fit.margin.lower_bound:.4f})"
        if fit.margin.met
        else "too few positive images for the bound: every positive image called"
    )
    return site_profile.SiteProfile(
        name=name,
        model=site_profile.ModelRef(name=served.name, version=served.version, sha256=served.sha256),
        recalibration=site_profile.Recalibration(
            method="platt" if fit.fit.method == "platt" else "temperature",
            slope=fit.fit.slope,
            intercept=fit.fit.intercept,
            reason=fit.fit.reason,
            fitted_on_images=counts["images"],
            fitted_on_patients=counts["patients"],
            log_loss_before=fit.fit.log_loss_before,
            log_loss_after=fit.fit.log_loss_after,
        ),
        operating=site_profile.Operating(
            positive_class=served.positive_class,
            threshold=fit.margin.threshold,
            target_sensitivity=target,
            margin=margin,
            margin_confidence=confidence,
            shipped_threshold=served.threshold,
        ),
        data=site_profile.SiteData(
            n_images=counts["images"],
            n_patients=counts["patients"],
            n_positive=counts["positive_images"],
            n_negative=counts["negative_images"],
            n_refused=n_refused,
            created=created,
            source=kind,
        ),
        figures=figures,
    )


def _profile_figures(f: dict[str, Any]) -> dict[str, float | None]:
    site = f["at_site_threshold"]
    cv = site.get("cross_validated") or {}
    return {
        "auc": f["auc"]["value"],
        "ece_served": f["ece"]["served"],
        "ece_site_in_sample": f["ece"]["site_in_sample"],
        "ece_site_cross_validated": f["ece"].get("site_cross_validated"),
        "sensitivity_shipped_threshold": f["at_shipped_threshold"]["sensitivity"],
        "specificity_shipped_threshold": f["at_shipped_threshold"]["specificity"],
        "sensitivity_in_sample": site["in_sample"]["sensitivity"],
        "specificity_in_sample": site["in_sample"]["specificity"],
        "sensitivity_cross_validated": cv.get("sensitivity"),
        "specificity_cross_validated": cv.get("specificity"),
    }


def _acceptance(held: dict[str, Any], target: float) -> dict[str, Any]:
    checks = [
        ("ECE", held["ece"], f"<= {ACCEPT_ECE}", held["ece"] <= ACCEPT_ECE),
        (
            "sensitivity",
            held["sensitivity"],
            f">= {target - ACCEPT_SENSITIVITY_SLACK:.2f}",
            held["sensitivity"] is not None
            and held["sensitivity"] >= target - ACCEPT_SENSITIVITY_SLACK,
        ),
        (
            "specificity",
            held["specificity"],
            f">= {ACCEPT_SPECIFICITY}",
            held["specificity"] is not None and held["specificity"] >= ACCEPT_SPECIFICITY,
        ),
    ]
    return {
        "checks": [{"name": n, "value": v, "rule": r, "met": bool(ok)} for n, v, r, ok in checks],
        "all_met": all(ok for *_, ok in checks),
    }


def split_half(
    labels: metrics.BoolArray,
    p: np.ndarray,
    patients: metrics.IntArray,
    n_patients: int,
    served: ServedModel,
    args: argparse.Namespace,
    kind: str,
    created: str,
    name: str,
    files: list[str],
) -> dict[str, Any]:
    """Fit a profile on half the patients, write it, load it back and check it on the other half's
    served answers; then the same on `--split-repeats` other halvings, for their spread. `files`
    names each case (as in `results.json`), so that the held-out half can be served again."""
    target, confidence = args.target_sensitivity, args.margin_confidence

    def one(seed: int) -> tuple[analysis.SiteFit, metrics.BoolArray, metrics.BoolArray]:
        fit_half, check_half = analysis.split_halves(patients, n_patients, labels, seed)
        fit = analysis.fit_site(labels[fit_half], p[fit_half], target, confidence)
        return fit, fit_half, check_half

    try:
        fit, fit_half, check_half = one(args.seed)
    except (FitError, ValueError) as exc:
        return {"skipped": str(exc)}
    fit_counts = {
        "images": int(fit_half.sum()),
        "patients": len(set(patients[fit_half].tolist())),
        "positive_images": int(labels[fit_half].sum()),
        "negative_images": int((~labels[fit_half]).sum()),
    }
    half_profile = make_profile(
        f"{name} (fitted on half the patients)",
        served,
        fit,
        fit_counts,
        0,
        kind,
        target,
        confidence,
        created,
        {},
    )
    folder = args.out / "split_half"
    folder.mkdir(parents=True, exist_ok=True)
    profile_path = folder / "site_profile.json"
    site_profile.dump(half_profile, profile_path)
    loaded = site_profile.load(profile_path)  # what the service would load
    loaded.check_model(served.sha256)
    p_site = loaded.apply(p[check_half])
    held = analysis.held_out_figures(
        labels[check_half],
        p_site,
        loaded.operating.threshold,
        patients[check_half],
        args.resamples,
        args.seed,
    )
    result: dict[str, Any] = {
        "seed": args.seed,
        "fitted_on": fit_counts,
        "profile": {"file": "split_half/site_profile.json", "sha256": loaded.sha256},
        "recalibration": {
            "method": loaded.recalibration.method,
            "slope": loaded.recalibration.slope,
            "intercept": loaded.recalibration.intercept,
        },
        "threshold": loaded.operating.threshold,
        "held_out": held,
        "acceptance": _acceptance(held, target),
        "held_out_files": [files[i] for i in np.flatnonzero(check_half)],
    }
    runs = []
    for seed in range(args.seed + 1, args.seed + 1 + max(args.split_repeats, 0)):
        try:
            fit_r, _, check_r = one(seed)
        except (FitError, ValueError):
            continue
        y = labels[check_r]
        ps = fit_r.site_probability(p[check_r])
        rates = metrics.rates(metrics.confusion(y, ps, fit_r.margin.threshold))
        run: dict[str, Any] = {
            "seed": seed,
            "ece": metrics.expected_calibration_error(y, ps),
            **rates,
        }
        run["all_met"] = _acceptance(run, target)["all_met"]
        runs.append(run)
    if runs:
        result["repeats"] = {
            "n": len(runs),
            "all_met": sum(r["all_met"] for r in runs),
            **{
                key: _spread([r[key] for r in runs if r[key] is not None])
                for key in ("ece", "sensitivity", "specificity")
            },
            "runs": runs,
        }
    return result


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "mean": None, "max": None}
    return {"min": min(values), "mean": float(np.mean(values)), "max": max(values)}


def verdict(f: dict[str, Any], target: float, n_refused: int, cases: Cases) -> dict[str, Any]:
    site = f["at_site_threshold"]
    cv = site.get("cross_validated")
    basis, at = ("cross-validated", cv) if cv else ("in-sample", site["in_sample"])
    sens, spec = at["sensitivity"], at["specificity"]
    ci = at.get("ci95") or {}
    meets = bool(sens is not None and sens >= target and f["site_threshold"]["met"])
    ece_key = "site_cross_validated" if "site_cross_validated" in f["ece"] else "site_in_sample"
    summary = (
        f"At the site threshold the model {'holds' if meets else 'does NOT hold'} the "
        f"{target:.0%} sensitivity target on these data: {basis} sensitivity {_p(sens)}"
        f"{_r(ci.get('sensitivity'))} and specificity {_p(spec)}{_r(ci.get('specificity'))}. "
        f"Recalibrated, its probabilities are off by {f['ece'][ece_key]:.3f} on average ({basis} "
        f"ECE; {f['ece']['served']:.3f} as served). At the shipped threshold: sensitivity "
        f"{_p(f['at_shipped_threshold']['sensitivity'])}, specificity "
        f"{_p(f['at_shipped_threshold']['specificity'])}."
    )
    counts = f["counts"]
    caveats = [
        f"{counts['patients']} patients ({counts['positive_patients']} with pneumonia): the "
        "intervals show how far the true figures may lie from these.",
        "The figures are only as good as the labels: a label error counts against the model.",
        "PPV and NPV depend on how common pneumonia is; they hold for this data's mix only.",
        "In-sample figures flatter the fit; plan with the cross-validated and split-half ones.",
        "The threshold's margin (Clopper-Pearson) treats images as independent; several images "
        "of one patient make it less conservative than it looks.",
        "The model learned from children aged 1 to 5 at one centre: other ages, machines and "
        "views may behave differently (see the subgroups).",
        "Validate again after any change of model, machine, protocol or population.",
    ]
    if n_refused:
        caveats.append(f"{n_refused} images were refused or failed and are in no figure.")
    if not f["site_threshold"]["met"]:
        caveats.append("Too few pneumonia cases to set the threshold with its margin.")
    alone = [n for n in cases.notes if n.startswith("patient ids: ") and n.endswith(" from file")]
    caveats += [
        f"{note.removeprefix('patient ids: ')}: each such image counts as its own patient"
        for note in alone
    ]
    return {"meets_target": meets, "basis": basis, "summary": summary, "caveats": caveats}


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _r(interval: Any) -> str:
    return "" if not interval else f" (95% CI {_p(interval[0])} to {_p(interval[1])})"


def _served_by(url: str | None, metadata: Path) -> str:
    if not url:
        return f"the service built in this process from {metadata}"
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"the service at {parts.scheme}://{parts.hostname}{port}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    cases = find_cases(args.data)
    metadata = None if args.service else _metadata_path(args.model)
    created = datetime.now(UTC).replace(microsecond=0).isoformat()
    name = args.name or f"{args.data.resolve().name}-{created[:10]}"
    print(f"[site] {len(cases.cases)} labelled images ({cases.kind} folder)", file=sys.stderr)
    with open_service(args.service, metadata or Path()) as client:
        served = _served_model(client)
        outcomes = score_all(
            client, [c.path for c in cases.cases], served.positive_class, args.concurrency
        )
    answers = [a for a, _ in outcomes]
    shas = {a.model_sha256 for a in answers if a.status == 200}
    if shas - {served.sha256}:
        raise ServiceUnavailable("answers came from more than one model: was it swapped?")
    groups = _union_patients(cases.cases, [d for _, d in outcomes])
    ok = [i for i, a in enumerate(answers) if a.status == 200]
    if not ok:
        raise CasesError("the service refused every image: see results.json")
    labels = np.array([cases.cases[i].positive for i in ok], dtype=bool)
    p = np.array([answers[i].p_positive for i in ok], dtype=np.float64)
    patients, n_patients = metrics.patient_index([groups[i] for i in ok])
    keys = sorted({k for i in ok for k in cases.cases[i].subgroups})
    subgroups = {k: [cases.cases[i].subgroups.get(k) for i in ok] for k in keys}
    site, figures = analysis.analyse(
        labels,
        p,
        patients,
        n_patients,
        served.threshold,
        args.target_sensitivity,
        args.margin_confidence,
        subgroups=subgroups,
        folds=args.folds,
        resamples=args.resamples,
        seed=args.seed,
    )
    refused = [
        {
            "file": c.name,
            "label": "PNEUMONIA" if c.positive else "NORMAL",
            "status": a.status,
            "error_code": a.error_code,
        }
        for c, a in zip(cases.cases, answers, strict=True)
        if a.status != 200
    ]
    profile = make_profile(
        name,
        served,
        site,
        figures["counts"],
        len(refused),
        cases.kind,
        args.target_sensitivity,
        args.margin_confidence,
        created,
        _profile_figures(figures),
    )
    args.out.mkdir(mode=0o700, parents=True, exist_ok=True)
    site_profile.dump(profile, args.out / "site_profile.json")
    salt = secrets.token_bytes(16)  # per run: a key cannot be matched to a patient id by guessing
    p_site_all = {i: float(v) for i, v in zip(ok, site.site_probability(p), strict=True)}
    images = []
    for i, (case, answer) in enumerate(zip(cases.cases, answers, strict=True)):
        entry: dict[str, Any] = {
            "file": case.name,
            "label": "PNEUMONIA" if case.positive else "NORMAL",
            "patient_key": hashlib.sha256(salt + groups[i].encode()).hexdigest()[:16],
            "status": answer.status,
            "p_served": answer.p_positive,
            "p_site": p_site_all.get(i),
            "site_call": None
            if i not in p_site_all
            else ("PNEUMONIA" if p_site_all[i] >= site.margin.threshold else "NORMAL"),
            "error_code": answer.error_code,
        }
        entry.update({k: v for k, v in case.subgroups.items() if k in ("folder", "subtype")})
        images.append(entry)
    results: dict[str, Any] = {
        "name": name,
        "created": created,
        "served_by": _served_by(args.service, metadata or Path()),
        "model": {
            "name": served.name,
            "version": served.version,
            "sha256": served.sha256,
            "shipped_threshold": served.threshold,
            "calibration": served.calibration,
        },
        "data": {
            "kind": cases.kind,
            "n_images": len(cases.cases),
            "n_answered": len(ok),
            "n_refused": len(refused),
            "notes": cases.notes,
        },
        "profile": {"file": "site_profile.json", "sha256": profile.sha256},
        "figures": figures,
        "refused": refused,
        "refused_codes": dict(Counter(str(r["error_code"]) for r in refused)),
        "verdict": verdict(figures, args.target_sensitivity, len(refused), cases),
        "disclaimer": DISCLAIMER,
        "images": images,
    }
    if args.evaluate_split:
        results["split_half"] = split_half(
            labels,
            p,
            patients,
            n_patients,
            served,
            args,
            cases.kind,
            created,
            name,
            [cases.cases[i].name for i in ok],
        )
    write_private(args.out / "results.json", json.dumps(results, indent=1) + "\n")
    write_private(args.out / "report.html", render(results))
    return results


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only (0600, an existing file included):
    the report and the results name the site's cases and show their images."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)


def _served_model(client: Any) -> ServedModel:
    from app.site_validation.scoring import served_model

    return served_model(client)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.5 <= args.target_sensitivity < 1.0:
        print("--target-sensitivity must be in [0.5, 1)", file=sys.stderr)
        return 2
    if not 0.5 <= args.margin_confidence < 1.0:
        print("--margin-confidence must be in [0.5, 1)", file=sys.stderr)
        return 2
    limits = {
        "folds": (2, 20),
        "resamples": (50, 20_000),
        "split_repeats": (0, 200),
        "concurrency": (1, 32),
    }
    for option, (low, high) in limits.items():
        if not low <= getattr(args, option) <= high:
            print(f"--{option.replace('_', '-')} must be in [{low}, {high}]", file=sys.stderr)
            return 2
    try:
        results = run(args)
    except (CasesError, FitError) as exc:
        print(f"[site] {exc}", file=sys.stderr)
        return 2
    except ServiceUnavailable as exc:
        print(f"[site] {exc}", file=sys.stderr)
        return 3
    f = results["figures"]
    print(f"[site] {results['verdict']['summary']}", file=sys.stderr)
    split = results.get("split_half")
    if split and "acceptance" in split:
        checks = ", ".join(
            f"{c['name']} {c['value']:.3f} {'met' if c['met'] else 'MISSED'}"
            for c in split["acceptance"]["checks"]
        )
        print(f"[site] split-half: {checks}", file=sys.stderr)
    print(f"[site] AUC {f['auc']['value']:.4f}; wrote {args.out}/report.html", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
