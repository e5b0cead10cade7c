"""Settings: the CXR_ prefix, validation at start-up, and where the default model is looked up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import PROJECT_ROOT, Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in [k for k in os.environ if k.startswith("CXR_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env, and a cwd without models/


def test_defaults():
    settings = Settings()
    assert settings.provider == "auto"
    assert settings.max_upload_bytes == 32 * 1024 * 1024
    assert settings.min_image_side == 64
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000


def test_environment_variables_use_the_cxr_prefix(monkeypatch):
    monkeypatch.setenv("CXR_PROVIDER", "CPU")
    monkeypatch.setenv("CXR_MAX_UPLOAD_BYTES", "1024")
    monkeypatch.setenv("CXR_LOG_LEVEL", "debug")
    monkeypatch.setenv("PROVIDER", "cuda")  # unprefixed: ignored
    settings = Settings()
    assert (settings.provider, settings.max_upload_bytes, settings.log_level) == (
        "cpu",
        1024,
        "DEBUG",
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CXR_PROVIDER", "tpu"),
        ("CXR_MAX_UPLOAD_BYTES", "0"),
        ("CXR_MAX_IMAGE_PIXELS", "1000000000"),  # above Pillow's own ceiling
        ("CXR_PORT", "70000"),
        ("CXR_ORT_INTRA_OP_THREADS", "-1"),
        ("CXR_LOG_LEVEL", "chatty"),
    ],
)
def test_invalid_values_fail_at_start_up(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("CXR_").lower()):
        Settings()


def test_the_default_model_path_resolves_under_the_project_root():
    assert Settings().resolved_model_metadata() == PROJECT_ROOT / "models" / "pneumonia_cxr.json"


def test_a_relative_path_present_in_the_working_directory_wins(tmp_path):
    (tmp_path / "mine.json").write_text("{}")
    assert Settings(model_metadata=Path("mine.json")).resolved_model_metadata() == (
        tmp_path / "mine.json"
    )


def test_an_absolute_path_is_used_as_is(tmp_path):
    target = tmp_path / "elsewhere" / "m.json"
    assert Settings(model_metadata=target).resolved_model_metadata() == target


def test_onnx_runtime_threads_default_to_the_usable_cores(monkeypatch, tmp_path):
    monkeypatch.setattr("app.settings.CGROUP_ROOT", tmp_path)  # no CPU quota
    monkeypatch.setenv("CXR_DECODE_CONCURRENCY", "7")
    assert Settings().ort_threads == len(os.sched_getaffinity(0))
    monkeypatch.setenv("CXR_ORT_INTRA_OP_THREADS", "3")
    assert Settings().ort_threads == 3


def test_decode_concurrency_bounds_the_decode_slots(monkeypatch, tmp_path):
    monkeypatch.setattr("app.settings.CGROUP_ROOT", tmp_path)  # no CPU quota
    monkeypatch.setenv("CXR_DECODE_CONCURRENCY", "3")
    assert Settings().decode_slots == 3
    monkeypatch.setenv("CXR_DECODE_CONCURRENCY", "0")
    assert Settings().decode_slots == min(len(os.sched_getaffinity(0)), 4) + 1
    monkeypatch.setenv("CXR_DECODE_CONCURRENCY", "-1")
    with pytest.raises(ValidationError):
        Settings()
