"""`POST /predict?explain=true`: exact class activation maps, on a tiny model whose map can be
computed by hand, and the contract rules that keep the metadata's CAM weights honest."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from app.contract import ModelMetadata
from app.main import create_app
from tests.support.testkit import (
    build_cam_onnx,
    build_onnx,
    cam_metadata_for,
    encode,
    make_settings,
    metadata_for,
    schema2_metadata_for,
)


def _write(tmp_path: Path, meta: dict, onnx_bytes: bytes) -> Path:
    (tmp_path / meta["onnx_file"]).write_bytes(onnx_bytes)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    return path


@pytest.fixture
def cam_model(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    onnx_bytes, dense, bias = build_cam_onnx()
    return _write(tmp_path, cam_metadata_for(onnx_bytes, dense, bias), onnx_bytes), dense, bias


@pytest.fixture
def cam_client(cam_model) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(create_app(make_settings(cam_model[0]))) as client:
        yield client


def _bright_square_image() -> bytes:
    """Dark image with one bright 64x64 square at rows 128-191, columns 32-95 (224 px grid)."""
    pixels = np.full((224, 224), 20, np.uint8)
    pixels[128:192, 32:96] = 240
    return encode(Image.fromarray(pixels), "PNG")


def _expected_grid(image: bytes, dense: np.ndarray, class_index: int) -> np.ndarray:
    """CAM by hand, with the filters `build_cam_onnx` draws (same seed): 32x32 patch means are
    channel 0 of the feature map; the other channels' small random filters are applied too."""
    rng = np.random.default_rng(5)
    conv = rng.normal(0.0, 0.002, (4, 1, 32, 32)).astype(np.float32)
    conv[0] = 1.0 / (32 * 32)
    x = np.asarray(Image.open(io.BytesIO(image)), dtype=np.float32) / np.float32(255.0)
    patches = x.reshape(7, 32, 7, 32).transpose(0, 2, 1, 3)  # (7, 7, 32, 32)
    features = np.maximum(np.einsum("ijuv,kuv->kij", patches, conv[:, 0]), 0.0)
    return np.tensordot(dense[:, class_index].astype(np.float64), features, axes=(0, 0))


def test_the_explanation_is_the_exact_map_and_shows_where_the_evidence_is(
    cam_client, cam_model
) -> None:  # type: ignore[no-untyped-def]
    image = _bright_square_image()
    response = cam_client.post("/predict?explain=true", files={"file": ("x.png", image)})
    assert response.status_code == 200, response.text
    body = response.json()
    explanation = body["explanation"]
    assert explanation["method"] == "CAM"
    assert explanation["target_class"] == body["label"]
    index = ["NORMAL", "PNEUMONIA"].index(body["label"])
    expected = _expected_grid(image, cam_model[1], index)
    normalised = (expected - expected.min()) / (expected.max() - expected.min())
    grid = np.asarray(explanation["grid"])
    assert grid.shape == (7, 7)
    assert np.abs(grid - normalised).max() < 1e-4
    # the map's spatial mean plus the bias is the class logit
    assert explanation["class_logit"] == pytest.approx(
        expected.mean() + cam_model[2][index], abs=1e-4
    )
    # PNEUMONIA's evidence is the bright square: its cells are the map's strongest
    pneumonia = cam_client.post(
        "/predict?explain=true&explain_class=PNEUMONIA", files={"file": ("x.png", image)}
    ).json()["explanation"]
    strongest = np.unravel_index(np.argmax(pneumonia["grid"]), (7, 7))
    assert 4 <= strongest[0] <= 5 and 1 <= strongest[1] <= 2


def test_class_logits_from_the_maps_reproduce_the_probabilities(cam_client) -> None:  # type: ignore[no-untyped-def]
    image = _bright_square_image()
    logits = {}
    for name in ("NORMAL", "PNEUMONIA"):
        body = cam_client.post(
            f"/predict?explain=true&explain_class={name}", files={"file": ("x.png", image)}
        ).json()
        logits[name] = body["explanation"]["class_logit"]
        probabilities = body["probabilities"]
    # temperature 1: log(p1 / p0) is the logit difference
    assert np.log(probabilities["PNEUMONIA"] / probabilities["NORMAL"]) == pytest.approx(
        logits["PNEUMONIA"] - logits["NORMAL"], abs=1e-4
    )


