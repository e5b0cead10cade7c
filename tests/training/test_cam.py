"""Class activation maps are exact: the map the service computes from the exported graph's feature
output and the metadata's weights is the one the Keras model defines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the train extra (TensorFlow/Keras) is not installed")

from tests.support.realdata import DATA_DIR, requires_data
from training import cam, export

pytestmark = pytest.mark.slow


GRID = {"cxr_net": (3, 3), "cxr_net_7": (7, 7), "resnet_small": (7, 7)}


@pytest.fixture(scope="module", params=sorted(GRID))
def keras_and_served(request, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A seeded network (1.0's `cxr_net`, 3x3 map; `cxr_net_7` and `resnet_small`, 7x7) with a
    non-zero dense bias, exported by the release path, and served."""
    import keras

    from app.model.loading import load_classifier
    from app.settings import Settings
    from training.intended_use import PAEDIATRIC_CHEST_XRAY
    from training.models import build_model
    from training.preprocessing import DEFAULT_PREPROCESSING

    keras.utils.set_random_seed(11)
    model = build_model(request.param, (224, 224, 1))
    dense = model.get_layer("logits")
    kernel, _ = dense.get_weights()
    dense.set_weights([kernel * 3.0, np.array([0.25, -0.4], dtype=np.float32)])

    out = tmp_path_factory.mktemp("cam_model")
    onnx_path = out / "cam_net.onnx"
    export.convert_to_onnx(model, onnx_path, 224, 224, 1)
    entries = cam.attach_cam_output(onnx_path, export.OUTPUT_NAME)
    assert entries is not None
    summary = {
        "validation_metrics": {},
        "decision": {"threshold": 0.5, "target_sensitivity": 0.95},
        "calibration": {"method": "temperature", "temperature": 1.0},
        "architecture": request.param,
        "parameters": model.count_params(),
        "data": {},
        **dict.fromkeys(export.TRAINING_RECORD_KEYS),
    }
    meta = export.build_metadata(
        "cam_net", "0.0.1", onnx_path, summary, {}, DEFAULT_PREPROCESSING, entries
    )
    assert meta["intended_use"] == PAEDIATRIC_CHEST_XRAY.model_dump()
    meta_path = out / "cam_net.json"
    meta_path.write_text(json.dumps(meta))
    return model, load_classifier(Settings(model_metadata=meta_path, provider="cpu")), onnx_path


def _keras_features_and_logits(model, tensor: np.ndarray):  # type: ignore[no-untyped-def]
    import keras

    features_model = keras.Model(model.inputs, [model.get_layer("gap").input, model.output])
    features, logits = features_model.predict(tensor, verbose=0)
    return np.asarray(features)[0].astype(np.float64), np.asarray(logits)[0]


@requires_data
def test_served_maps_equal_the_keras_models_on_real_x_rays(keras_and_served) -> None:  # type: ignore[no-untyped-def]
    model, classifier, _ = keras_and_served
    kernel, bias = model.get_layer("logits").get_weights()
    paths = sorted((DATA_DIR / "test").glob("*/*.jpeg"))[::40]
    assert len(paths) >= 15
    worst = 0.0
    for path in paths:
        tensor = classifier.preprocess(path.read_bytes())
        features, logits = _keras_features_and_logits(model, tensor)
        for index, name in enumerate(classifier.metadata.classes):
            _, served = classifier.predict_with_cam(tensor, name)
            expected = np.tensordot(features, kernel[:, index], axes=1)
            assert served.grid.shape == expected.shape == GRID[model.name]
            scaled = (expected - expected.min()) / (expected.max() - expected.min())
            worst = max(worst, float(np.abs(served.normalised - scaled).max()))
            # global average pooling: the map's mean plus the bias is the class logit
            assert served.grid.mean() + bias[index] == pytest.approx(logits[index], abs=1e-4)
    assert worst < 1e-4, worst


def test_served_maps_are_the_formula_on_the_graphs_features(
    keras_and_served, tiny_kaggle_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    """Without the data set: the served map is sum_k w_k f_k over the ONNX feature output (to
    rounding), and that output is the Keras feature map within the export's parity tolerance."""
    model, classifier, _ = keras_and_served
    meta = classifier.metadata
    kernel, _ = model.get_layer("logits").get_weights()
    session = classifier._session
    for path in sorted((tiny_kaggle_dir / "test").glob("*/*.jpeg"))[::6]:
        tensor = classifier.preprocess(path.read_bytes())
        (onnx_features,) = session.run(["cam_features"], {meta.input.name: tensor})
        features, _ = _keras_features_and_logits(model, tensor)
        channels_last = np.moveaxis(onnx_features[0], 0, -1)
        assert np.abs(channels_last - features).max() <= export.DEFAULT_TOLERANCE
        for index, name in enumerate(meta.classes):
            _, served = classifier.predict_with_cam(tensor, name)
            by_hand = np.tensordot(channels_last.astype(np.float64), kernel[:, index], axes=1)
            np.testing.assert_allclose(served.grid, by_hand, rtol=1e-6, atol=1e-9)


def test_the_metadata_weights_are_the_keras_dense_layer(keras_and_served) -> None:  # type: ignore[no-untyped-def]
    model, classifier, _ = keras_and_served
    kernel, bias = model.get_layer("logits").get_weights()
    spec = classifier.metadata.cam
    assert spec is not None
    np.testing.assert_array_equal(np.asarray(spec.weights, dtype=np.float32), kernel)
    np.testing.assert_array_equal(np.asarray(spec.bias, dtype=np.float32), bias)


def test_an_architecture_without_a_pooling_head_exports_without_maps(tmp_path: Path) -> None:
    import keras

    from training.models import build_model

    keras.utils.set_random_seed(2)
    model = build_model("seed_cnn", (224, 224, 1))
    onnx_path = tmp_path / "seed.onnx"
    export.convert_to_onnx(model, onnx_path, 224, 224, 1)
    assert cam.attach_cam_output(onnx_path, export.OUTPUT_NAME) is None


def test_attaching_the_cam_output_keeps_the_scores(keras_and_served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Adding the feature-map output to a graph without one (what every export does) leaves its
    logits bit-identical, and the new output explains them exactly."""
    import onnx
    import onnxruntime as ort

    _, classifier, onnx_path = keras_and_served
    # The graph as the converter writes it: no feature output.
    graph = onnx.load(str(onnx_path))
    kept = [o for o in graph.graph.output if o.name != "cam_features"]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    nodes = [n for n in graph.graph.node if "cam_features" not in n.output]
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    plain = tmp_path / "plain.onnx"
    onnx.save(graph, str(plain))

    x = np.random.default_rng(1).random((2, 224, 224, 1), dtype=np.float32)
    (expected,) = ort.InferenceSession(str(plain)).run(["logits"], {"image": x})
    entries = cam.attach_cam_output(plain, "logits")
    assert entries is not None
    output_entry, cam_entry = entries
    assert output_entry["role"] == "cam_features" and "kind" not in output_entry
    logits, features = ort.InferenceSession(str(plain)).run(
        ["logits", "cam_features"], {"image": x}
    )
    np.testing.assert_array_equal(logits, expected)
    weights = np.asarray(cam_entry["weights"])
    cells = features.shape[2] * features.shape[3]
    assert features.shape[2:] == GRID[keras_and_served[0].name]
    means = np.einsum("nkhw,kc->nc", features.astype(np.float64), weights) / cells
    np.testing.assert_allclose(means + np.asarray(cam_entry["bias"]), logits, atol=1e-4)
    assert cam_entry["weights"] == classifier.metadata.cam.weights
