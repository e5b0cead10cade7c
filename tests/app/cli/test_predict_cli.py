"""`pneumonia-predict`: the service's answers for files and folders, without a server."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.cli import predict
from app.main import create_app
from app.testing.dicom_files import make_dicom, ramp
from tests.support.realdata import DATA_DIR, SHIPPED_METADATA, requires_data, requires_shipped_model
from tests.support.testkit import make_settings, xray_like


def _jpeg(path: Path) -> Path:
    xray_like((320, 280)).save(path, format="JPEG")
    return path


def test_folders_are_walked_for_images_and_named_files_are_kept(tmp_path: Path) -> None:
    (tmp_path / "study" / "deeper").mkdir(parents=True)
    a = _jpeg(tmp_path / "study" / "a.jpeg")
    b = _jpeg(tmp_path / "study" / "deeper" / "B.JPG")
    dicom = tmp_path / "study" / "IM0001"  # no suffix, found by its preamble
    dicom.write_bytes(make_dicom(ramp()))
    (tmp_path / "study" / "notes.txt").write_text("not an image")
    named = tmp_path / "named.bin"
    named.write_bytes(b"whatever")
    found = list(predict.image_files([tmp_path / "study", named]))
    assert found == [dicom, a, b, named]


def test_each_file_gets_its_answer_or_its_refusal_and_the_run_goes_on(
    tmp_path: Path, model_path: Path
) -> None:
    good = _jpeg(tmp_path / "good.jpeg")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    too_small = tmp_path / "tiny.png"
    xray_like((20, 20)).save(too_small)
    files = [good, broken, too_small]
    rows, classes = asyncio.run(predict.predict_files(files, make_settings(model_path)))
    assert [r.path for r in rows] == [str(f) for f in files]
    assert rows[0].error_code is None and rows[0].label in classes
    assert rows[0].probabilities is not None
    assert sum(rows[0].probabilities.values()) == pytest.approx(1.0)
    assert rows[1].error_code is not None and rows[1].label is None
    assert rows[2].error_code == "image_too_small"
    out = io.StringIO()
    predict.write_rows(rows, classes, "csv", out)
    parsed = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert float(parsed[0][f"p_{classes[0]}"]) == rows[0].probabilities[classes[0]]
    assert parsed[2]["error_code"] == "image_too_small"


def test_the_command_exits_1_when_a_file_is_refused_and_writes_json_lines(
    tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_MODEL_METADATA", str(model_path))
    monkeypatch.setenv("CXR_PROVIDER", "cpu")
    good = _jpeg(tmp_path / "good.jpeg")
    out = tmp_path / "rows.jsonl"
    assert predict.main([str(good), "--format", "jsonl", "-o", str(out), "--quiet"]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["path"] == str(good) and row["error"] is None
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"\xff\xd8 truncated")
    assert predict.main([str(good), str(bad), "-o", str(out), "--quiet"]) == 1
    with pytest.raises(SystemExit):
        predict.main([str(tmp_path / "missing")])


@requires_data
@requires_shipped_model
def test_the_test_split_gets_the_probabilities_post_predict_answers() -> None:
    """All 624 official test JPEGs through the command and through `POST /predict`, one at a
    time: the same label and probabilities. The command batches images (up to the service's
    batch size); ONNX Runtime's batched and single runs may differ in the last float32 bits,
    hence the 1e-6."""
    files = sorted((DATA_DIR / "test").glob("*/*.jpeg"))
    assert len(files) == 624
    settings = make_settings(SHIPPED_METADATA)
    rows, classes = asyncio.run(predict.predict_files(files, settings))
    with TestClient(create_app(settings)) as client:
        for path, row in zip(files, rows, strict=True):
            answer = client.post(
                "/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")}
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert row.label == body["label"], path.name
            assert row.probabilities is not None
            for name in classes:
                assert row.probabilities[name] == pytest.approx(
                    body["probabilities"][name], abs=1e-6
                ), path.name
