"""What a browser must not be able to do with the service: `BrowserGuard`, one ASGI middleware.

- **Cross-site posts.** With no API keys (compose's default) any page a radiologist opens could
  make their browser POST an X-ray to `/predict?deliver=true` (a form post needs no CORS
  preflight) and so write into the PACS. Browsers name the page's origin in `Origin` on every
  POST, so a POST (PUT, PATCH, DELETE) whose `Origin` is neither the service's own (the `Host` it
  was sent to) nor one of `CXR_ALLOWED_ORIGINS` is refused with 403 `cross_origin`; so is one that
  says `Sec-Fetch-Site: cross-site` without an `Origin`. A client that sends neither (curl, a PACS
  router, a script) is what an API client is, and passes.
- **DNS rebinding.** With `CXR_TRUSTED_HOSTS` set, a request for another `Host` gets 400
  `invalid_host`; the health probes are exempt (orchestrators probe by address).
- **Caches.** Answers that carry patient data (predictions, stored results, STOW-RS responses)
  say `Cache-Control: no-store`, so that no browser or proxy keeps them.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.errors import error_json

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PATIENT_DATA_PATHS = ("/predict", "/results", "/dicomweb")
PROBE_PATHS = ("/health/",)


def _host_name(host: str) -> str:
    """The name of a `Host` value, without its port (an IPv6 literal keeps its brackets)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class BrowserGuard:
    """Refuses cross-site writes and unknown hosts; marks patient-data answers `no-store`."""

    def __init__(
        self,
        app: ASGIApp,
        trusted_hosts: tuple[str, ...] = (),
        allowed_origins: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.trusted_hosts = tuple(h.lower() for h in trusted_hosts)
        self.allowed_origins = frozenset(o.lower().rstrip("/") for o in allowed_origins)

    def host_trusted(self, host: str) -> bool:
        if not self.trusted_hosts or "*" in self.trusted_hosts:
            return True
        name = _host_name(host)
        return any(
            name == trusted or (trusted.startswith("*.") and name.endswith(trusted[1:]))
            for trusted in self.trusted_hosts
        )

    def origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if origin in self.allowed_origins:
            return True
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        # Same origin: the page came from the host this request was sent to. The scheme is not
        # compared: behind a proxy that ends TLS the service sees http for an https page.
        return parts.scheme in ("http", "https") and parts.netloc == host.strip().lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope["path"]
        host = headers.get("host", "")
        if not path.startswith(PROBE_PATHS) and not self.host_trusted(host):
            refusal = error_json(400, "invalid_host", "this service does not answer to that host")
            await refusal(scope, receive, send)
            return
        if scope["method"] in UNSAFE_METHODS:
            origin = headers.get("origin")
            cross_site = (
                not self.origin_allowed(origin, host)
                if origin is not None
                else headers.get("sec-fetch-site", "").lower() == "cross-site"
            )
            if cross_site:
                refusal = error_json(
                    403,
                    "cross_origin",
                    "a page of another site may not post to this service; API clients send no "
                    "Origin, and a site's own viewer is listed in CXR_ALLOWED_ORIGINS",
                )
                await refusal(scope, receive, send)
                return
        if not path.startswith(PATIENT_DATA_PATHS):
            await self.app(scope, receive, send)
            return

        async def send_no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_no_store)
