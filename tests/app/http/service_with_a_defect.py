"""The service as `app.main` builds it from the `CXR_*` environment, plus one route that fails the
way a defect would: for the real-process tests of what a 500 does to a keep-alive connection."""

from __future__ import annotations

from app.main import create_app

DEFECT_PATH = "/defect"
# What a parser's message might quote: it must never reach the log.
DEFECT_SECRET = "DOE^JANE^1970"

app = create_app()


@app.get(DEFECT_PATH, include_in_schema=False)
async def defect() -> None:
    try:
        raise KeyError(f"the value {DEFECT_SECRET} was not expected")
    except KeyError as exc:
        raise RuntimeError(f"a defect in the service while reading {DEFECT_SECRET}") from exc
