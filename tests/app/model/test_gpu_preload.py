"""The CUDA libraries are preloaded before the first ONNX Runtime session, and only when a session
may use CUDA. (No GPU here: onnxruntime-gpu's presence is simulated; the GPU image's real
libraries are checked by scripts/ci/check_gpu_image.py inside the image, in CI.)"""

from __future__ import annotations

import logging

import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.model import gpu, loading
from tests.support.testkit import make_settings


@pytest.fixture
def ort_calls(monkeypatch):
    """Record preload_dlls and InferenceSession calls, in order."""
    calls: list[tuple[str, object]] = []
    real_session = loading.ort.InferenceSession

    def preload(**kwargs):
        calls.append(("preload", kwargs))
        print("Failed to load libcudnn_graph.so.9: not found")  # ORT reports by printing

    def session(*args, **kwargs):
        calls.append(("session", kwargs.get("providers")))
        return real_session(*args, **{**kwargs, "providers": ["CPUExecutionProvider"]})

    monkeypatch.setattr(ort, "preload_dlls", preload)
    monkeypatch.setattr(loading.ort, "InferenceSession", session)
    return calls


@pytest.fixture
def cuda_runtime(monkeypatch):
    """Pretend the installed onnxruntime is onnxruntime-gpu."""
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)


@pytest.fixture
def gpu_log():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("app.model.gpu")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_preload_runs_before_the_first_session_when_cuda_is_possible(
    model_path, ort_calls, cuda_runtime, gpu_log
):
    with TestClient(create_app(make_settings(model_path, provider="auto"))) as client:
        assert client.get("/health/ready").status_code == 200
    assert [name for name, _ in ort_calls] == ["preload", "session"]
    assert ort_calls[0][1] == {"cuda": True, "cudnn": True, "msvc": False}
    assert ort_calls[1][1] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    warnings = [r for r in gpu_log if r.levelno == logging.WARNING]
    assert [r.fields["message"] for r in warnings] == [  # type: ignore[attr-defined]
        "Failed to load libcudnn_graph.so.9: not found"
    ]


@pytest.mark.parametrize(("provider", "with_cuda"), [("cpu", True), ("auto", False)])
def test_no_preload_when_no_session_can_use_cuda(
    model_path, ort_calls, monkeypatch, provider, with_cuda
):
    if with_cuda:
        monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    with TestClient(create_app(make_settings(model_path, provider=provider))) as client:
        assert client.get("/health/ready").status_code == 200
    assert [name for name, _ in ort_calls] == ["session"]


def test_loaded_cuda_libraries_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    nvidia = "/opt/venv/lib/python3.11/site-packages/nvidia"
    maps.write_text(
        f"7f00-7f01 r-xp 00000000 08:01 1 {nvidia}/cuda_runtime/lib/libcudart.so.13\n"
        f"7f01-7f02 r--p 00001000 08:01 1 {nvidia}/cuda_runtime/lib/libcudart.so.13\n"
        f"7f02-7f03 r-xp 00000000 08:01 2 {nvidia}/cudnn/lib/libcudnn.so.9\n"
        f"7f03-7f04 r-xp 00000000 08:01 3 {nvidia}/cublas/lib/libcublasLt.so.13\n"
        "7f04-7f05 r-xp 00000000 08:01 4 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f05-7f06 rw-p 00000000 00:00 0 [heap]\n"
    )
    assert gpu.loaded_cuda_libraries(maps) == [
        "libcublasLt.so.13",
        "libcudart.so.13",
        "libcudnn.so.9",
    ]
    assert gpu.loaded_cuda_libraries(tmp_path / "absent") == []