def test_the_pictures_are_pngs_of_the_model_input(cam_client) -> None:  # type: ignore[no-untyped-def]
    explanation = cam_client.post(
        "/predict?explain=true", files={"file": ("x.png", _bright_square_image())}
    ).json()["explanation"]
    pictures = {}
    for key in ("image_png", "heatmap_png", "overlay_png"):
        picture = Image.open(io.BytesIO(base64.b64decode(explanation[key])))
        assert picture.format == "PNG" and picture.size == (224, 224)
        pictures[key] = np.asarray(picture)
    assert pictures["image_png"][150, 50] == 240 and pictures["image_png"][10, 10] == 20
    assert pictures["heatmap_png"].shape == (224, 224, 3)
    assert not np.array_equal(pictures["overlay_png"][..., 0], pictures["overlay_png"][..., 2])
    assert explanation["opacity"] == pytest.approx(0.45)


def test_default_answers_carry_no_explanation(cam_client) -> None:  # type: ignore[no-untyped-def]
    body = cam_client.post("/predict", files={"file": ("x.png", _bright_square_image())}).json()
    assert body["explanation"] is None
    assert cam_client.get("/model").json()["explanations"] is True


def test_an_unknown_class_is_a_422(cam_client) -> None:  # type: ignore[no-untyped-def]
    response = cam_client.post(
        "/predict?explain=true&explain_class=COVID",
        files={"file": ("x.png", _bright_square_image())},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_a_model_without_the_feature_output_says_so(client) -> None:  # type: ignore[no-untyped-def]
    """The single-output (schema 2) model still serves; it only cannot explain."""
    response = client.post(
        "/predict?explain=true", files={"file": ("x.png", _bright_square_image())}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "explanation_unavailable"
    assert client.get("/model").json()["explanations"] is False
    assert (
        client.post("/predict", files={"file": ("x.png", _bright_square_image())}).status_code
        == 200
    )


def test_cam_weights_that_do_not_match_their_digest_are_refused() -> None:
    onnx_bytes, dense, bias = build_cam_onnx()
    meta = cam_metadata_for(onnx_bytes, dense, bias)
    meta["cam"]["weights"][0][1] += 0.5
    with pytest.raises(ValidationError, match="sha256"):
        ModelMetadata.model_validate(meta)


def test_cam_weights_that_are_not_the_graphs_keep_the_service_not_ready(tmp_path: Path) -> None:
    onnx_bytes, dense, bias = build_cam_onnx()
    wrong = dense.copy()
    wrong[0] = (6.0, -6.0)  # swapped: consistent digest, but not what the graph computes
    meta = cam_metadata_for(onnx_bytes, wrong, bias)
    with TestClient(create_app(make_settings(_write(tmp_path, meta, onnx_bytes)))) as client:
        ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert "CAM weights" in ready.json()["error"]["message"]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda m: m.pop("cam"), "needs the `cam` weights"),
        (lambda m: m["cam"].update(feature_output="logits"), "not a cam_features output"),
        (lambda m: m["outputs"][1].update(layout="NC"), "4-D"),
        (lambda m: m["outputs"].append(dict(m["outputs"][0])), "exactly one output"),
    ],
)
def test_inconsistent_cam_metadata_is_refused(change, fragment) -> None:  # type: ignore[no-untyped-def]
    onnx_bytes, dense, bias = build_cam_onnx()
    meta = cam_metadata_for(onnx_bytes, dense, bias)
    change(meta)
    with pytest.raises(ValidationError, match=fragment):
        ModelMetadata.model_validate(meta)


def test_schema_2_single_output_metadata_still_loads() -> None:
    meta = ModelMetadata.model_validate(schema2_metadata_for(build_onnx()))
    assert meta.schema_version == 2
    assert [o.role for o in meta.outputs] == ["classifier"] and meta.cam is None
    digest = hashlib.sha256(build_onnx()).hexdigest()
    assert meta.sha256 == digest


def test_explain_is_documented_in_openapi(cam_client) -> None:  # type: ignore[no-untyped-def]
    spec = cam_client.get("/openapi.json").json()
    parameters = {p["name"] for p in spec["paths"]["/predict"]["post"]["parameters"]}
    assert {"explain", "explain_class"} <= parameters
    assert "Explanation" in spec["components"]["schemas"]


