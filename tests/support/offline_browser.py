"""Headless Chromium with no network beyond the service under test, for the page tests.

Debian's `chromium`, driven by Playwright: every request that is not to the service's origin is
recorded and aborted, and host names do not resolve, as on an air-gapped hospital network.
Where no Chromium is installed the tests skip, saying so; CI installs one and sets
CXR_REQUIRE_BROWSER=1, which turns the skip into a failure. (A plain module, not conftest, so test
files import it by name.)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

BROWSER_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_executable() -> str:
    configured = os.environ.get("CXR_CHROMIUM")
    found = configured or next(filter(None, map(shutil.which, BROWSER_CANDIDATES)), None)
    if found:
        return found
    reason = "no Chromium installed (apt-get install chromium); CI installs it"
    if os.environ.get("CXR_REQUIRE_BROWSER") == "1":
        pytest.fail(f"CXR_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@dataclass
class OfflineBrowser:
    """One page whose network reaches only `allowed_origin`."""

    page: Any
    allowed_origin: str
    served: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    # Requests the page's own Content-Security-Policy stopped before they reached the network.
    csp_refusals: list[str] = field(default_factory=list)


@contextmanager
def launch_browser() -> Iterator[Any]:
    """Headless Chromium, or a skip (a failure under CXR_REQUIRE_BROWSER=1) with the reason."""
    playwright_sync = pytest.importorskip("playwright.sync_api")
    executable = chromium_executable()
    with playwright_sync.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable,
            # Belt and braces beside the request routing below: no host name resolves except
            # the loopback address the service listens on.
            args=["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"],
        )
        yield launched
        launched.close()


def open_offline(browser: Any, origin: str) -> OfflineBrowser:
    context = browser.new_context()
    page = context.new_page()
    offline = OfflineBrowser(page, origin)

    def route(route: Any) -> None:
        url = route.request.url
        if url.startswith(origin + "/"):
            offline.served.append(url)
            route.continue_()
        else:
            offline.blocked.append(url)
            route.abort("internetdisconnected")

    context.route("**/*", route)
    page.on("pageerror", lambda error: offline.page_errors.append(str(error)))
    page.on(
        "console",
        lambda message: (
            "Content Security Policy" in message.text and offline.csp_refusals.append(message.text)
        ),
    )
    return offline
