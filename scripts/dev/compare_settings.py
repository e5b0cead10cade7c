"""Compare service settings on a machine whose speed does not hold still, in one command:

    .venv/bin/python -m scripts.dev.compare_settings --concurrency 32 --rounds 8 \\
        --variant "" --variant "CXR_DECODE_CONCURRENCY=3 CXR_ORT_INTRA_OP_THREADS=2"

One service process per variant (each a `CXR_NAME=VALUE ...` list; "" is the defaults), all
started at once, then short closed-loop rounds of the same full-resolution JPEG uploads against
each in turn, the order reversed every other round. A variant's answers/s is then compared with
the first variant's in the same round (seconds apart), and the report gives the median of those
ratios: a shared machine's speed drifts by 10-30% over minutes (docs/PERFORMANCE.md), which a
run of one configuration after another would read as a difference between them.

Uploads and the load generator are the benchmark's (scripts/dev/benchmark.py,
scripts/dev/loadgen.py); the services idle while another is measured. Loopback only; bounded by
rounds x seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

from scripts.dev import benchmark, loadgen

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_variant(text: str) -> dict[str, str]:
    """`"CXR_A=1 CXR_B=2"` as a dict; only service settings (`CXR_*`) are accepted."""
    settings = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("CXR_"):
            raise argparse.ArgumentTypeError(f"{item!r} is not CXR_NAME=VALUE")
        settings[name] = value
    return settings


def _checked(text: str) -> str:
    parse_variant(text)  # a typo is refused before anything starts
    return text


def compare(
    variants: list[str], uploads: list[bytes], concurrency: int, rounds: int, seconds: float
) -> list[dict]:
    requests = [loadgen.build_request("/predict", body, "image/jpeg") for body in uploads]
    metadata = REPO_ROOT / "models" / "pneumonia_cxr.json"
    servers = []
    try:
        for text in variants:
            servers.append(benchmark.start_server(REPO_ROOT, metadata, parse_variant(text)))
        for server in servers:
            server.wait_until_ready()
            asyncio.run(loadgen.closed_loop(server.port, requests, concurrency, 1.0))  # warm-up
        rows: list[list[dict]] = [[] for _ in variants]
        for number in range(rounds):
            order = list(range(len(variants)))
            for index in order if number % 2 == 0 else reversed(order):
                result = asyncio.run(
                    loadgen.closed_loop(
                        servers[index].port, requests, concurrency, seconds, warmup_s=0.3
                    )
                )
                rows[index].append(result.summary())
            line = "  ".join(f"{r[-1]['ok_per_s']:6.1f}" for r in rows)
            print(f"round {number + 1}/{rounds}: answers/s {line}", file=sys.stderr, flush=True)
    finally:
        for server in servers:
            server.stop()
    report = []
    for text, runs in zip(variants, rows, strict=True):
        ratios = [
            run["ok_per_s"] / base["ok_per_s"] for run, base in zip(runs, rows[0], strict=True)
        ]
        report.append(
            {
                "variant": text or "(defaults)",
                "ok_per_s_median": round(statistics.median(r["ok_per_s"] for r in runs), 1),
                "over_first_median": round(statistics.median(ratios), 3),
                "over_first_range": [round(min(ratios), 3), round(max(ratios), 3)],
                "p50_ms_median": round(statistics.median(r["latency_ms"]["p50"] for r in runs), 1),
                "p99_ms_median": round(statistics.median(r["latency_ms"]["p99"] for r in runs), 1),
                "statuses": _summed(r["statuses"] for r in runs),
            }
        )
    return report


def _summed(counts) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for status, n in count.items():
            total[status] = total.get(status, 0) + n
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variant", action="append", required=True, type=_checked, help='"CXR_NAME=VALUE ..."'
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0, help="per round and variant")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=(2500, 2048), metavar=("W", "H"))
    parser.add_argument("--data-dir", type=Path, default=benchmark.DEFAULT_DATA)
    parser.add_argument("--out", type=Path, help="also write the report here as JSON")
    args = parser.parse_args(argv)
    sources = benchmark.xray_sources(args.data_dir, args.images)
    uploads = benchmark.full_resolution_jpegs(sources, tuple(args.size))
    report = compare(args.variant, uploads, args.concurrency, args.rounds, args.seconds)
    print(f"concurrency {args.concurrency}, {args.rounds} rounds of {args.seconds:g} s each")
    print("| variant | answers/s (median) | / first, median (range) | p50 ms | p99 ms | statuses |")
    print("|---|---|---|---|---|---|")
    for row in report:
        low, high = row["over_first_range"]
        print(
            f"| {row['variant']} | {row['ok_per_s_median']} | {row['over_first_median']} "
            f"({low}-{high}) | {row['p50_ms_median']} | {row['p99_ms_median']} | "
            f"{row['statuses']} |"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
