"""Replay labelled image sets through a real service and watch the drift metrics move.

Starts `uvicorn app.main:app` on 127.0.0.1 (the shipped model by default), POSTs each set's images
in turn to `/predict`, and scrapes `/metrics` every `--every` answers and at the end of each set:
the drift score (`cxr_drift_psi`), the answers by label (`cxr_answers_total`) and the mean model
input (`cxr_input_grey_mean`). Prints one JSON document.

    python -m scripts.dev.drift_replay --set validation=models/pneumonia_cxr.split.csv:val \
        --set test=../shared/data/chest_xray/test [--window 500]

A set is a folder (every .jpeg/.jpg/.png/.dcm under it) or `SPLIT_CSV:NAME`, the rows of a split
manifest with that split name (paths relative to the working directory). Each set is sent in a
seeded random order (`--seed`): folders and manifests list one class after the other, and a
window over one class alone would score as drift what is only the order.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.testing.server import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parents[2]

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm"}


def images_of(spec: str) -> list[Path]:
    if ":" in spec and spec.split(":", 1)[0].endswith(".csv"):
        manifest, split = spec.split(":", 1)
        with Path(manifest).open(newline="") as fh:
            return [Path(row["path"]) for row in csv.DictReader(fh) if row["split"] == split]
    return sorted(p for p in Path(spec).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def drift_figures(client: httpx.Client) -> dict[str, Any]:
    text = client.get("/metrics").text
    out: dict[str, Any] = {"answers": {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("cxr_drift_psi", "cxr_drift_window_answers"):
                out[s.name] = s.value
            elif s.name == "cxr_answers_total":
                out["answers"][s.labels["label"]] = s.value
            elif s.name in ("cxr_input_grey_mean_sum", "cxr_input_grey_mean_count"):
                out[s.name] = s.value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", required=True, help="NAME=FOLDER or CSV:SPLIT")
    parser.add_argument("--metadata", type=Path, default=REPO_ROOT / "models/pneumonia_cxr.json")
    parser.add_argument("--window", type=int, default=500, help="CXR_DRIFT_WINDOW")
    parser.add_argument("--every", type=int, default=100, help="scrape every N answers")
    parser.add_argument("--site-profile", type=Path, help="CXR_SITE_PROFILE, if any")
    parser.add_argument("--seed", type=int, default=0, help="order of the images in each set")
    args = parser.parse_args(argv)
    sets = [(name, images_of(spec)) for name, spec in (s.split("=", 1) for s in args.set)]
    shuffle = random.Random(args.seed).shuffle
    for _, paths in sets:
        shuffle(paths)
    settings = {
        "CXR_MODEL_METADATA": str(args.metadata.resolve()),
        "CXR_PROVIDER": "cpu",
        "CXR_DRAIN_SECONDS": "0",
        "CXR_LOG_LEVEL": "WARNING",
        "CXR_DRIFT_WINDOW": str(args.window),
    }
    if args.site_profile:
        settings["CXR_SITE_PROFILE"] = str(args.site_profile.resolve())
    report: dict[str, Any] = {"window": args.window, "seed": args.seed, "sets": []}
    with (
        tempfile.TemporaryDirectory() as tmp,
        ServiceProcess.serving(Path(tmp) / "service.log", settings) as server,
        httpx.Client(base_url=server.base_url, timeout=120.0) as client,
    ):
        served = 0
        for name, paths in sets:
            before = drift_figures(client)
            trajectory = []
            refused = 0
            for path in paths:
                response = client.post(
                    "/predict",
                    content=path.read_bytes(),
                    headers={"content-type": "application/octet-stream"},
                )
                refused += response.status_code != 200
                served += 1
                if served % args.every == 0:
                    now = drift_figures(client)
                    trajectory.append({"answers": served, "psi": now.get("cxr_drift_psi")})
            after = drift_figures(client)
            answers = {k: v - before["answers"].get(k, 0.0) for k, v in after["answers"].items()}
            count = after["cxr_input_grey_mean_count"] - before["cxr_input_grey_mean_count"]
            report["sets"].append(
                {
                    "name": name,
                    "images": len(paths),
                    "refused": refused,
                    "answers_by_label": answers,
                    "positive_rate": answers.get("PNEUMONIA", 0.0) / max(sum(answers.values()), 1),
                    "mean_input_grey": (
                        after["cxr_input_grey_mean_sum"] - before["cxr_input_grey_mean_sum"]
                    )
                    / max(count, 1),
                    "psi_at_end": after["cxr_drift_psi"],
                    "window_answers_at_end": after["cxr_drift_window_answers"],
                    "psi_every": trajectory,
                }
            )
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
