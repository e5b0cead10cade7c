"""Builders shared by the service tests: tiny ONNX models, their metadata, isolated settings and
synthetic images. (A plain module, not conftest, so test files can import it by a unique name.)

The tiny model computes logits = mean(image) * W + b, so a dark image is NORMAL and a bright one
PNEUMONIA: tests can predict the answer without a trained network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper
from PIL import Image

from app.settings import Settings

SIZE = 224
CLASSES = ["NORMAL", "PNEUMONIA"]
# Written out here rather than imported from `training`: the service tests do not depend on it.
DICOM_RENDERING: dict[str, Any] = {
    "voi_order": ["window", "voi_lut_sequence", "full_range"],
    "window_index": 0,
    "full_range_excludes_padding": True,
    "invert": "monochrome1_or_presentation_inverse",
    "padding_value": 0,
}
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
INTENDED_USE: dict[str, Any] = {
    "summary": "test model: frontal chest radiographs of children aged 1 to 5",
    "modalities": ["CR", "DX"],
    "sop_class_uids": {CR_STORAGE: "CR Image Storage", DX_STORAGE: "DX Image Storage"},
    "body_parts": ["CHEST", "THORAX", "LUNG"],
    "refused_view_positions": ["LL", "RL", "LATERAL", "LAT"],
    "training_population": {
        "description": "children aged 1 to 5 years",
        "age_years_min": 1.0,
        "age_years_max": 6.0,
    },
}


def build_onnx(
    *,
    input_name: str = "image",
    input_shape: tuple[int | str, ...] = ("N", SIZE, SIZE, 1),
    output_name: str = "logits",
    n_outputs: int = 2,
    bias_value: float = 2.0,
) -> bytes:
    """Serialized ONNX: image (NHWC) -> ReduceMean(H, W) -> MatMul -> Add -> logits.

    `bias_value=float("nan")` makes a graph that loads fine but answers NaN.
    """
    channels = input_shape[3] if isinstance(input_shape[3], int) else 1
    weight = np.zeros((channels, n_outputs), dtype=np.float32)
    weight[:, 0], weight[:, -1] = -4.0 / channels, 4.0 / channels
    bias = np.zeros(n_outputs, dtype=np.float32)
    bias[0], bias[-1] = bias_value, -bias_value
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", [input_name], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["mean", "W"], ["scores"]),
            helper.make_node("Add", ["scores", "b"], [output_name]),
        ],
        "tiny_cxr",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", n_outputs])],
        initializer=[
            helper.make_tensor("W", TensorProto.FLOAT, weight.shape, weight.flatten().tolist()),
            helper.make_tensor("b", TensorProto.FLOAT, bias.shape, bias.tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # opset 17's IR version; onnxruntime 1.31 reads it
    onnx.checker.check_model(model)
    return model.SerializeToString()


def metadata_for(onnx_bytes: bytes, **overrides: Any) -> dict[str, Any]:
    """A metadata dict valid under `ModelMetadata` for the tiny model; overrides replace keys."""
    meta: dict[str, Any] = {
        "schema_version": 2,
        "name": "tiny_cxr",
        "version": "0.0.1-test",
        "onnx_file": "tiny_cxr.onnx",
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "classes": list(CLASSES),
        "input": {"name": "image", "shape": [None, SIZE, SIZE, 1], "dtype": "float32"},
        "output": {"name": "logits", "shape": [None, 2], "dtype": "float32", "kind": "logits"},
        "preprocessing": {
            "color_mode": "grayscale",
            "height": SIZE,
            "width": SIZE,
            "resize_filter": "bilinear",
            "scale": 1 / 255,
            "offset": 0.0,
            "dicom": dict(DICOM_RENDERING),
        },
        "decision": {"threshold": 0.5, "positive_class": "PNEUMONIA"},
        "calibration": {"method": "temperature", "temperature": 1.0},
        "intended_use": dict(INTENDED_USE),
        "metrics": {"test": {"auroc": 0.5}},
        "provenance": {"note": "built by tests/app/conftest.py"},
    }
    meta.update(overrides)
    return meta


def make_settings(metadata: Path, **overrides: Any) -> Settings:
    """Settings isolated from the developer's environment and `.env`."""
    values: dict[str, Any] = {
        "model_metadata": metadata,
        "provider": "cpu",
        "ort_intra_op_threads": 1,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def xray_like(size: tuple[int, int] = (300, 260), mode: str = "L", level: int = 200) -> Image.Image:
    """A synthetic image with structure (a gradient plus a bright disc) in the requested mode."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    grey = (xx * 120 // max(width - 1, 1)).astype(np.uint8)
    disc = (xx - width // 2) ** 2 + (yy - height // 2) ** 2 < (min(size) // 4) ** 2
    grey[disc] = level
    image = Image.fromarray(grey)
    return image if mode == "L" else image.convert(mode)


def encode(image: Image.Image, fmt: str, **save_kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


REPO_ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def uvicorn_serving_tiny_model(workdir: Path, **env: str) -> Iterator[tuple[str, int]]:
    """`python -m uvicorn app.main:app` on a free 127.0.0.1 port serving the tiny model, `CXR_*`
    settings from `env`; yields (base URL, process id) once ready, and stops it afterwards."""
    import httpx

    onnx_bytes = build_onnx()
    meta = metadata_for(onnx_bytes)
    (workdir / meta["onnx_file"]).write_bytes(onnx_bytes)
    (workdir / "model.json").write_text(json.dumps(meta))
    child_env = {key: value for key, value in os.environ.items() if not key.startswith("CXR_")}
    child_env.update(CXR_MODEL_METADATA=str(workdir / "model.json"), CXR_PROVIDER="cpu", **env)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
         "--port", str(port), "--no-access-log"],
        cwd=REPO_ROOT, env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the service never became ready")
            time.sleep(0.05)
        yield base, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)
