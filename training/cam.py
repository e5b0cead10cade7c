"""Class activation maps for an exported model: expose the last feature map as a second ONNX output
and record the dense head's weights in the metadata (`app.contract.CamSpec`).

A network that ends in global average pooling then one dense layer (`cxr_net`) gives exact maps:
CAM_c = sum_k w[k, c] * f_k, whose spatial mean is logit_c - b_c. The weights are read from the
ONNX graph itself (the initializers its MatMul/Add or Gemm use), so the metadata describes exactly
what is served; the feature map is the input of its GlobalAveragePool (NCHW, ONNX's layout for it).
`training.export` attaches it to every export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.contract import CamSpec

CAM_OUTPUT_NAME = "cam_features"
# Ops that only drop the pooled (1, 1) spatial axes between the pooling and the dense layer.
_PASS_THROUGH = {"Squeeze", "Reshape", "Flatten", "Identity"}


class NoCamHead(ValueError):
    """The graph does not end in global average pooling then one dense layer."""


@dataclass(frozen=True)
class CamHead:
    feature_tensor: str  # the GlobalAveragePool input
    weights: np.ndarray  # (channels, classes)
    bias: np.ndarray  # (classes,)


def find_cam_head(model: Any, logits_name: str) -> CamHead:
    """Trace `logits_name` back through the dense layer to the global average pooling."""
    from onnx import numpy_helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    node = producer.get(logits_name)
    if node is None:
        raise NoCamHead(f"no node produces {logits_name!r}")

    if node.op_type == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        weights = constants.get(node.input[1])
        bias = constants.get(node.input[2]) if len(node.input) > 2 else None
        if weights is None or bias is None or ("transA" in attrs and attrs["transA"].i):
            raise NoCamHead("the dense layer is a Gemm without constant weights and bias")
        if "transB" in attrs and attrs["transB"].i:
            weights = weights.T
        pooled = node.input[0]
    elif node.op_type == "Add":
        bias_name = next((i for i in node.input if i in constants), None)
        matmul = next((producer.get(i) for i in node.input if i not in constants), None)
        if bias_name is None or matmul is None or matmul.op_type != "MatMul":
            raise NoCamHead("the logits are not MatMul + bias")
        weights = constants.get(matmul.input[1])
        bias = constants[bias_name]
        if weights is None:
            raise NoCamHead("the dense layer's weights are not a constant")
        pooled = matmul.input[0]
    elif node.op_type == "MatMul" and node.input[1] in constants:
        # a zero bias (an untrained head) is folded away by the converter
        weights = constants[node.input[1]]
        bias = np.zeros(weights.shape[-1], dtype=np.float32)
        pooled = node.input[0]
    else:
        raise NoCamHead(f"the logits come from {node.op_type}, not a dense layer")

    source = producer.get(pooled)
    while source is not None and source.op_type in _PASS_THROUGH:
        source = producer.get(source.input[0])
    if source is None or source.op_type != "GlobalAveragePool":
        raise NoCamHead("the dense layer is not fed by global average pooling")
    weights = np.asarray(weights, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32).reshape(-1)
    if weights.ndim != 2 or weights.shape[1] != bias.size:
        raise NoCamHead(f"unexpected dense weights {weights.shape} / bias {bias.shape}")
    return CamHead(source.input[0], weights, bias)


def add_cam_output(model: Any, logits_name: str) -> tuple[Any, CamSpec, list[int | None]]:
    """A copy of `model` with the feature map as output `cam_features`, its `CamSpec`, and the
    output's shape (batch dynamic)."""
    import onnx
    from onnx import helper, shape_inference

    head = find_cam_head(model, logits_name)
    inferred = shape_inference.infer_shapes(model)
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    info = known.get(head.feature_tensor)
    if info is None:
        raise NoCamHead(f"no shape is known for {head.feature_tensor!r}")
    dims = [
        d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim
    ]
    if len(dims) != 4 or dims[1] != head.weights.shape[0]:
        raise NoCamHead(f"feature map {dims} does not match {head.weights.shape[0]} channels")
    shape: list[int | None] = [None, *dims[1:]]

    updated = onnx.ModelProto()
    updated.CopyFrom(model)
    updated.graph.node.append(
        helper.make_node("Identity", [head.feature_tensor], [CAM_OUTPUT_NAME], name="cam_features")
    )
    output = helper.make_tensor_value_info(
        CAM_OUTPUT_NAME, onnx.TensorProto.FLOAT, ["batch", *dims[1:]]
    )
    updated.graph.output.append(output)
    onnx.checker.check_model(updated)
    weights, bias = head.weights.tolist(), head.bias.tolist()
    spec = CamSpec(
        feature_output=CAM_OUTPUT_NAME,
        weights=weights,
        bias=bias,
        sha256=CamSpec.digest(weights, bias),
    )
    return updated, spec, shape


def cam_metadata_entries(spec: CamSpec, shape: list[int | None]) -> tuple[dict, dict]:
    """The `outputs` entry and the `cam` block for the metadata JSON."""
    output = {
        "name": spec.feature_output,
        "shape": shape,
        "dtype": "float32",
        "role": "cam_features",
        "layout": "NCHW",
    }
    return output, spec.model_dump()


def attach_cam_output(onnx_path: Path, logits_name: str) -> tuple[dict, dict] | None:
    """Rewrite an exported ONNX file with the CAM output; the metadata entries, or None (with the
    reason printed) for an architecture without a pooling-then-dense head."""
    import onnx

    try:
        updated, spec, shape = add_cam_output(onnx.load(str(onnx_path)), logits_name)
    except NoCamHead as exc:
        print(f"[cam] no class activation maps for this architecture: {exc}", flush=True)
        return None
    onnx.save(updated, str(onnx_path))
    print(f"[cam] added output {CAM_OUTPUT_NAME} {shape}", flush=True)
    return cam_metadata_entries(spec, shape)
