"""End to end on tiny generated images: train one short epoch, export with the parity gate,
evaluate, and check that the service serves the exported model with the evaluation step's
probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the train extra (TensorFlow/Keras) is not installed")

from app.contract import load_metadata
from training import evaluate, export, model_card, results, train
from training.data import read_split

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tiny_kaggle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    code = train.main(
        [
            "--data-dir",
            str(tiny_kaggle_dir),
            "--out",
            str(run),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--val-fraction",
            "0.25",
            "--cache-dir",
            str(run / "cache"),
            "--seed",
            "3",
            # the candidate recipes' options, so that they run end to end through export
            "--arch",
            "cxr_net_7",
            "--ema",
            "0.9",
            "--resize-min",
            "0.5",
            "--jpeg-quality",
            "40",
            "--holdout-fraction",
            "0.3",
            "--schedule",
            "cosine",
            "--label-smoothing",
            "0.1",
            "--gamma",
            "0.3",
            "--blur-sigma",
            "1.0",
            "--noise",
            "0.02",
            "--crop",
            "0.1",
        ]
    )
    assert code == 0
    return run


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    return export.export_run(
        tiny_run, out, "tiny", "0.0.1", export.DEFAULT_TOLERANCE, parity_images=8
    )


def test_training_writes_split_history_and_operating_point(tiny_run: Path) -> None:
    splits = read_split(tiny_run / "split.csv")
    patients = {name: {r.patient_id for r in rs} for name, rs in splits.items()}
    assert set(patients) == {"train", "val", "holdout"}
    assert patients["train"].isdisjoint(patients["val"])
    assert patients["holdout"].isdisjoint(patients["train"] | patients["val"])
    assert not any("/test/" in r.path for rs in splits.values() for r in rs)  # test is never read
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["epochs_run"] == 1
    assert 0.0 <= summary["decision"]["threshold"] <= 1.0
    assert summary["calibration"]["temperature"] > 0
    assert summary["holdout_metrics"]["n"] == len(splits["holdout"])
    assert summary["holdout_metrics"]["threshold"] == summary["decision"]["threshold"]
    assert summary["hyperparameters"]["schedule"] == "cosine"
    assert summary["augmentation"]["gamma"] == 0.3
    assert (tiny_run / "best.keras").is_file()
    assert len(json.loads((tiny_run / "history.json").read_text())) == 1
    for png in (
        "training_curves.png",
        "class_distribution.png",
        "sample_grid.png",
        "val_roc.png",
        "val_reliability.png",
    ):
        assert (tiny_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_metadata_is_the_service_contract(exported: Path) -> None:
    import onnxruntime as ort

    meta = load_metadata(exported)  # the service's own validator
    onnx_path = exported.parent / meta.onnx_file
    from training.data import file_sha256

    assert meta.sha256 == file_sha256(onnx_path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "image"
    assert [o.name for o in session.get_outputs()] == ["logits", "cam_features"]
    assert [o.role for o in meta.outputs] == ["classifier", "cam_features"]
    assert isinstance(inp.shape[0], str)  # dynamic batch
    assert inp.shape[1:] == [224, 224, 1]
    logits = session.run(["logits"], {"image": np.zeros((3, 224, 224, 1), np.float32)})[0]
    assert logits.shape == (3, 2)
    parity = meta.provenance["parity"]
    assert parity["max_abs_diff_logits"] <= parity["tolerance"]


def test_parity_gate_refuses_a_graph_that_disagrees_with_keras(
    tiny_run: Path, tmp_path: Path
) -> None:
    import keras

    import training.models  # noqa: F401

    model = keras.models.load_model(tiny_run / "best.keras", compile=False)
    onnx_path = tmp_path / "m.onnx"
    export.convert_to_onnx(model, onnx_path, 224, 224, 1)
    batch = np.random.default_rng(0).random((4, 224, 224, 1), dtype=np.float32)
    assert export.parity_check(model, onnx_path, batch, 1e-4)["max_abs_diff_logits"] <= 1e-4
    dense = model.get_layer("logits")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel, bias + 0.01])  # the Keras model drifts from the exported graph
    with pytest.raises(export.ParityError):
        export.parity_check(model, onnx_path, batch, 1e-4)


def test_served_probabilities_equal_the_evaluation_step(
    exported: Path, tiny_kaggle_dir: Path, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    report = evaluate.evaluate(exported, tiny_kaggle_dir, "test", tmp_path / "eval")
    assert report["metrics"]["n"] == 24
    rows = (tmp_path / "eval" / "predictions.csv").read_text().splitlines()[1:]
    by_file = {r.split(",")[0]: float(r.split(",")[3]) for r in rows}
    app = create_app(Settings(model_metadata=exported))
    with TestClient(app) as client:
        for path in sorted((tiny_kaggle_dir / "test").glob("*/*.jpeg"))[:6]:
            response = client.post(
                "/predict", content=path.read_bytes(), headers={"Content-Type": "image/jpeg"}
            )
            assert response.status_code == 200, response.text
            served = response.json()["probabilities"]["PNEUMONIA"]
            assert served == pytest.approx(by_file[path.name], abs=1e-5)


def test_data_provenance_hashes_the_data_sets_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("split,label,filename,patient_id,subtype,sha256\n")
    record = export.data_provenance({"source": str(tmp_path), "split_sha256": "x"})
    from training.data import file_sha256

    assert record == {
        "source": str(tmp_path),
        "split_sha256": "x",
        "manifest_sha256": file_sha256(tmp_path / "manifest.csv"),
    }
    assert "manifest_sha256" not in export.data_provenance({"source": str(tmp_path / "none")})


def test_model_card_shows_the_hold_out_and_the_configurations_tried(
    exported: Path, tiny_run: Path
) -> None:
    meta = load_metadata(exported)
    assert {"validation", "holdout"} <= set(meta.metrics)
    assert "Configurations tried" not in model_card.render(exported)
    summary = json.loads((tiny_run / "summary.json").read_text())
    row = results.row_from_summary(summary, "tiny-run", "one epoch")
    results.add_row(exported.parent / "tiny.results.json", row)
    card = model_card.render(exported)
    assert "| metric | validation (95% CI) | holdout (95% CI) |" in card
    assert "| **tiny-run**: one epoch |" in card
    holdout = summary["holdout_metrics"]
    assert f"{holdout['roc_auc']['value']:.4f}" in card.split("Configurations tried")[1]


def test_an_ensemble_averages_its_members_logits_through_one_exact_cam_head() -> None:
    import keras

    from training.ensemble import average_logits

    def member(seed: int) -> keras.Model:
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((8, 8, 1))
        x = keras.layers.Conv2D(3, 3, padding="same", activation="relu")(inputs)
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
        x = keras.layers.Dropout(0.5, name="dropout")(x)
        out = keras.layers.Dense(2, name="logits", bias_initializer="random_normal")(x)
        return keras.Model(inputs, out)

    members = [member(1), member(2)]
    x = np.random.default_rng(0).random((3, 8, 8, 1), dtype=np.float32)
    expected = np.mean([np.asarray(m(x, training=False)) for m in members], axis=0)
    model = average_logits(members)
    np.testing.assert_allclose(np.asarray(model(x, training=False)), expected, atol=1e-5)
    # the head is features side by side -> GAP -> one dense layer
    assert [type(layer).__name__ for layer in model.layers[-3:]] == [
        "Concatenate",
        "GlobalAveragePooling2D",
        "Dense",
    ]


def test_an_ensemble_of_different_architectures_on_one_grid_stays_an_average() -> None:
    """Members of different widths (a `cxr_net_7` and a `resnet_small` end in 384 and 256
    channels) still give the mean of their logits through one concatenated head."""
    import keras

    from training.ensemble import average_logits, combined_summary

    def member(seed: int, channels: int) -> keras.Model:
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((8, 8, 1))
        x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu")(inputs)
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
        out = keras.layers.Dense(2, name="logits", bias_initializer="random_normal")(x)
        return keras.Model(inputs, out)

    members = [member(1, 3), member(2, 3), member(3, 5)]
    x = np.random.default_rng(1).random((4, 8, 8, 1), dtype=np.float32)
    expected = np.mean([np.asarray(m(x, training=False)) for m in members], axis=0)
    model = average_logits(members)
    np.testing.assert_allclose(np.asarray(model(x, training=False)), expected, atol=1e-5)
    assert model.get_layer("logits").get_weights()[0].shape == (3 + 3 + 5, 2)

    record = {
        "preprocessing": {},
        "augmentation": {},
        "class_weights": {},
        "epochs_run": 1,
        "best_epoch": 1,
        "training_seconds": 1.0,
        "hardware": "",
        "seed": 1,
        "hyperparameters": {},
        "data": {},
    }
    names = ["cxr_net_7", "cxr_net_7", "resnet_small"]
    summary = combined_summary([{**record, "architecture": name} for name in names])
    assert summary["architecture"] == "ensemble of 2 x cxr_net_7 + 1 x resnet_small"


def test_an_ensemble_run_exports_through_the_parity_gate(
    tiny_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from training import ensemble

    out = tmp_path_factory.mktemp("ensemble")
    summary = ensemble.build([tiny_run, tiny_run], out / "run", None, 0.95)
    single = json.loads((tiny_run / "summary.json").read_text())
    # two copies of one network: the same logits, so the same operating point and figures
    assert summary["calibration"]["temperature"] == pytest.approx(
        single["calibration"]["temperature"], rel=1e-4
    )
    assert summary["validation_metrics"]["roc_auc"] == single["validation_metrics"]["roc_auc"]
    assert summary["epochs_run"] == 2 * single["epochs_run"]
    meta_path = export.export_run(
        out / "run", out / "models", "tiny_ensemble", "0.0.1", export.DEFAULT_TOLERANCE, 8
    )
    meta = load_metadata(meta_path)
    assert meta.provenance["architecture"] == "ensemble of 2 x cxr_net_7"
    # CAM-exact: the members' 7x7 maps side by side, one dense head over them
    assert meta.cam is not None and len(meta.cam.weights) == 2 * 384
    assert meta.cam_output is not None and meta.cam_output.shape[2:] == [7, 7]
    # the members' two dense heads become one over both feature maps: one bias vector fewer
    assert meta.provenance["parameters"] == 2 * single["parameters"] - 2
    assert {"validation", "holdout"} <= set(meta.metrics)


def test_an_ensemble_refuses_runs_on_different_splits(tiny_run: Path, tmp_path: Path) -> None:
    from training import ensemble

    other = tmp_path / "other"
    other.mkdir()
    summary = json.loads((tiny_run / "summary.json").read_text())
    summary["data"]["split_sha256"] = "0" * 64
    (other / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="different splits"):
        ensemble.build([tiny_run, other], tmp_path / "out", None, 0.95)


def test_the_exported_model_explains_its_own_logits(exported: Path, tiny_kaggle_dir: Path) -> None:
    """On the trained export: every class map's spatial mean plus its bias is the served logit."""
    import onnxruntime as ort

    from app.model.loading import load_classifier
    from app.settings import Settings

    classifier = load_classifier(Settings(model_metadata=exported, provider="cpu"))
    assert classifier.explains
    meta = classifier.metadata
    session = ort.InferenceSession(str(exported.parent / meta.onnx_file))
    for path in sorted((tiny_kaggle_dir / "test").glob("*/*.jpeg"))[:4]:
        tensor = classifier.preprocess(path.read_bytes())
        (logits,) = session.run(["logits"], {"image": tensor})
        for index, name in enumerate(meta.classes):
            _, cam = classifier.predict_with_cam(tensor, name)
            assert cam.logit == pytest.approx(float(logits[0][index]), abs=1e-5)


