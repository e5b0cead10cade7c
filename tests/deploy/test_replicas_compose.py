"""The replica stage's compose service matches the StatefulSet's pod template, and the check that
says so (scripts/ci/replicas.py `match`) fails on each kind of difference."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.ci import replicas

REPO_ROOT = Path(__file__).resolve().parents[2]

_VARIABLE = re.compile(r"\$\{(\w+)(:[-?])([^}]*)\}")


def _compose_service() -> dict[str, Any]:
    """The `api` service as compose reads it with the stage's defaults (`${X:-default}`; a
    required `${X:?...}` gets a path)."""
    text = (REPO_ROOT / "deploy" / "replicas" / "compose.yml").read_text(encoding="utf-8")
    text = _VARIABLE.sub(lambda m: m[3] if m[2] == ":-" else "/stage/file", text)
    service: dict[str, Any] = yaml.safe_load(text)["services"]["api"]
    return service


def _statefulset() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(replicas.STATEFULSET.read_text(encoding="utf-8"))
    return loaded


def test_the_shipped_compose_service_matches_the_statefulset() -> None:
    assert replicas.match(_compose_service(), _statefulset()) == []


def _env(service: dict[str, Any], name: str, value: str | None) -> None:
    if value is None:
        del service["environment"][name]
    else:
        service["environment"][name] = value


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: _env(s, "CXR_DRAIN_SECONDS", "0"), "env CXR_DRAIN_SECONDS"),
        (lambda s: _env(s, "CXR_DICOM_PEERS", None), "env CXR_DICOM_PEERS: set by the StatefulSet"),
        (lambda s: _env(s, "CXR_STATE_URL", ""), "env CXR_STATE_URL: from a Secret"),
        (lambda s: _env(s, "CXR_DICOM_OPEN", "true"), "env CXR_DICOM_OPEN: set in compose only"),
        (
            lambda s: s["healthcheck"].update(
                test=[t.replace("/health/ready", "/health/live") for t in s["healthcheck"]["test"]]
            ),
            "healthcheck path",
        ),
        (
            lambda s: s["healthcheck"].update(
                test=[t.replace("8081", "8000") for t in s["healthcheck"]["test"]]
            ),
            "healthcheck port",
        ),
        (lambda s: s["healthcheck"].update(interval="10s"), "healthcheck interval"),
        (lambda s: s["healthcheck"].update(start_period="90s"), "healthcheck start_period"),
        (lambda s: s.update(user="0:0"), "user"),
        (lambda s: s.pop("user"), "user"),
        (lambda s: s.update(read_only=False), "root file system"),
        (lambda s: s.update(cap_drop=["NET_RAW"]), "capabilities"),
        (lambda s: s.update(security_opt=[]), "privilege escalation"),
        (lambda s: s.update(tmpfs=["/tmp:size=1g"]), "/tmp"),
        (lambda s: s["deploy"]["resources"]["limits"].update(cpus="4"), "cpus"),
        (lambda s: s["deploy"]["resources"]["limits"].update(memory="2g"), "memory"),
        (lambda s: s.update(stop_grace_period="10s"), "stop_grace_period"),
        (lambda s: s.update(volumes=[]), "CXR_API_KEYS_FILE"),
    ],
)
def test_a_difference_fails_the_match(change: Any, expected: str) -> None:
    service = copy.deepcopy(_compose_service())
    change(service)
    failures = replicas.match(service, _statefulset())
    assert any(f.startswith(expected) for f in failures), failures


def test_the_statefulset_changing_fails_the_match_too() -> None:
    statefulset = copy.deepcopy(_statefulset())
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["periodSeconds"] = 10
    container["env"].append({"name": "CXR_RESULTS_MAX_STORED", "value": "100"})
    failures = replicas.match(_compose_service(), statefulset)
    assert any(f.startswith("healthcheck interval") for f in failures), failures
    assert any(f.startswith("env CXR_RESULTS_MAX_STORED") for f in failures), failures


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5.0), ("1m30s", 90.0), ("500ms", 0.5), (30, 30.0), (5_000_000_000, 5.0)],
)
def test_compose_durations(text: str | int, seconds: float) -> None:
    assert replicas.seconds(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1g", 1024**3),
        ("1Gi", 1024**3),
        ("64m", 64 * 1024**2),
        ("64Mi", 64 * 1024**2),
        ("1073741824", 1024**3),
    ],
)
def test_memory_sizes(text: str, size: int) -> None:
    assert replicas.memory_bytes(text) == size
