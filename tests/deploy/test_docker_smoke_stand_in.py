"""`scripts/docker-smoke.sh --stand-in-model` serves a generated model: the generator embedded in
the script writes a model the service accepts (the smoke test needs Docker; this check does not).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from app.model.loading import load_classifier
from app.settings import Settings

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "docker-smoke.sh"
SHIPPED = Path(__file__).resolve().parents[2] / "models" / "pneumonia_cxr.json"


def test_the_stand_in_model_loads_and_responds(tmp_path: Path) -> None:
    found = re.search(r"<<'PY'\n(.*?)\nPY\n", SCRIPT.read_text(encoding="utf-8"), re.S)
    assert found, "the stand-in generator is no longer a <<'PY' block in docker-smoke.sh"
    generator = tmp_path / "stand_in.py"
    generator.write_text(found.group(1), encoding="utf-8")
    out = tmp_path / "model"
    subprocess.run([sys.executable, str(generator), str(out), str(SHIPPED)], check=True)

    metadata = out / "pneumonia_cxr.json"
    settings = Settings(_env_file=None, model_metadata=metadata, provider="cpu")  # type: ignore[call-arg]
    classifier = load_classifier(settings)
    assert classifier.metadata.name == "pneumonia-cxr-stand-in"
    assert not classifier.explains
