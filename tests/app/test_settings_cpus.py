"""The thread counts follow one CPU figure, CXR_CPUS, or the container's CPU quota; each can
still be set on its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.settings import Settings, cgroup_cpu_quota

MANY_CORES = set(range(16))


@pytest.fixture
def cgroup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cgroup root (no quota) on a machine of 16 usable cores."""
    monkeypatch.setattr("app.settings.CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: MANY_CORES)
    for name in ("CXR_CPUS", "CXR_ORT_INTRA_OP_THREADS", "CXR_DECODE_CONCURRENCY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CXR_CODEC_THREADS", raising=False)
    return tmp_path


def threads(settings: Settings) -> tuple[int, int, int]:
    return settings.ort_threads, settings.codec_thread_count, settings.decode_slots


def test_a_quota_of_two_cpus_gives_the_documented_threads(cgroup: Path) -> None:
    (cgroup / "cpu.max").write_text("200000 100000\n")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.cpu_count == 2
    # one ONNX Runtime and one OpenJPEG thread per CPU, one decode more than the CPUs
    assert threads(settings) == (2, 2, 3)


def test_a_cgroup_v1_quota_counts_the_same(cgroup: Path) -> None:
    (cgroup / "cpu,cpuacct").mkdir()
    (cgroup / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("200000\n")
    (cgroup / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads(Settings(_env_file=None)) == (2, 2, 3)  # type: ignore[call-arg]


def test_without_a_quota_the_usable_cores_count(cgroup: Path) -> None:
    (cgroup / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota() is None
    # 16 cores: decoders count at most 4 of them
    assert threads(Settings(_env_file=None)) == (16, 16, 5)  # type: ignore[call-arg]


def test_a_quota_above_the_usable_cores_counts_the_cores(
    cgroup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (cgroup / "cpu.max").write_text("800000 100000\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert threads(Settings(_env_file=None)) == (2, 2, 3)  # type: ignore[call-arg]


def test_a_fractional_quota_counts_whole_cpus_and_at_least_one(cgroup: Path) -> None:
    (cgroup / "cpu.max").write_text("250000 100000\n")
    assert threads(Settings(_env_file=None)) == (2, 2, 3)  # type: ignore[call-arg]
    (cgroup / "cpu.max").write_text("50000 100000\n")
    assert threads(Settings(_env_file=None)) == (1, 1, 2)  # type: ignore[call-arg]


def test_cxr_cpus_wins_over_the_quota(cgroup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (cgroup / "cpu.max").write_text("200000 100000\n")
    monkeypatch.setenv("CXR_CPUS", "4")
    assert threads(Settings(_env_file=None)) == (4, 4, 5)  # type: ignore[call-arg]
    monkeypatch.setenv("CXR_CPUS", "")  # as compose passes an unset variable
    assert threads(Settings(_env_file=None)) == (2, 2, 3)  # type: ignore[call-arg]


def test_an_explicit_thread_setting_wins_over_the_cpu_figure(
    cgroup: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (cgroup / "cpu.max").write_text("200000 100000\n")
    monkeypatch.setenv("CXR_CPUS", "2")
    monkeypatch.setenv("CXR_ORT_INTRA_OP_THREADS", "1")
    monkeypatch.setenv("CXR_CODEC_THREADS", "3")
    monkeypatch.setenv("CXR_DECODE_CONCURRENCY", "7")
    assert threads(Settings(_env_file=None)) == (1, 3, 7)  # type: ignore[call-arg]
    monkeypatch.delenv("CXR_CODEC_THREADS")
    assert threads(Settings(_env_file=None)) == (1, 2, 7)  # type: ignore[call-arg]


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_a_cpu_figure_that_is_not_positive_fails_at_start_up(
    cgroup: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CXR_CPUS", value)
    with pytest.raises(ValueError, match="cpus"):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_an_unreadable_quota_is_no_quota(cgroup: Path) -> None:
    (cgroup / "cpu.max").write_text("garbage\n")
    assert cgroup_cpu_quota() is None
    (cgroup / "cpu.max").write_text("200000 0\n")
    assert cgroup_cpu_quota() is None
