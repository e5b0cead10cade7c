"""One-line summaries of what Docker reports about the smoke test's container (standard library
only), read from stdin:

    docker inspect -f '{{json .State.Health}}' CONTAINER | python3 -m scripts.ci.smoke_logs health
    printf '%s' "$ready_line" | python3 -m scripts.ci.smoke_logs ready

`health`: the health status, the failing streak and the last three probes (start, exit code, the
end of their output). `ready`: the service's "model ready" JSON log line as start-up time and
execution provider.
"""

from __future__ import annotations

import argparse
import json
import sys


def health(text: str) -> str:
    h = json.loads(text)
    lines = [f"status: {h['Status']} failing streak: {h['FailingStreak']}"]
    for e in h["Log"][-3:]:
        lines.append(f"  {e['Start'][:19]} exit {e['ExitCode']} {e['Output'].strip()[-300:]}")
    return "\n".join(lines)


def ready(text: str) -> str:
    e = json.loads(text)
    return "model loaded and warmed up in {} ms on {}".format(
        e.get("startup_ms"), e.get("execution_provider")
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("what", choices=["health", "ready"])
    args = parser.parse_args(argv)
    summary = health if args.what == "health" else ready
    print(summary(sys.stdin.read()))


if __name__ == "__main__":
    main()
