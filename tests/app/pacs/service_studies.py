"""Studies whose results the running service made and delivered: an X-ray pushed to the service's
DICOM listener by Orthanc's C-STORE, or sent with `POST /predict?deliver=true`, each waited on
until every result object the service recorded for it is delivered and in Orthanc.

The service is the one of `test_pacs_service.Loop` (Orthanc knows it as its DICOM modality `cxr`
and is its DICOMweb destination), here on the tiny model with class activation maps and the
heat-map setting, so that a positive answer gets its SR, heat-map SC and GSPS.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.app.pacs.pacs_servers import Orthanc
from tests.app.pacs.test_pacs_service import Loop, predict
from tests.support.testkit import UvicornProcess, build_cam_onnx, cam_metadata_for

RESULTS_TIMEOUT_S = 90.0  # from the push to the last object in Orthanc, on a loaded machine


@dataclass(frozen=True)
class ServiceResult:
    """What the service recorded for one source image, once all of it is in Orthanc."""

    answer: dict[str, Any]  # label, probabilities, threshold, model, disclaimer
    objects: dict[str, str]  # kind ("sr", "sc", "gsps") -> SOP Instance UID


def write_cam_model(directory: Path) -> Path:
    """`build_cam_onnx`'s model and its metadata in `directory`; the metadata's path."""
    onnx_bytes, dense, bias = build_cam_onnx()
    meta = cam_metadata_for(onnx_bytes, dense, bias)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / meta["onnx_file"]).write_bytes(onnx_bytes)
    path = directory / "cam.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    return path


def start_heatmap_service(wiring: Loop, orthanc: Orthanc) -> UvicornProcess:
    """The service of `wiring` on the CAM model with `CXR_RESULTS_HEATMAP=true`, ready."""
    settings = {
        **wiring.settings(orthanc),
        "CXR_MODEL_METADATA": str(write_cam_model(wiring.workdir / "cam-model")),
        "CXR_RESULTS_HEATMAP": "true",
    }
    server = UvicornProcess.start(
        wiring.workdir / "heatmap-server.log", settings, port=wiring.http_port
    )
    try:
        server.wait_until_ready(60.0)
    except BaseException:
        server.kill()
        raise
    return server


def push_by_c_store(orthanc: Orthanc, data: bytes, modality: str = "cxr") -> None:
    """Store `data` in Orthanc, then have Orthanc send it by C-STORE to its modality `modality`
    (a synchronous job: it raises unless the transfer succeeded)."""
    uploaded = httpx.post(f"{orthanc.url}/instances", content=data, timeout=60.0)
    uploaded.raise_for_status()
    pushed = httpx.post(
        f"{orthanc.url}/modalities/{modality}/store",
        json={"Resources": [uploaded.json()["ID"]], "Synchronous": True},
        timeout=60.0,
    )
    assert pushed.status_code == 200, pushed.text


def send_with_deliver(server: UvicornProcess, data: bytes) -> None:
    """`POST /predict?deliver=true`: the answer, its result objects queued for delivery."""
    answer = predict(server, data)
    assert answer.status_code == 200, answer.text


def _delivered_result(
    orthanc: Orthanc, server: UvicornProcess, source_uid: str
) -> ServiceResult | None:
    found = httpx.get(f"{server.base_url}/results/{source_uid}", timeout=10.0)
    if found.status_code == 404:  # not read yet (the intake reads from its spool)
        return None
    found.raise_for_status()
    body = found.json()
    deliveries = body["result"]["deliveries"]
    if not deliveries or {d["state"] for d in deliveries} != {"delivered"}:
        return None
    objects = {o["kind"]: o["sop_instance_uid"] for o in body["result"]["objects"]}
    if not all(orthanc.find_instance(uid) for uid in objects.values()):
        return None
    return ServiceResult(body["answer"], objects)


def wait_for_delivered(orthanc: Orthanc, server: UvicornProcess, source_uid: str) -> ServiceResult:
    """The service's result for the source image once every object of it is delivered and
    findable in Orthanc; an assertion naming what the service had, if that takes too long."""
    deadline = time.monotonic() + RESULTS_TIMEOUT_S
    while time.monotonic() < deadline:
        result = _delivered_result(orthanc, server, source_uid)
        if result is not None:
            return result
        time.sleep(0.2)
    found = httpx.get(f"{server.base_url}/results/{source_uid}", timeout=10.0)
    raise AssertionError(
        f"the result of {source_uid} was not delivered within {RESULTS_TIMEOUT_S:.0f} s: "
        f"{found.status_code} {found.text[:2000]}\n{server.log()[-3000:]}"
    )
