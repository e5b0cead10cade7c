"""The viewer page at `/viewer`: choose or drop an X-ray, see the answer and where the model looked.

Three static files from `app/http/static/`, served by the service itself with a policy that lets the
page talk to this origin only (no CDN, no outside host: it works on an air-gapped network). The page
calls the public API (`GET /model`, `POST /predict?explain=true`) like any other client, so it needs
an API key where the service asks for one.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import RedirectResponse, Response

STATIC = Path(__file__).resolve().parent / "static"
_FILES = {
    "viewer.html": "text/html; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
    "viewer.css": "text/css; charset=utf-8",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)

router = APIRouter(include_in_schema=False)


def _static(name: str) -> Response:
    return Response(
        (STATIC / name).read_bytes(),
        media_type=_FILES[name],
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )


@router.get("/")
async def home() -> RedirectResponse:
    return RedirectResponse("/viewer")


@router.get("/viewer")
async def viewer() -> Response:
    return _static("viewer.html")


@router.get("/viewer/{name}")
async def viewer_asset(name: str) -> Response:
    if name not in _FILES or name == "viewer.html":
        raise HTTPException(status_code=404, detail="Not Found")
    return _static(name)
