"""Fixtures for the service tests: tiny ONNX models with valid (or deliberately broken) metadata,
and clients on services built from them. The builders live in `tests.support.testkit`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.support.testkit import build_onnx, make_settings, metadata_for

ModelWriter = Callable[..., Path]


@pytest.fixture
def write_model(tmp_path: Path) -> ModelWriter:
    """Write an ONNX file plus metadata JSON into tmp_path; returns the metadata path.

    `onnx_kwargs` go to `build_onnx`; other keyword arguments override metadata keys.
    """

    def write(onnx_kwargs: dict[str, Any] | None = None, **meta_overrides: Any) -> Path:
        onnx_bytes = build_onnx(**(onnx_kwargs or {}))
        meta = metadata_for(onnx_bytes, **meta_overrides)
        (tmp_path / meta["onnx_file"]).write_bytes(onnx_bytes)
        path = tmp_path / "tiny_cxr.json"
        path.write_text(json.dumps(meta), encoding="utf-8")
        return path

    return write


@pytest.fixture
def model_path(write_model: ModelWriter) -> Path:
    return write_model()


@pytest.fixture
def client(model_path: Path) -> Iterator[TestClient]:
    """A client on a ready service (the lifespan has loaded and warmed up the tiny model)."""
    with TestClient(create_app(make_settings(model_path))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium for the page tests (see `tests.support.offline_browser`)."""
    from tests.support.offline_browser import launch_browser

    with launch_browser() as launched:
        yield launched
