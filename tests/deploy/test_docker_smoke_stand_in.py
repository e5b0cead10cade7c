"""`scripts/ci/docker-smoke.sh --stand-in-model` serves a generated model: the generator it runs
(`python -m scripts.ci.stand_in_model`) writes a model the service accepts (the smoke test needs
Docker; this check does not)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.model.loading import load_classifier
from app.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "ci" / "docker-smoke.sh"
SHIPPED = REPO_ROOT / "models" / "pneumonia_cxr.json"


def test_the_stand_in_model_loads_and_responds(tmp_path: Path) -> None:
    assert "-m scripts.ci.stand_in_model " in SCRIPT.read_text(encoding="utf-8")
    out = tmp_path / "model"
    subprocess.run(
        [sys.executable, "-m", "scripts.ci.stand_in_model", str(out), str(SHIPPED)],
        check=True,
        cwd=REPO_ROOT,
    )

    metadata = out / "pneumonia_cxr.json"
    settings = Settings(_env_file=None, model_metadata=metadata, provider="cpu")  # type: ignore[call-arg]
    classifier = load_classifier(settings)
    assert classifier.metadata.name == "pneumonia-cxr-stand-in"
    assert not classifier.explains