def test_get_model_gives_a_kind_to_the_classifier_output_only(cam_client) -> None:  # type: ignore[no-untyped-def]
    outputs = {o["role"]: o for o in cam_client.get("/model").json()["outputs"]}
    assert outputs["classifier"]["kind"] == "logits"
    assert "kind" not in outputs["cam_features"]


def test_a_feature_map_output_with_a_kind_is_refused() -> None:
    onnx_bytes, dense, bias = build_cam_onnx()
    meta = cam_metadata_for(onnx_bytes, dense, bias)
    meta["outputs"][1]["kind"] = "logits"
    with pytest.raises(ValidationError, match="cam_features output has no kind"):
        ModelMetadata.model_validate(meta)


def test_unknown_metadata_keys_are_refused() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ModelMetadata.model_validate(metadata_for(build_onnx(), thresold=0.4))


def test_the_openapi_document_describes_the_outputs(cam_client) -> None:  # type: ignore[no-untyped-def]
    """The served `outputs` keep a typed schema (a custom serializer would make it `object`)."""
    schema = cam_client.get("/openapi.json").json()["components"]["schemas"]
    spec = next(v for k, v in schema.items() if k.startswith("OutputSpec"))
    assert {"name", "shape", "role", "kind", "layout"} <= set(spec["properties"])


@pytest.mark.parametrize(("cells", "stride"), [(7, 32), (14, 16), (3, 64), (1, 224)])
def test_a_single_hot_cell_is_drawn_over_its_receptive_field(cells: int, stride: int) -> None:
    """Each cell's value lands at its receptive field's centre, stride * (k + 1/2) px, and the
    drawn peak of a lone hot cell is exactly there, whether or not the map tiles the input."""
    from app.model.explain import cell_stride, upsample

    assert cell_stride(cells, 224) == stride
    for row, col in {(0, 0), (cells // 2, cells - 1), (cells - 1, cells // 3)}:
        grid = np.zeros((cells, cells))
        grid[row, col] = 1.0
        drawn = upsample(grid, 224, 224)
        peak_rows = np.flatnonzero(drawn.max(axis=1) == drawn.max())
        peak_cols = np.flatnonzero(drawn.max(axis=0) == drawn.max())
        # pixels whose centres are within half a pixel of the cell's centre carry the peak
        centre = stride * (np.array([row, col]) + 0.5)
        assert np.abs(peak_rows + 0.5 - centre[0]).min() <= 0.5
        assert np.abs(peak_cols + 0.5 - centre[1]).min() <= 0.5
        assert drawn.max() == pytest.approx(1.0, abs=1.0 / stride)
        # nothing of it is drawn more than one stride from its centre (or past the covered area)
        ys, xs = np.nonzero(drawn > 1e-9)
        assert np.abs(ys + 0.5 - centre[0]).max() < stride + (224 - cells * stride)
        assert np.abs(xs + 0.5 - centre[1]).max() < stride + (224 - cells * stride)


def test_a_map_drawn_on_a_larger_picture_keeps_the_cells_at_their_places() -> None:
    """A picture of the input at another size (the X-ray itself) scales the cell centres with it."""
    from app.model.explain import upsample

    grid = np.zeros((7, 7))
    grid[2, 5] = 1.0
    drawn = upsample(grid, 1792, 896, input_size=(224, 224))  # 8x wide, 4x tall
    y, x = np.unravel_index(np.argmax(drawn), drawn.shape)
    assert abs((y + 0.5) / 4 - (32 * 2 + 16)) <= 0.25
    assert abs((x + 0.5) / 8 - (32 * 5 + 16)) <= 0.25


def test_the_3x3_map_of_the_floor_pooled_network_is_drawn_at_its_cells_not_spread() -> None:
    """`cxr_net` 1.0.0 pools 7 -> 3 with floor: its cells sit at 32, 96 and 160 px, and the
    bottom and right 32 px (no cell's centre) repeat the last cells' values."""
    from app.model.explain import upsample

    grid = np.zeros((3, 3))
    grid[2, 2] = 1.0
    drawn = upsample(grid, 224, 224)
    assert np.argmax(drawn[:, 200]) in (159, 160)
    assert drawn[200, 200] == pytest.approx(1.0)
    assert drawn[159:161, 159:161].min() == pytest.approx(1.0, abs=1 / 64)
