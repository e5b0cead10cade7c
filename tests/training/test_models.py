"""Every selectable architecture builds on the contract's input and returns two logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras", reason="the train extra (TensorFlow/Keras) is not installed")

from training.models import ARCHITECTURES, build_model, unfreeze_top  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_outputs_two_logits(name: str) -> None:
    model = build_model(name)
    x = np.random.default_rng(0).random((2, 224, 224, 1), dtype=np.float32)
    out = np.asarray(model(x, training=False))
    assert out.shape == (2, 2)
    assert np.isfinite(out).all()


def test_default_ends_in_global_average_pooling_then_classifier() -> None:
    model = build_model("cxr_net")
    assert [type(layer).__name__ for layer in model.layers[-3:]] == [
        "GlobalAveragePooling2D",
        "Dropout",
        "Dense",
    ]


def test_cxr_net_7_is_cxr_net_without_its_last_pooling() -> None:
    """Same weights, same head; the class activation map has 7x7 cells instead of 3x3."""
    seven, three = build_model("cxr_net_7"), build_model("cxr_net")
    assert seven.count_params() == three.count_params()
    assert [w.shape for w in seven.weights] == [w.shape for w in three.weights]
    assert tuple(seven.get_layer("gap").input.shape[1:3]) == (7, 7)
    assert tuple(three.get_layer("gap").input.shape[1:3]) == (3, 3)
    assert "stage4_pool" not in {layer.name for layer in seven.layers}


def test_resnet_small_ends_on_the_same_7x7_grid_as_cxr_net_7() -> None:
    """Plain 3x3 convolutions (no separable ones), the same 7x7 last map and GAP -> Dense head, so
    it can join `cxr_net_7` members in one CAM-exact ensemble."""
    model = build_model("resnet_small")
    assert tuple(model.get_layer("gap").input.shape[1:]) == (7, 7, 256)
    kinds = {type(layer).__name__ for layer in model.layers}
    assert "Conv2D" in kinds and "SeparableConv2D" not in kinds
    assert [type(layer).__name__ for layer in model.layers[-3:]] == [
        "GlobalAveragePooling2D",
        "Dropout",
        "Dense",
    ]
    assert build_model("resnet_small", width=16).count_params() < model.count_params()


def test_mobilenet_loads_a_local_weights_file(tmp_path: Path) -> None:
    donor = keras.applications.MobileNetV2(
        input_shape=(224, 224, 3), include_top=False, weights=None
    )
    weights = tmp_path / "mobilenet_v2_no_top.weights.h5"
    donor.save_weights(weights)
    model = build_model("mobilenet_v2", weights=weights)
    base = model.fine_tune_base
    for mine, theirs in zip(base.weights, donor.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    assert not base.trainable


def test_mobilenet_fine_tuning_unfreezes_only_the_top() -> None:
    model = build_model("mobilenet_v2")
    unfreeze_top(model, trainable_from=100)
    layers = model.fine_tune_base.layers
    assert not any(layer.trainable for layer in layers[:100] if layer.weights)
    assert any(layer.trainable for layer in layers[100:])
    assert not any(
        layer.trainable for layer in layers if isinstance(layer, keras.layers.BatchNormalization)
    )


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet9000")
