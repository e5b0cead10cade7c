"""The start-up gate: metadata validation, ONNX/metadata matching, providers, calibration."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from pydantic import ValidationError

from app.contract import ModelMetadata
from app.errors import ModelLoadError
from app.model.classifier import calibrated_probabilities
from app.model.loading import CPU_PROVIDER, CUDA_PROVIDER, load_classifier, select_providers
from tests.support.testkit import build_onnx, make_settings, metadata_for

VALID = metadata_for(build_onnx())
THREE_CLASSES = ["NORMAL", "PNEUMONIA", "OTHER"]


# ---- metadata validation -------------------------------------------------------------------


def test_the_fixture_metadata_is_valid():
    meta = ModelMetadata.model_validate(VALID)
    assert meta.positive_index == 1
    assert meta.preprocessing.channels == 1


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"sha256": "not-a-hash"}, "sha256"),
        ({"classes": ["NORMAL"]}, "classes"),
        ({"classes": ["NORMAL", "NORMAL"]}, "unique"),
        ({"decision": {"threshold": 0.5, "positive_class": "COVID"}}, "positive_class"),
        ({"decision": {"threshold": 1.5, "positive_class": "PNEUMONIA"}}, "threshold"),
        (
            {"input": {"name": "image", "shape": [None, 128, 128, 1]}},
            "does not match preprocessing",
        ),
        (
            {"outputs": [{"name": "logits", "shape": [None, 3], "role": "classifier"}]},
            "does not match 2 classes",
        ),
        ({"calibration": {"method": "temperature", "temperature": 0}}, "temperature"),
        ({"schema_version": 4}, "schema_version"),
        ({"schema_version": 1}, "predates DICOM"),
        ({"intended_use": None}, "intended_use"),
        (
            {"preprocessing": {**VALID["preprocessing"], "dicom": None}},
            "preprocessing.dicom",
        ),
        (
            {
                "preprocessing": {
                    **VALID["preprocessing"],
                    "dicom": {**VALID["preprocessing"]["dicom"], "voi_order": ["window"]},
                }
            },
            "end with 'full_range'",
        ),
        ({"preprocessing": {**VALID["preprocessing"], "resize_filter": "area"}}, "resize_filter"),
    ],
)
def test_invalid_metadata_is_rejected_with_the_field_named(overrides, fragment):
    with pytest.raises(ValidationError, match=fragment):
        ModelMetadata.model_validate({**VALID, **overrides})


def test_provenance_keeps_any_key_but_the_top_level_is_strict():
    provenance = {**VALID["provenance"], "data_manifest_sha256": "ab" * 32}
    meta = ModelMetadata.model_validate({**VALID, "provenance": provenance})
    assert meta.model_dump()["provenance"]["data_manifest_sha256"] == "ab" * 32
    with pytest.raises(ValidationError, match="data_manifest_sha256"):
        ModelMetadata.model_validate({**VALID, "data_manifest_sha256": "ab" * 32})


# ---- load_classifier: ready only when everything matches -----------------------------------


def test_a_matching_model_loads_warms_up_and_runs_on_cpu(model_path):
    classifier = load_classifier(make_settings(model_path))
    assert classifier.execution_provider == CPU_PROVIDER
    bright = np.ones((1, 224, 224, 1), dtype=np.float32)
    dark = np.zeros((2, 224, 224, 1), dtype=np.float32)
    # logits = mean * [-4, 4] + [2, -2]
    np.testing.assert_allclose(
        classifier.predict_batch(bright)[0],
        calibrated_probabilities(np.array([[-2.0, 2.0]]), classifier.metadata)[0],
    )
    assert classifier.predict_batch(dark).shape == (2, 2)
    assert classifier.label_for(classifier.predict_batch(bright)[0]) == "PNEUMONIA"
    assert classifier.label_for(classifier.predict_batch(dark)[0]) == "NORMAL"


@pytest.mark.parametrize(
    ("onnx_kwargs", "meta_overrides", "reason"),
    [
        ({"input_name": "pixels"}, {}, "ONNX graph inputs ['pixels'] do not match"),
        ({"input_shape": ("N", 128, 128, 1)}, {}, "has shape ['N', 128, 128, 1]"),
        ({"input_shape": (1, 224, 224, 1)}, {}, "fixes axis 0 to 1"),
        ({"output_name": "probs"}, {}, "do not include the metadata output 'logits'"),
        (
            {},
            {
                "classes": THREE_CLASSES,
                "output": {"name": "logits", "shape": [None, 3]},
            },
            "has shape ['N', 2], metadata says [None, 3]",
        ),
        (
            {},
            {"sha256": "0" * 64},
            "metadata says " + "0" * 64,
        ),
    ],
    ids=["input-name", "input-size", "fixed-batch", "output-name", "3-classes-2-outputs", "sha256"],
)
def test_mismatches_keep_the_model_out_with_a_reason(
    write_model, onnx_kwargs, meta_overrides, reason
):
    path = write_model(onnx_kwargs, **meta_overrides)
    with pytest.raises(ModelLoadError) as excinfo:
        load_classifier(make_settings(path))
    assert reason in str(excinfo.value)


def test_a_model_answering_nan_fails_the_warm_up(write_model):
    path = write_model({"bias_value": float("nan")})
    with pytest.raises(ModelLoadError, match="warm-up inference returned non-finite"):
        load_classifier(make_settings(path))


def test_missing_metadata_is_reported_by_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model metadata not found: .*nowhere\.json"):
        load_classifier(make_settings(tmp_path / "nowhere.json"))


def test_malformed_and_invalid_metadata_are_reported(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not be read"):
        load_classifier(make_settings(broken))
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({**VALID, "classes": ["NORMAL"]}))
    with pytest.raises(ModelLoadError, match="is invalid: classes"):
        load_classifier(make_settings(invalid))


def test_missing_onnx_file_is_reported(model_path):
    (model_path.parent / "tiny_cxr.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"tiny_cxr\.onnx could not be read"):
        load_classifier(make_settings(model_path))


def test_garbage_onnx_with_matching_hash_is_reported(tmp_path):
    garbage = b"this is not a protobuf"
    meta = metadata_for(garbage)
    (tmp_path / meta["onnx_file"]).write_bytes(garbage)
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="ONNX Runtime could not load"):
        load_classifier(make_settings(path))


# ---- providers -----------------------------------------------------------------------------


def test_provider_selection():
    assert select_providers("auto", [CUDA_PROVIDER, CPU_PROVIDER]) == [CUDA_PROVIDER, CPU_PROVIDER]
    assert select_providers("auto", [CPU_PROVIDER]) == [CPU_PROVIDER]
    assert select_providers("cpu", [CUDA_PROVIDER, CPU_PROVIDER]) == [CPU_PROVIDER]
    assert select_providers("cuda", [CUDA_PROVIDER, CPU_PROVIDER])[0] == CUDA_PROVIDER
    with pytest.raises(ModelLoadError, match="CXR_PROVIDER=cuda but CUDAExecutionProvider"):
        select_providers("cuda", [CPU_PROVIDER])


def test_auto_reports_the_provider_actually_running(model_path):
    classifier = load_classifier(make_settings(model_path, provider="auto"))
    expected = CUDA_PROVIDER if CUDA_PROVIDER in ort.get_available_providers() else CPU_PROVIDER
    assert classifier.execution_provider == expected


# ---- calibration and the decision ----------------------------------------------------------


def test_temperature_scales_logits_before_softmax():
    meta = ModelMetadata.model_validate(
        {**VALID, "calibration": {"method": "temperature", "temperature": 2.0}}
    )
    probabilities = calibrated_probabilities(np.array([[0.0, 2.0]]), meta)
    expected = 1 / (1 + np.exp(-1.0))  # softmax([0, 1]) for the second class
    assert probabilities[0, 1] == pytest.approx(expected)
    assert probabilities.sum() == pytest.approx(1.0)


def test_probability_heads_are_recalibrated_the_same_way():
    meta = ModelMetadata.model_validate(
        {
            **VALID,
            "outputs": [
                {
                    "name": "logits",
                    "shape": [None, 2],
                    "role": "classifier",
                    "kind": "probabilities",
                }
            ],
            "calibration": {"method": "none"},
        }
    )
    np.testing.assert_allclose(calibrated_probabilities(np.array([[0.2, 0.8]]), meta), [[0.2, 0.8]])


@pytest.mark.parametrize(("p_positive", "label"), [(0.3, "PNEUMONIA"), (0.29, "NORMAL")])
def test_label_uses_the_metadata_threshold_inclusively(write_model, p_positive, label):
    path = write_model(decision={"threshold": 0.3, "positive_class": "PNEUMONIA"})
    classifier = load_classifier(make_settings(path))
    assert classifier.label_for(np.array([1 - p_positive, p_positive])) == label


def test_cpu_and_gpu_runtimes_installed_together_keep_the_service_not_ready(
    model_path, monkeypatch
):
    import app.model.loading as loading

    real = loading.importlib_metadata.distribution

    def both_installed(name):
        return object() if name == "onnxruntime-gpu" else real(name)

    monkeypatch.setattr(loading.importlib_metadata, "distribution", both_installed)
    assert loading.installed_runtimes() == ["onnxruntime", "onnxruntime-gpu"]
    with pytest.raises(ModelLoadError, match="both onnxruntime and onnxruntime-gpu"):
        load_classifier(make_settings(model_path))


def test_this_environment_has_exactly_one_runtime():
    from app.model.loading import installed_runtimes

    assert len(installed_runtimes()) == 1  # the cpu or the gpu extra, never both


# ---- the JPEG 2000 reduction rule ------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        ({"min_ratio": 0, "max_level": 1}, "min_ratio"),
        ({"min_ratio": 2, "max_level": 4}, "max_level"),
        ({"min_ratio": 2, "max_level": 0}, "max_level"),
        ({"min_ratio": 2, "max_level": 2, "levels": 3}, "levels"),
        ({"max_level": 2}, "min_ratio"),
    ],
)
def test_a_malformed_j2k_reduction_rule_is_refused(rule, fragment):
    meta = {**VALID, "preprocessing": {**VALID["preprocessing"], "dicom_j2k_reduction": rule}}
    with pytest.raises(ValidationError, match=fragment):
        ModelMetadata.model_validate(meta)


def test_metadata_without_the_j2k_rule_still_loads_and_decodes_at_full_resolution():
    assert "dicom_j2k_reduction" not in VALID["preprocessing"]
    assert ModelMetadata.model_validate(VALID).preprocessing.dicom_j2k_reduction is None


@pytest.mark.parametrize(
    ("rule", "decoded"), [(None, (1201, 1025)), ({"min_ratio": 2}, (601, 513))]
)
def test_the_classifier_decodes_j2k_dicom_at_its_contracts_level(tmp_path, rule, decoded):
    """The service wires the model's rule into DICOM decoding: 1201x1025 at a 224 px input and
    min_ratio 2 is reduced by one level (1025 >= 2 * 2 * 224); without the rule, not at all."""
    from app.imaging.types import DecodeLimits
    from app.model.classifier import Classifier
    from app.testing.dicom_files import make_dicom, ramp

    onnx_bytes = build_onnx()
    meta = metadata_for(onnx_bytes)
    if rule is not None:
        meta["preprocessing"]["dicom_j2k_reduction"] = rule
    session = ort.InferenceSession(onnx_bytes, providers=[CPU_PROVIDER])
    classifier = Classifier(
        session,
        ModelMetadata.model_validate(meta),
        DecodeLimits(max_pixels=50_000_000, min_side=64),
    )
    data = make_dicom(ramp(rows=1025, columns=1201), "j2k_lossless", bits_stored=12)
    opened = classifier.open(data)
    assert opened.decode().image.size == decoded
    prepared = classifier.prepare(data)
    assert prepared.stored_size == (1201, 1025)
    assert prepared.tensor.shape == (1, 224, 224, 1)
