"""The container smoke test's HTTP checks against a running service (standard library only).

    PORT=8000 METADATA=models/pneumonia_cxr.json ONNX=models/pneumonia_cxr.onnx XRAY=cxr.jpeg \
    FULLRES=big.jpeg EXPECT_PROVIDER=CPUExecutionProvider python3 -m scripts.ci.smoke_http

scripts/ci/docker-smoke.sh runs it once the container is healthy: probes, /model, a real X-ray as
a raw body and as a multipart field (same answer), the full-resolution JPEG when it is not the
X-ray itself, and a text upload refused with a 4xx error object after which the service is still
ready. Each check prints one line; exit status 1 when any failed.

Environment: PORT (on 127.0.0.1), METADATA (the served model's JSON), ONNX (its model file),
XRAY and FULLRES (images to post), EXPECT_PROVIDER (the execution provider the answers name).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

RESPONSE_FIELDS = {
    "label",
    "probabilities",
    "threshold",
    "model",
    "execution_provider",
    "request_id",
    "timing_ms",
    "disclaimer",
}


class Checks:
    """Prints each check as it is made and keeps the failures."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, ok: bool, what: str) -> bool:
        print(f"[smoke]     {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failures.append(what)
        return ok


def call(
    base: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, float]:
    """(status, the body as JSON or None, milliseconds)."""
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    ms = (time.perf_counter() - t) * 1000
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    return status, answer, ms


def check_prediction(
    check: Checks, meta: dict[str, Any], expect_provider: str, status: int, body: Any, how: str
) -> None:
    classes = meta["classes"]
    if not check(
        status == 200 and isinstance(body, dict), f"{how}: HTTP {status} with a JSON object"
    ):
        print(f"[smoke]          body: {body!r:.500}")
        return
    missing = RESPONSE_FIELDS - body.keys()
    check(not missing, f"{how}: all response fields present (missing: {sorted(missing) or 'none'})")
    check(body.get("label") in classes, f"{how}: label {body.get('label')!r} in {classes}")
    probs = body.get("probabilities") or {}
    check(sorted(probs) == sorted(classes), f"{how}: probabilities for exactly {classes}")
    values = [v for v in probs.values() if isinstance(v, (int, float))]
    check(
        len(values) == len(probs)
        and all(0.0 <= v <= 1.0 for v in values)
        and math.isclose(sum(values), 1.0, abs_tol=1e-4),
        f"{how}: probabilities in [0, 1] summing to 1 ({sum(values):.6f})",
    )
    ep = body.get("execution_provider")
    check(isinstance(ep, str) and ep == expect_provider, f"{how}: execution_provider {ep!r}")
    model = body.get("model") or {}
    check(
        model.get("sha256") == meta["sha256"],
        f"{how}: model.sha256 equals the metadata's ({meta['sha256'][:16]}...)",
    )
    check(
        model.get("name") == meta["name"] and model.get("version") == meta["version"],
        f"{how}: model {model.get('name')!r} {model.get('version')!r}",
    )


def main() -> int:
    base = f"http://127.0.0.1:{os.environ['PORT']}"
    meta = json.loads(Path(os.environ["METADATA"]).read_text())
    onnx_sha = hashlib.sha256(Path(os.environ["ONNX"]).read_bytes()).hexdigest()
    xray = Path(os.environ["XRAY"]).read_bytes()
    expect_provider = os.environ["EXPECT_PROVIDER"]
    classes = meta["classes"]
    check = Checks()

    def prediction(status: int, body: Any, how: str) -> None:
        check_prediction(check, meta, expect_provider, status, body, how)

    check(meta["sha256"] == onnx_sha, "metadata sha256 matches the ONNX file on disk")

    status, body, _ = call(base, "GET", "/health/live")
    check(status == 200, f"GET /health/live -> {status}")
    status, body, _ = call(base, "GET", "/health/ready")
    check(status == 200, f"GET /health/ready -> {status}")
    status, body, _ = call(base, "GET", "/model")
    check(status == 200 and isinstance(body, dict), f"GET /model -> {status}")

    status, body, ms = call(base, "POST", "/predict", xray, {"Content-Type": "image/jpeg"})
    prediction(status, body, "raw JPEG body")
    if status == 200:
        print(
            f"[smoke]          {body['label']} {body['probabilities']} in {ms:.0f} ms "
            f"(server timing_ms {body.get('timing_ms')})"
        )
    first = body if status == 200 else None

    boundary = uuid.uuid4().hex
    multipart = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cxr.jpeg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + xray
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, body, ms = call(
        base,
        "POST",
        "/predict",
        multipart,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    prediction(status, body, "multipart field 'file'")
    if first and status == 200:
        check(
            all(
                math.isclose(first["probabilities"][c], body["probabilities"][c], abs_tol=1e-6)
                for c in classes
            ),
            "multipart and raw body give the same probabilities",
        )

    if os.environ["FULLRES"] != os.environ["XRAY"]:
        status, body, ms = call(
            base,
            "POST",
            "/predict",
            Path(os.environ["FULLRES"]).read_bytes(),
            {"Content-Type": "image/jpeg"},
        )
        prediction(status, body, "full-resolution 2000x2400 JPEG")
        if status == 200:
            print(
                f"[smoke]          {body['label']} in {ms:.0f} ms "
                f"(server timing_ms {body.get('timing_ms')})"
            )

    status, body, _ = call(
        base,
        "POST",
        "/predict",
        b"this is not an X-ray, just text\n" * 20,
        {"Content-Type": "image/jpeg"},
    )
    err = (body or {}).get("error") if isinstance(body, dict) else None
    check(
        400 <= status < 500
        and isinstance(err, dict)
        and isinstance(err.get("code"), str)
        and isinstance(err.get("message"), str),
        f"text bytes as image/jpeg -> {status} {json.dumps(body)[:160]}",
    )

    status, _, _ = call(base, "GET", "/health/ready")
    check(status == 200, f"still ready after the bad upload -> {status}")

    if check.failures:
        print(f"[smoke]   {len(check.failures)} check(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
