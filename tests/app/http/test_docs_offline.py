"""/docs and /redoc render in a real browser with no network beyond the service itself.

Headless Chromium (the system's: Debian's `chromium` package, driven by Playwright) loads the
pages from a real uvicorn process. Every request that is not to that process is recorded and
aborted, and host names do not resolve, as on an air-gapped hospital network. A control run shows
that FastAPI's stock pages, which load their assets from a CDN, render nothing under the same
conditions, so the block is real.

Skips, saying so, where no Chromium is installed; CI installs one and sets CXR_REQUIRE_BROWSER=1,
which turns the skip into a failure.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import pytest

from tests.support.offline_browser import open_offline
from tests.support.testkit import UvicornProcess, process_settings

API_KEY = "docs-test-key-0123456789"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornProcess]:
    workdir = tmp_path_factory.mktemp("docs_service")
    settings = process_settings(workdir, api_keys=API_KEY)
    with UvicornProcess.serving(workdir / "server.log", settings) as server:
        yield server


def test_swagger_ui_renders_every_operation_offline(browser, service):
    offline = open_offline(browser, service.base_url)
    page = offline.page
    page.goto(f"{service.base_url}/docs", wait_until="load")
    page.wait_for_selector(".opblock-summary-path", timeout=20_000)

    paths = page.locator(".opblock-summary-path").all_inner_texts()
    # Swagger UI breaks long paths with zero-width spaces
    assert sorted(p.replace("\u200b", "").strip() for p in paths) == [
        "/dicomweb/studies",
        "/dicomweb/studies/{study}",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/model",
        "/predict",
        "/predict/batch",
        "/results/{sop_instance_uid}",  # GET
        "/results/{sop_instance_uid}",  # DELETE (an operate key)
        "/results/{sop_instance_uid}/sr",
    ]
    title = page.locator(".info .title").inner_text()
    assert "Pneumonia screening (chest X-ray)" in title
    # With API keys configured, the security schemes are there to fill in.
    assert page.locator("button.authorize").count() == 1
    # An operation opens and offers to be tried, with the upload as a multipart field.
    page.locator(".opblock-post .opblock-summary").first.click()
    page.wait_for_selector(".try-out__btn", timeout=10_000)
    assert "multipart/form-data" in page.content()

    assert offline.blocked == []
    assert offline.page_errors == []
    assert offline.csp_refusals == []
    assert f"{service.base_url}/docs-assets/swagger-ui-bundle.js" in offline.served
    assert f"{service.base_url}/openapi.json" in offline.served


def test_redoc_renders_offline(browser, service):
    offline = open_offline(browser, service.base_url)
    page = offline.page
    page.goto(f"{service.base_url}/redoc", wait_until="load")
    heading = page.locator("h2", has_text="Screen one chest X-ray for pneumonia")
    heading.wait_for(timeout=20_000)
    text = page.inner_text("body")
    assert "/predict" in text and "Research use only" in text
    assert offline.blocked == []
    assert offline.page_errors == []
    # ReDoc's footer shows its vendor's logo from a CDN (hidden when it fails to load): the
    # page's policy refuses it, so the browser never tries the network. Nothing else is refused.
    assert len(offline.csp_refusals) == 1
    assert "https://cdn.redoc.ly/redoc/logo-mini.svg" in offline.csp_refusals[0]
    assert f"{service.base_url}/docs-assets/redoc.standalone.js" in offline.served


def test_control_fastapis_stock_docs_stay_blank_under_the_same_block(browser, tmp_path):
    (tmp_path / "stock_docs.py").write_text(
        textwrap.dedent(
            """
            from fastapi import FastAPI

            app = FastAPI(title="stock")


            @app.get("/health/ready")
            def ready() -> dict[str, str]:
                return {"status": "ready"}
            """
        )
    )
    args = ["--app-dir", str(tmp_path)]
    with UvicornProcess.serving(tmp_path / "stock.log", {}, args, app="stock_docs:app") as server:
        offline = open_offline(browser, server.base_url)
        offline.page.goto(f"{server.base_url}/docs", wait_until="load")
        offline.page.wait_for_timeout(1500)
        rendered = offline.page.locator(".opblock-summary-path").count()
    assert rendered == 0
    assert any("cdn.jsdelivr.net" in url for url in offline.blocked), offline.blocked


def test_the_assets_are_served_by_the_service(client):
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        response = client.get(f"/docs-assets/{asset}")
        assert response.status_code == 200
        assert len(response.content) > 100_000
    docs = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs
    assert "cdn." not in docs and "googleapis" not in docs
    redoc = client.get("/redoc").text
    assert "/docs-assets/redoc.standalone.js" in redoc
    assert "cdn." not in redoc and "googleapis" not in redoc


def test_the_pages_name_no_outside_host_and_forbid_contacting_one(client):
    for page in ("/docs", "/redoc"):
        response = client.get(page)
        assert "https://" not in response.text and "http://" not in response.text, page
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy
        assert "img-src 'self' data:" in policy
