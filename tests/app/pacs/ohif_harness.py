"""The OHIF Viewer as a radiologist would open the result objects: the built viewer of the npm
package `@ohif/app` (pinned in `scripts/install-ohif.sh`, which `.ci/run` runs), served from one
loopback origin together with a proxy to Orthanc's DICOMweb, as OHIF needs (its `PUBLIC_URL` is
`/`, and it reads DICOMweb from the origin it was served from).

No network beyond loopback: the viewer's files come from the install directory, the studies from
the test's Orthanc. Not installed: a skip that names the install command, or a failure where
`CXR_REQUIRE_OHIF=1` (`.ci/run` sets it after installing).
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

OHIF_VERSION = "3.13.2"
INSTALL_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "install-ohif.sh"
# Forwarded to Orthanc; everything else is a file of the viewer, or its index.html (its routes).
DICOMWEB_PREFIXES = ("/dicom-web/", "/wado")


def ohif_dir() -> Path:
    """Where `scripts/install-ohif.sh` puts the viewer (`package.json` and `dist/`)."""
    configured = os.environ.get("CXR_OHIF_DIR")
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "cxr-ohif" / OHIF_VERSION


def installed_ohif() -> Path:
    """The viewer's `dist/`, or a skip (a failure under CXR_REQUIRE_OHIF=1) with the reason."""
    root = ohif_dir()
    reason = ""
    if not (root / "dist" / "index.html").is_file():
        reason = f"OHIF Viewer {OHIF_VERSION} is not installed in {root}"
    elif json.loads((root / "package.json").read_text(encoding="utf-8")).get("version") != (
        OHIF_VERSION
    ):
        reason = f"{root} does not hold OHIF Viewer {OHIF_VERSION}"
    if reason:
        reason += f" (run {INSTALL_SCRIPT.relative_to(INSTALL_SCRIPT.parents[1])}; CI does)"
        if os.environ.get("CXR_REQUIRE_OHIF") == "1":
            pytest.fail(f"CXR_REQUIRE_OHIF=1 but {reason}")
        pytest.skip(reason)
    return root / "dist"


def app_config(origin: str) -> str:
    """OHIF's `app-config.js`: one DICOMweb data source, Orthanc's, at `origin` (the proxy)."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc (test)",
            "name": "orthanc",
            "wadoUriRoot": f"{origin}/wado",
            "qidoRoot": f"{origin}/dicom-web",
            "wadoRoot": f"{origin}/dicom-web",
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": None,
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 1,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": False,
        "showErrorDetails": "always",
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class _ViewerHandler(BaseHTTPRequestHandler):
    server: _ViewerServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith(DICOMWEB_PREFIXES):
            self._forward()
        elif path == "/app-config.js":
            self._send(200, "application/javascript", self.server.config.encode())
        else:
            self._file(path)

    def _forward(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
        try:
            connection.request("GET", self.path, headers=headers)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        self._send(response.status, response.getheader("Content-Type") or "", body)

    def _file(self, path: str) -> None:
        root = self.server.dist
        candidate = (root / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(root) or not candidate.is_file():
            candidate = root / "index.html"  # one of the viewer's routes
        kind = mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
        if candidate.suffix == ".wasm":
            kind = "application/wasm"
        self._send(200, kind, candidate.read_bytes())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, dist: Path, orthanc_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _ViewerHandler)
        self.dist = dist.resolve()
        self.orthanc_port = orthanc_port
        self.origin = f"http://127.0.0.1:{self.server_address[1]}"
        self.config = app_config(self.origin)


@contextmanager
def ohif_viewer(dist: Path, orthanc_http_port: int) -> Iterator[str]:
    """Serve the viewer and Orthanc's DICOMweb from one loopback origin; yields that origin."""
    server = _ViewerServer(dist, orthanc_http_port)
    thread = threading.Thread(target=server.serve_forever, name="ohif-viewer", daemon=True)
    thread.start()
    try:
        yield server.origin
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# What the page is asked about the viewer's state: OHIF publishes its services as
# `window.services`, and Cornerstone3D as `window.cornerstone` (both on OHIF's own page).
_SHOWN_DISPLAY_SET_JS = """
() => {
  const services = window.services;
  if (!services) return null;
  const grid = services.viewportGridService.getState();
  const viewport = grid.viewports.get(grid.activeViewportId);
  const uid = viewport && (viewport.displaySetInstanceUIDs || [])[0];
  return uid ? services.displaySetService.getDisplaySetByUID(uid) || null : null;
}
"""

