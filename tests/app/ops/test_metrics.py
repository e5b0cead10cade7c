"""GET /metrics: parses as Prometheus text, carries the service's state, and no request content."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from app.main import create_app
from tests.support.testkit import encode, make_settings, xray_like


def scrape(client: TestClient) -> dict[str, list[Sample]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = text_string_to_metric_families(response.text)  # raises on malformed exposition
    return {family.name: family.samples for family in families}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    matching = [
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matching) == 1, (name, labels, matching)
    return matching[0]


def test_a_fresh_service_exposes_every_family_with_the_model_and_readiness(client) -> None:
    metrics = scrape(client)
    assert {
        "cxr_http_requests",
        "cxr_phase_seconds",
        "cxr_inference_batch_size",
        "cxr_inference_queue_depth",
        "cxr_in_flight_images",
        "cxr_in_flight_images_limit",
        "cxr_decode_memory_reserved_bytes",
        "cxr_model_info",
        "cxr_ready",
    } <= set(metrics)
    assert value(metrics["cxr_ready"], "cxr_ready") == 1.0
    info = metrics["cxr_model_info"][0]
    assert info.name == "cxr_model_info"
    assert info.labels["name"] == "tiny_cxr"
    assert info.labels["version"] == "0.0.1-test"
    assert len(info.labels["sha256"]) == 64
    assert info.labels["execution_provider"] == "CPUExecutionProvider"
    assert value(metrics["cxr_in_flight_images_limit"], "cxr_in_flight_images_limit") == 48
    phases = {s.labels["phase"] for s in metrics["cxr_phase_seconds"]}
    assert phases == {"upload_read", "decode", "queue_wait", "inference", "total"}


def test_requests_phases_and_batches_are_counted(client) -> None:
    image = encode(xray_like(), "PNG")
    for _ in range(3):
        assert client.post(
            "/predict", content=image, headers={"content-type": "image/png"}
        ).is_success
    client.post("/predict", content=b"hello", headers={"content-type": "image/png"})
    client.post("/predict/batch", files=[("file", ("a.png", image, "image/png"))] * 2)

    metrics = scrape(client)
    requests = metrics["cxr_http_requests"]
    total = "cxr_http_requests_total"
    assert value(requests, total, route="/predict", status="200", code="ok") == 3
    assert (
        value(requests, total, route="/predict", status="415", code="unsupported_media_type") == 1
    )
    assert value(requests, total, route="/predict/batch", status="200", code="ok") == 1
    phases = metrics["cxr_phase_seconds"]
    count = "cxr_phase_seconds_count"
    assert value(phases, count, phase="decode") == 6  # 3 + the undecodable one + 2 in the batch
    assert value(phases, count, phase="inference") == 5
    assert value(phases, count, phase="queue_wait") == 5
    assert value(phases, count, phase="upload_read") == 5  # one per request that was read
    assert value(phases, count, phase="total") == 4  # requests answered with a prediction
    batches = metrics["cxr_inference_batch_size"]
    assert value(batches, "cxr_inference_batch_size_sum") == 5
    assert value(metrics["cxr_in_flight_images"], "cxr_in_flight_images") == 0


def test_no_request_content_reaches_a_label(client) -> None:
    image = encode(xray_like(), "PNG")
    client.post(
        "/predict",
        files={"file": ("DOE^JANE_1234567.png", image, "image/png")},
        headers={"X-Request-ID": "patient-77-study"},
    )
    client.get("/predict/DOE^JANE")
    text = client.get("/metrics").text
    for secret in ("DOE", "JANE", "1234567", "patient-77"):
        assert secret not in text
    routes = {
        s.labels["route"]
        for f in text_string_to_metric_families(text)
        if f.name == "cxr_http_requests"
        for s in f.samples
    }
    assert routes <= {"/predict", "/predict/batch", "/metrics", "<unmatched>"}


def test_metrics_answer_when_not_ready(tmp_path) -> None:
    with TestClient(create_app(make_settings(tmp_path / "absent.json"))) as client:
        metrics = scrape(client)
        assert value(metrics["cxr_ready"], "cxr_ready") == 0.0
        assert not [s for s in metrics["cxr_model_info"] if s.labels]  # no model to describe
        assert client.get("/health/ready").status_code == 503


def test_the_grafana_dashboard_queries_only_metrics_the_service_exposes(client) -> None:
    import json
    import re
    from pathlib import Path

    dashboard = Path(__file__).resolve().parents[3] / "monitoring" / "grafana-dashboard.json"
    panels = json.loads(dashboard.read_text())["panels"]
    queried = {
        name
        for panel in panels
        for target in panel["targets"]
        for name in re.findall(r"\bcxr_[a-z_]+", target["expr"])
    }
    client.post(
        "/predict", content=encode(xray_like(), "PNG"), headers={"content-type": "image/png"}
    )
    exposed = {sample.name for samples in scrape(client).values() for sample in samples}
    assert queried, "the dashboard has no queries"
    assert queried <= exposed, queried - exposed
