"""Two services with separate state directories (two pods, or one pod before and after its
outbox lost the row) that read the same image make the same result objects, byte for byte: every
date and time comes from the source and the reading, every UID from the source, model, profile and
pixels, never from a clock or a pod.

The shipped model (it has a class activation map), the heat map for every answer, and the real
adult CR of pydicom-data sent with `deliver=true` to each service in turn, a second boundary apart.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.pacs.pacs_results import rg1_path
from tests.support.testkit import make_settings

REPO = Path(__file__).resolve().parents[3]
SHIPPED = REPO / "models" / "pneumonia_cxr.json"


def _read_once(state_dir: Path, data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The answer of one service, and each stored result object's file (SR, heat map, GSPS)."""
    settings = make_settings(
        SHIPPED, state_dir=state_dir, results_heatmap=True, results_heatmap_answers="all"
    )
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/predict",
            params={"deliver": "true"},
            content=data,
            headers={"content-type": "application/dicom"},
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        source = answer["dicom"]["sop_instance_uid"]
        assert client.get(f"/results/{source}/sr").status_code == 200
        pipeline = client.app.state.pipeline  # type: ignore[attr-defined]
        files = {
            o["kind"]: pipeline.payload(source, o["kind"]) for o in answer["result"]["objects"]
        }
        files["sr (GET /results/{uid}/sr)"] = client.get(f"/results/{source}/sr").content
    return answer, files


def test_two_services_with_their_own_state_render_the_same_bytes(tmp_path: Path) -> None:
    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED} is absent")
    data = rg1_path().read_bytes()
    first_answer, first = _read_once(tmp_path / "pod-a", data)
    time.sleep(1.1)  # past a second boundary: any clock-derived time would differ
    second_answer, second = _read_once(tmp_path / "pod-b", data)

    assert {"sr", "sc"} <= set(first), sorted(first)
    assert set(first) == set(second)
    for kind, payload in first.items():
        assert payload, kind
        assert payload == second[kind], f"the {kind} differs between the two services"
    first_uids = [o["sop_instance_uid"] for o in first_answer["result"]["objects"]]
    assert first_uids == [o["sop_instance_uid"] for o in second_answer["result"]["objects"]]