# An image series is shown: the active viewport holds its display set and Cornerstone has
# rendered one of its images.
_IMAGE_SHOWN_JS = f"""
([modality, description]) => {{
  const displaySet = ({_SHOWN_DISPLAY_SET_JS})();
  if (!displaySet || displaySet.Modality !== modality) return false;
  if ((displaySet.SeriesDescription || '') !== description) return false;
  const imageIds = (displaySet.images || []).map(image => image.imageId);
  return window.cornerstone.getRenderingEngines().some(engine =>
    engine.getViewports().some(viewport =>
      typeof viewport.getCurrentImageId === 'function'
      && imageIds.includes(viewport.getCurrentImageId())
      && viewport.getActors().length > 0));
}}
"""

# An SR is shown with its labels. OHIF 3.13.2's SR viewport (extension cornerstone-dicom-sr,
# OHIFCornerstoneSRMeasurementViewport) loads the SR, adds one DICOMSRDisplay annotation per
# measurement group to the referenced image, shows that image, and only then tells the tool which
# groups belong to the viewport (setTrackingUniqueIdentifiersForElement, in a React effect after
# the element is enabled). That call stores state and asks for no render, and the tool draws only
# the groups it names. When the (single, often cached) image has rendered before it, the
# annotation layer stays empty, and nothing renders a still image again until the user interacts
# (a window/level drag or a resize does). Measured here: in 4 of 12 SR openings (three runs of
# four studies) the layer was still empty 8 s after the SR had loaded, and one render of the
# viewport then drew every label. So: wait for the SR to be loaded with every group placed on an
# image; once that has held for SR_SETTLE_MS without the labels, ask Cornerstone for the render a
# user's interaction would cause (counted in window.cxrRendersAsked); then wait for the labels in
# the annotation layer.
SR_SETTLE_MS = 2_000
_SR_LABELS_JS = f"""
(labels) => {{
  const displaySet = ({_SHOWN_DISPLAY_SET_JS})();
  if (!displaySet || displaySet.Modality !== 'SR' || displaySet.isLoaded !== true) return false;
  const groups = displaySet.measurements || [];
  if (!groups.length || !groups.every(group => group.loaded === true && group.imageId)) {{
    return false;
  }}
  const drawn = [...document.querySelectorAll('svg.svg-layer text')]
    .map(text => text.textContent).join('\\n');
  if (labels.every(label => drawn.includes(label))) return true;
  const now = performance.now();
  window.cxrSrLoadedAt = window.cxrSrLoadedAt || now;
  if (now - window.cxrSrLoadedAt >= {SR_SETTLE_MS}) {{
    window.cxrRendersAsked = (window.cxrRendersAsked || 0) + 1;
    window.cxrSrLoadedAt = now;
    window.cornerstone.getRenderingEngines().forEach(engine => engine.render());
  }}
  return false;
}}
"""

# What the viewer had when the labels did not come: the shown display set, its groups, the text
# drawn and the renders asked for.
_SR_STATE_JS = f"""
() => {{
  const displaySet = ({_SHOWN_DISPLAY_SET_JS})();
  return {{
    shown: displaySet && [displaySet.Modality, displaySet.SeriesDescription],
    loaded: displaySet && displaySet.isLoaded,
    groups: ((displaySet && displaySet.measurements) || []).map(group =>
      [group.TrackingIdentifier, group.loaded, Boolean(group.imageId)]),
    drawn: [...document.querySelectorAll('svg.svg-layer text')].map(text => text.textContent),
    rendersAsked: window.cxrRendersAsked || 0,
  }};
}}
"""


def wait_for_listed(page: Any, modality: str, description: str, timeout_ms: int) -> None:
    """Until OHIF holds a display set of the series (modality, description), displayable or not."""
    page.wait_for_function(
        """([modality, description]) => window.services && window.services.displaySetService
             .getActiveDisplaySets().some(displaySet => displaySet.Modality === modality
               && (displaySet.SeriesDescription || '') === description)""",
        arg=[modality, description],
        polling=250,
        timeout=timeout_ms,
    )


def wait_for_image(page: Any, modality: str, description: str, timeout_ms: int) -> None:
    """Until the active viewport shows a rendered image of the series (modality, description)."""
    page.wait_for_function(
        _IMAGE_SHOWN_JS, arg=[modality, description], polling=250, timeout=timeout_ms
    )


def wait_for_sr_labels(page: Any, labels: tuple[str, ...], timeout_ms: int) -> int:
    """Until the active viewport shows an SR, loaded, every measurement group placed on an
    image, and the annotation layer draws every one of `labels`; the number of renders that had
    to be asked for (above)."""
    page.evaluate("() => { window.cxrSrLoadedAt = 0; window.cxrRendersAsked = 0; }")
    try:
        page.wait_for_function(_SR_LABELS_JS, arg=list(labels), polling=250, timeout=timeout_ms)
    except Exception as error:  # Playwright's TimeoutError: say what the viewer had instead
        raise AssertionError(f"{labels} not drawn: {page.evaluate(_SR_STATE_JS)}") from error
    return int(page.evaluate("() => window.cxrRendersAsked || 0"))
