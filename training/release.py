"""From the real data to the shipped model in `models/`, under `docs/SELECTION_PROTOCOL.md`.

    python -m training.release candidate --data-dir ../shared/data/chest_xray --run runs/c7 \\
        --version 2.0.0 -- --arch cxr_net_7 --ema 0.99 ...      # training.train's options
    (python -m training.selection shortlist / round / declare / score-a / decide / score-b)
    python -m training.release ship --model runs/c7/models/pneumonia_cxr.json \\
        --data-dir ../shared/data/chest_xray

`candidate` runs `training.train` (patient-level split, training), the protocol's operating-point
recipe (`training.selection calibrate`: temperature and bias on validation and its synthetic-shift
renderings, threshold on validation) and `training.export` (ONNX + metadata, parity gate) into
`<run>/models/`; it reads no test image. `ship` takes a model that won on half A and passed B's
veto: the previous model moves to `models/<its version>/`, the new one into `models/` with its
ledger figures in the metadata, the answers-under-tone-curves measurement, the figures and the
model card. `--skip-train` re-calibrates and re-exports an existing run.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from app.contract import dump_metadata
from training import export, model_card, selection, train


def candidate(args: argparse.Namespace, train_args: list[str]) -> int:
    if not args.skip_train:
        code = train.main(["--data-dir", str(args.data_dir), "--out", str(args.run), *train_args])
        if code:
            return code
    selection.calibrate_run(args.run, args.cache_dir)
    meta_path = export.export_run(
        args.run, args.run / "models", args.name, args.version, export.DEFAULT_TOLERANCE, 32
    )
    print(
        f"[release] candidate {meta_path}: next, `python -m training.selection shortlist --model "
        f"{meta_path}` (docs/SELECTION_PROTOCOL.md)",
        flush=True,
    )
    return 0


def ship(args: argparse.Namespace) -> int:
    meta_path: Path = args.model
    models: Path = args.models_dir
    name = json.loads(meta_path.read_text())["name"]
    current = models / f"{name}.json"
    winner = selection.model_identity(meta_path)["model_sha256"]
    if not any(
        e["event"] == "decision" and e["winner_sha256"] == winner for e in selection.read_ledger()
    ):
        raise selection.ProtocolError(f"{meta_path} won no decision on A")
    vetoes = [
        e
        for e in selection.read_ledger()
        if e["event"] == "veto_check" and e["winner_sha256"] == winner
    ]
    if not vetoes or any(vetoes[-1]["veto"].values()):
        raise selection.ProtocolError(f"{meta_path} has no B scoring beside 1.0.0's, or was vetoed")
    if current.is_file():
        previous = json.loads(current.read_text())
        archive = models / previous["version"]
        archive.mkdir(parents=True, exist_ok=True)
        for suffix in (".onnx", ".json", ".split.csv", ".results.json"):
            source = models / f"{name}{suffix}"
            if source.is_file():
                shutil.move(str(source), archive / source.name)
    source_dir = meta_path.parent
    for suffix in (".onnx", ".json", ".split.csv"):
        shutil.copyfile(source_dir / f"{name}{suffix}", models / f"{name}{suffix}")
    shipped = models / f"{name}.json"
    if args.version:
        raw = json.loads(shipped.read_text())
        candidate_version, raw["version"] = raw["version"], args.version
        raw.setdefault("provenance", {})["release_candidate"] = candidate_version
        shipped.write_text(dump_metadata(raw))
    stability = selection.stability(
        [shipped, *sorted(models.glob(f"*/{name}.json"))], args.data_dir
    )
    stability_path = args.run_dir / "stability.json"
    stability_path.parent.mkdir(parents=True, exist_ok=True)
    stability_path.write_text(json.dumps(stability, indent=1))
    selection.record(shipped, stability_path)

    figures = models / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    run = args.run_dir
    b_plots = Path("runs/selection") / f"{winner[:12]}-B"
    for stale in figures.glob("training_curves*.png"):
        stale.unlink()
    summary = json.loads((run / "summary.json").read_text())
    members = [Path(m) for m in summary.get("members", [])]
    for i, member in enumerate(members, start=1):
        shutil.copyfile(member / "training_curves.png", figures / f"training_curves_member{i}.png")
    for src, dst in (
        (run / "training_curves.png", "training_curves.png"),
        (run / "class_distribution.png", "class_distribution.png"),
        (run / "val_roc.png", "validation_roc.png"),
        (run / "val_reliability.png", "validation_reliability.png"),
        (b_plots / "roc.png", "test_roc.png"),
        (b_plots / "confusion_matrix.png", "test_confusion_matrix.png"),
        (b_plots / "sample_grid.png", "test_samples.png"),
        (b_plots / "reliability.png", "test_reliability.png"),
    ):
        if src.is_file():
            shutil.copyfile(src, figures / dst)
    model_card.main(["--model", str(shipped)])
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("candidate", help="train, calibrate by the protocol's recipe, export")
    c.add_argument("--data-dir", type=Path, required=True, help="Kaggle-style root with train/")
    c.add_argument("--run", type=Path, required=True)
    c.add_argument("--name", default="pneumonia_cxr")
    c.add_argument("--version", required=True)
    c.add_argument("--cache-dir", type=Path, default=Path("runs/.cache"))
    c.add_argument("--skip-train", action="store_true", help="reuse the run's checkpoint")
    s = sub.add_parser("ship", help="ship the winner of the protocol into models/")
    s.add_argument("--model", type=Path, required=True, help="the winner's metadata JSON")
    s.add_argument("--data-dir", type=Path, required=True, help="for the stability measurement")
    s.add_argument("--run-dir", type=Path, required=True, help="the winner's run directory")
    s.add_argument("--models-dir", type=Path, default=Path("models"))
    s.add_argument("--version", help="the version it ships as (a release candidate's `-rc.N` off)")
    args, rest = p.parse_known_args(argv)
    try:
        if args.command == "candidate":
            return candidate(args, [a for a in rest if a != "--"])
        if rest:
            p.error(f"unrecognised arguments: {' '.join(rest)}")
        return ship(args)
    except selection.ProtocolError as exc:
        print(f"[release] REFUSED: {exc}", flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
