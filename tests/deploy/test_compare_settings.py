"""The settings comparison (`python -m scripts.dev.compare_settings`, docs/PERFORMANCE.md "Thread
split") still runs end to end in miniature, compares each variant with the first in the same
rounds, and refuses what is not a service setting before starting anything."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.dev import compare_settings
from tests.support.realdata import REPO_ROOT, requires_data

COMMAND = [sys.executable, "-m", "scripts.dev.compare_settings"]
# run from another directory, with the project root on the module path
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
}


def test_a_variant_is_a_list_of_service_settings() -> None:
    assert compare_settings.parse_variant("") == {}
    assert compare_settings.parse_variant("CXR_A=1  CXR_B=x=y") == {"CXR_A": "1", "CXR_B": "x=y"}
    for bad in ("CXR_A", "PATH=/tmp", "cxr_a=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            compare_settings.parse_variant(bad)


@requires_data
def test_two_variants_are_measured_in_the_same_rounds(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    run = subprocess.run(
        [*COMMAND, "--concurrency", "2", "--rounds", "2", "--seconds", "0.5",
         "--images", "2", "--variant", "", "--variant", "CXR_DECODE_CONCURRENCY=1",
         "--out", str(out)],
        check=True, cwd=tmp_path, env=ENV, timeout=300, capture_output=True, text=True,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert [row["variant"] for row in report] == ["(defaults)", "CXR_DECODE_CONCURRENCY=1"]
    assert report[0]["over_first_median"] == 1.0  # the first is its own reference
    for row in report:
        assert row["ok_per_s_median"] > 0 and set(row["statuses"]) == {"200"}
    assert "| CXR_DECODE_CONCURRENCY=1 |" in run.stdout
    assert "round 2/2" in run.stderr


def test_a_typo_is_refused_before_any_service_starts() -> None:
    run = subprocess.run(
        [*COMMAND, "--variant", "DECODE=3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode != 0 and "is not CXR_NAME=VALUE" in run.stderr
