"""The service as `app.main` builds it from the `CXR_*` environment, plus one route that fails the
way a defect would: for the real-process tests of what a 500 does to a keep-alive connection."""

from __future__ import annotations

from app.main import create_app

DEFECT_PATH = "/defect"

app = create_app()


@app.get(DEFECT_PATH, include_in_schema=False)
async def defect() -> None:
    raise RuntimeError("a defect in the service")
