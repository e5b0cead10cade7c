"""Builders shared by the service tests: tiny ONNX models, their metadata, isolated settings and
synthetic images. (A plain module, not conftest, so test files can import it by a unique name.)

The tiny model computes logits = mean(image) * W + b, so a dark image is NORMAL and a bright one
PNEUMONIA: tests can predict the answer without a trained network.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper
from PIL import Image

from app.contract import SCHEMA_VERSION
from app.settings import Settings
from app.testing.server import ServiceProcess

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
    busy_work: int = 0,
) -> bytes:
    """Serialized ONNX: image (NHWC) -> ReduceMean(H, W) -> MatMul -> Add -> logits.

    `bias_value=float("nan")` makes a graph that loads fine but answers NaN. `busy_work=k` adds a
    branch that squares the image tiled k x k times as a matrix and adds it to the logits times
    zero: the same answers, but each run costs real CPU time (k=6: a 1344x1344 matrix product).
    """
    channels = input_shape[3] if isinstance(input_shape[3], int) else 1
    weight = np.zeros((channels, n_outputs), dtype=np.float32)
    weight[:, 0], weight[:, -1] = -4.0 / channels, 4.0 / channels
    bias = np.zeros(n_outputs, dtype=np.float32)
    bias[0], bias[-1] = bias_value, -bias_value
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["mean", "W"], ["scores"]),
        helper.make_node("Add", ["scores", "b"], [output_name]),
    ]
    initializers = [
        helper.make_tensor("W", TensorProto.FLOAT, weight.shape, weight.flatten().tolist()),
        helper.make_tensor("b", TensorProto.FLOAT, bias.shape, bias.tolist()),
    ]
    if busy_work:
        nodes[1:2] = [
            helper.make_node("MatMul", ["mean", "W"], ["plain_scores"]),
            helper.make_node("ReduceMean", [input_name], ["grey"], axes=[3], keepdims=0),
            helper.make_node("Tile", ["grey", "repeats"], ["tiled"]),
            helper.make_node("MatMul", ["tiled", "tiled"], ["squared"]),
            helper.make_node("ReduceMean", ["squared"], ["busy"], axes=[1, 2], keepdims=1),
            helper.make_node("Reshape", ["busy", "column"], ["busy_column"]),
            helper.make_node("Mul", ["busy_column", "zero"], ["nothing"]),
            helper.make_node("Add", ["plain_scores", "nothing"], ["scores"]),
        ]
        initializers += [
            helper.make_tensor("repeats", TensorProto.INT64, [3], [1, busy_work, busy_work]),
            helper.make_tensor("column", TensorProto.INT64, [2], [-1, 1]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        ]
    graph = helper.make_graph(
        nodes,
        "tiny_cxr",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", n_outputs])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # opset 17's IR version; onnxruntime 1.31 reads it
    onnx.checker.check_model(model)
    return model.SerializeToString()


def metadata_for(onnx_bytes: bytes, **overrides: Any) -> dict[str, Any]:
    """A metadata dict in the current schema, valid under `ModelMetadata` for the tiny model;
    overrides replace keys. `output=` (one spec) stands for the classifier output."""
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": "tiny_cxr",
        "version": "0.0.1-test",
        "onnx_file": "tiny_cxr.onnx",
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "classes": list(CLASSES),
        "input": {"name": "image", "shape": [None, SIZE, SIZE, 1], "dtype": "float32"},
        "outputs": [
            {
                "name": "logits",
                "shape": [None, 2],
                "dtype": "float32",
                "role": "classifier",
                "kind": "logits",
            }
        ],
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
        "provenance": {"note": "built by tests/support/testkit.py"},
    }
    if "output" in overrides:
        meta["outputs"] = [{**overrides.pop("output"), "role": "classifier"}]
    meta.update(overrides)
    return meta


def schema2_metadata_for(onnx_bytes: bytes) -> dict[str, Any]:
    """The same model described in schema 2 (one `output`, no explanations): what models exported
    before class activation maps carry, and the service must still load."""
    meta = metadata_for(onnx_bytes, schema_version=2)
    (output,) = meta.pop("outputs")
    output.pop("role")
    meta["output"] = output
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


def build_cam_onnx(channels: int = 4, patch: int = 32) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A tiny CAM-able model: image (NHWC) -> Transpose -> Conv(patch x patch, stride patch) ->
    Relu -> GlobalAveragePool -> Flatten -> MatMul -> Add -> logits, plus the Relu output as
    `cam_features` (NCHW). Channel 0 sums brightness; PNEUMONIA weighs it up, NORMAL down.
    Returns (serialized model, dense weights (channels, 2), bias (2,))."""
    rng = np.random.default_rng(5)
    conv = rng.normal(0.0, 0.002, (channels, 1, patch, patch)).astype(np.float32)
    conv[0] = 1.0 / (patch * patch)  # the patch's mean brightness
    dense = rng.normal(0.0, 0.5, (channels, 2)).astype(np.float32)
    dense[0] = (-6.0, 6.0)
    bias = np.array([3.0, -3.0], dtype=np.float32)
    grid = SIZE // patch
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["nchw", "K"], ["conv"], strides=[patch, patch]),
            helper.make_node("Relu", ["conv"], ["features"]),
            helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "W"], ["scores"]),
            helper.make_node("Add", ["scores", "b"], ["logits"]),
            helper.make_node("Identity", ["features"], ["cam_features"]),
        ],
        "tiny_cam_cxr",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", SIZE, SIZE, 1])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info(
                "cam_features", TensorProto.FLOAT, ["N", channels, grid, grid]
            ),
        ],
        initializer=[
            helper.make_tensor("K", TensorProto.FLOAT, conv.shape, conv.flatten().tolist()),
            helper.make_tensor("W", TensorProto.FLOAT, dense.shape, dense.flatten().tolist()),
            helper.make_tensor("b", TensorProto.FLOAT, bias.shape, bias.tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString(), dense, bias


def cam_metadata_for(onnx_bytes: bytes, dense: np.ndarray, bias: np.ndarray) -> dict[str, Any]:
    """Schema-3 metadata for `build_cam_onnx`'s model, written out by hand."""
    weights, biases = dense.tolist(), bias.tolist()
    data = np.asarray(weights, "<f4").tobytes() + np.asarray(biases, "<f4").tobytes()
    channels, grid = dense.shape[0], SIZE // 32
    meta = metadata_for(onnx_bytes, name="tiny_cam_cxr")
    meta["outputs"] = [
        {"name": "logits", "shape": [None, 2], "role": "classifier", "kind": "logits"},
        {
            "name": "cam_features",
            "shape": [None, channels, grid, grid],
            "role": "cam_features",
            "layout": "NCHW",
        },
    ]
    meta["cam"] = {
        "feature_output": "cam_features",
        "weights": weights,
        "bias": biases,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return meta


# ---- a real server process -------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_model_dir(directory: Path, **onnx_kwargs: Any) -> Path:
    """A tiny model and its metadata in `directory`; returns the metadata path."""
    onnx_bytes = build_onnx(**onnx_kwargs)
    meta = metadata_for(onnx_bytes)
    (directory / meta["onnx_file"]).write_bytes(onnx_bytes)
    path = directory / "model.json"
    path.write_text(json.dumps(meta))
    return path


def process_settings(model_dir: Path, busy_work: int = 0, **overrides: str) -> dict[str, str]:
    """`CXR_*` settings for a server process on a tiny model written into `model_dir` (see
    `build_onnx` for `busy_work`): CPU, one thread, and no drain window (no load balancer in front
    to wait for). Other keyword arguments name settings without their prefix:
    `api_keys="..."` sets CXR_API_KEYS."""
    settings = {
        "CXR_MODEL_METADATA": str(write_model_dir(model_dir, busy_work=busy_work)),
        "CXR_PROVIDER": "cpu",
        "CXR_ORT_INTRA_OP_THREADS": "1",
        "CXR_DRAIN_SECONDS": "0",
    }
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown:  # the service would ignore them, and the test would test nothing
        raise ValueError(f"not settings of the service: {unknown}")
    settings.update({f"CXR_{name.upper()}": value for name, value in overrides.items()})
    return settings


# The one server-process helper, shared with the benchmark.
UvicornProcess = ServiceProcess


@contextmanager
def uvicorn_serving_tiny_model(workdir: Path, **env: str) -> Iterator[tuple[str, int]]:
    """`UvicornProcess.serving` on the tiny model with extra `CXR_*` settings from `env`; yields
    (base URL, process id) once ready, and stops it afterwards."""
    settings = {**process_settings(workdir), **env}
    with UvicornProcess.serving(workdir / "server.log", settings) as server:
        yield server.base_url, server.process.pid


def site_profile_for(
    sha256: str,
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    threshold: float = 0.5,
    name: str = "test-site",
) -> dict[str, Any]:
    """A valid site profile (the format of `app.model.site_profile`) for the model `sha256`:
    p' = sigmoid(slope * logit(p) + intercept), PNEUMONIA when p' >= threshold."""
    return {
        "schema_version": 1,
        "name": name,
        "model": {"name": "tiny_cxr", "version": "0.0.1-test", "sha256": sha256},
        "recalibration": {
            "method": "platt",
            "slope": slope,
            "intercept": intercept,
            "reason": "written by tests/support/testkit.py",
            "fitted_on_images": 100,
            "fitted_on_patients": 80,
            "log_loss_before": 0.5,
            "log_loss_after": 0.3,
        },
        "operating": {
            "positive_class": "PNEUMONIA",
            "threshold": threshold,
            "target_sensitivity": 0.95,
            "margin": "none: a test profile",
            "margin_confidence": 0.9,
            "shipped_threshold": 0.5,
        },
        "data": {
            "n_images": 100,
            "n_patients": 80,
            "n_positive": 50,
            "n_negative": 50,
            "n_refused": 0,
            "created": "2026-12-01T09:00:00+00:00",
            "source": "kaggle",
        },
        "figures": {"auc": 0.9},
    }
