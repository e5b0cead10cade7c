"""Interactive API documentation served entirely by the service itself.

FastAPI's stock /docs and /redoc load Swagger UI and ReDoc from a public CDN, so on an air-gapped
hospital network they render a blank page. Here the pages reference assets that the pinned
`fastapi-offline` wheel ships (Swagger UI 5, ReDoc 2, a favicon), served under /docs-assets, and a
Content-Security-Policy keeps the browser from contacting any other host from these pages (ReDoc
would otherwise fetch its vendor's logo from a CDN).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = "/docs-assets"

# Same origin only. The pages' own bootstrap is an inline script, and both UIs set inline styles;
# ReDoc runs its search in a blob: worker and inlines small images as data: URLs.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
}


def install_docs(app: FastAPI) -> None:
    """Add /docs (Swagger UI), /redoc and their assets. Build the app with `docs_url=None,
    redoc_url=None` so that FastAPI's CDN-backed pages are not registered as well."""
    app.mount(ASSETS_URL, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")

    def asset(request: Request, name: str) -> str:
        # Behind a reverse proxy that strips a path prefix, uvicorn's --root-path puts it back.
        return f"{request.scope.get('root_path', '')}{ASSETS_URL}/{name}"

    def openapi_url(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}{app.openapi_url}"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return _same_origin_only(
            get_swagger_ui_html(
                openapi_url=openapi_url(request),
                title=f"{app.title} - Swagger UI",
                swagger_js_url=asset(request, "swagger-ui-bundle.js"),
                swagger_css_url=asset(request, "swagger-ui.css"),
                swagger_favicon_url=asset(request, "favicon.png"),
                swagger_ui_parameters={"validatorUrl": None},
            )
        )

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return _same_origin_only(
            get_redoc_html(
                openapi_url=openapi_url(request),
                title=f"{app.title} - ReDoc",
                redoc_js_url=asset(request, "redoc.standalone.js"),
                redoc_favicon_url=asset(request, "favicon.png"),
                with_google_fonts=False,
            )
        )


def _same_origin_only(page: HTMLResponse) -> HTMLResponse:
    page.headers.update(_SECURITY_HEADERS)
    return page
