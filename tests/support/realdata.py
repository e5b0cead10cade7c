"""Where the real chest X-ray data is, and the skip marker for tests that need it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get("CXR_DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "chest_xray"))
SHIPPED_METADATA = REPO_ROOT / "models" / "pneumonia_cxr.json"

DATA_MISSING = f"real data not found at {DATA_DIR} (set CXR_DATA_DIR)"
requires_data = pytest.mark.skipif(not (DATA_DIR / "test").is_dir(), reason=DATA_MISSING)
requires_shipped_model = pytest.mark.skipif(
    not SHIPPED_METADATA.is_file(), reason=f"no shipped model at {SHIPPED_METADATA}"
)