def test_the_model_card_shows_every_scoring_of_the_protocol(exported: Path, tmp_path: Path) -> None:
    """A ledger beside the metadata: `record` copies the model's A and B figures into it, and the
    card lists every A scoring (losers too), the decision and B beside the incumbent."""
    import shutil

    from training import selection

    models = tmp_path / "models"
    shutil.copytree(exported.parent, models)
    meta_path = models / exported.name
    sha = json.loads(meta_path.read_text())["sha256"]
    meta = load_metadata(meta_path)
    figures = meta.metrics["validation"]
    assert isinstance(figures, dict)
    t0 = {k: figures[k] for k in ("roc_auc", "recall", "specificity", "ece")}
    t1 = {
        "specificity_mean": 0.9,
        "specificity_worst": {"condition": "equalise", "value": 0.8},
        "sensitivity_mean": 0.95,
        "roc_auc_worst": {"condition": "equalise", "value": 0.97},
        "mean_abs_change": 0.01,
        "ece_pooled": 0.02,
    }
    protocol = "f" * 40
    lines = [
        {"event": "round", "round": 1, "protocol": protocol, "reason": "first"},
        {"event": "declare", "round": 1, "protocol": protocol, "name": "tiny 0.0.1",
         "model_sha256": sha, "t0": t0, "t1": t1, "incumbent_t0": t0, "incumbent_t1": t1},
        {"event": "score_a", "round": 1, "protocol": protocol, "role": "incumbent",
         "name": "old 1.0.0", "model_sha256": "0" * 64, "figures": figures},
        {"event": "score_a", "round": 1, "protocol": protocol, "role": "candidate",
         "name": "tiny 0.0.1", "model_sha256": sha, "figures": figures},
        {"event": "decision", "round": 1, "protocol": protocol, "winner_sha256": sha,
         "winner": "tiny 0.0.1", "checks": {sha: {"specificity_gain_0.03": True}}},
        {"event": "score_b", "protocol": protocol, "role": "winner", "name": "tiny 0.0.1",
         "model_sha256": sha, "figures": figures},
        {"event": "score_b", "protocol": protocol, "role": "incumbent", "name": "old 1.0.0",
         "model_sha256": "0" * 64, "figures": figures},
        {"event": "veto_check", "protocol": protocol, "winner_sha256": sha,
         "veto": {"sensitivity_below_0.93": False}},
    ]  # fmt: skip
    (models / "selection_ledger.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    selection.record(meta_path, None, lines)
    recorded = load_metadata(meta_path)
    assert recorded.metrics["test_b"] == figures and recorded.metrics["test_a"] == figures
    card = model_card.render(meta_path)
    assert "half B of the official Kermany test split" in card
    assert "| test half A (95% CI) | test half B (95% CI) |" in card
    assert f"docs/SELECTION_PROTOCOL.md (commit {protocol[:12]})" in card
    assert card.count("| 1 | ") == 2  # both A scorings, the incumbent's too
    assert "**tiny 0.0.1** chosen" in card
    assert "| metric | tiny 0.0.1 (winner) | old 1.0.0 (incumbent) |" in card
    assert "equalise" in card
