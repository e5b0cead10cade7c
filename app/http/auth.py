"""Optional API-key authentication: the configured keys, and what OpenAPI says about them.

Keys come from `CXR_API_KEYS` (comma-separated) and/or `CXR_API_KEYS_FILE` (SHA-256 digests, one
per line, so the plain keys need not sit on the server's disk). With no key configured the
service is open; with one or more, routes that declare `dependencies=REQUIRE_API_KEY` (in
`app.http.deps`) answer 401 in the JSON error shape unless the request carries a configured key as
`Authorization: Bearer <key>` or `X-API-Key: <key>`. Health probes stay open for orchestrators.

Every configured key is kept only as its SHA-256 digest. A presented key is hashed and compared
with every digest using `hmac.compare_digest`, without stopping at the first match, so the time
taken says nothing about which key, or how much of one, matched. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from app.settings import Settings

API_KEY_HEADER = "X-API-Key"
MIN_KEY_LENGTH = 16
_HEX_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")


class ApiKeyConfigError(ValueError):
    """The configured keys cannot be used; the service refuses to start rather than run open."""


def key_digest(key: str) -> bytes:
    """SHA-256 of the key's UTF-8 bytes: what `printf %s "$KEY" | sha256sum` prints, as bytes."""
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The configured keys, as digests. Empty means authentication is off."""

    def __init__(self, digests: frozenset[bytes] = frozenset()) -> None:
        self._digests = digests

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, presented: str) -> bool:
        """Whether `presented` is a configured key, in time independent of which one matched."""
        candidate = key_digest(presented)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(candidate, digest)
        return found

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        digests: set[bytes] = set()
        if settings.api_keys is not None:
            for key in (k.strip() for k in settings.api_keys.get_secret_value().split(",")):
                if not key:
                    continue
                if len(key) < MIN_KEY_LENGTH:
                    # Never echo the key itself: the message lands in logs.
                    raise ApiKeyConfigError(
                        f"CXR_API_KEYS: every key needs at least {MIN_KEY_LENGTH} characters "
                        "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
                    )
                digests.add(key_digest(key))
            if not digests:
                # " , " is a setting that was meant to hold keys: never start open on it.
                raise ApiKeyConfigError(
                    "CXR_API_KEYS names no key (only commas and spaces); set keys, or leave it "
                    "unset to run without them"
                )
        if settings.api_keys_file is not None:
            from_file = read_digest_file(settings.api_keys_file)
            if not from_file:
                # A mounted secret that came out empty must not silently open the service.
                raise ApiKeyConfigError(
                    f"CXR_API_KEYS_FILE {settings.api_keys_file} holds no key digest; add one "
                    'line per key with the output of: printf %s "$KEY" | sha256sum'
                )
            digests |= from_file
        return cls(frozenset(digests))


def read_digest_file(path: Path) -> set[bytes]:
    """Digests from a file: per line, a 64-hex-digit SHA-256 first, then anything (a label, or
    the `-` that `sha256sum` prints for stdin); blank lines and `#` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ApiKeyConfigError(f"CXR_API_KEYS_FILE {path} cannot be read: {exc}") from exc
    digests = set()
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if not _HEX_DIGEST.match(fields[0]):
            raise ApiKeyConfigError(
                f"CXR_API_KEYS_FILE {path}, line {number}: expected a SHA-256 hex digest "
                "(64 hex digits) first; store digests of keys, never the keys"
            )
        digests.add(bytes.fromhex(fields[0]))
    return digests


_UNAUTHORIZED_RESPONSE = {
    "description": "API keys are required and the request carried none or an invalid one",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}


def document_api_keys(app: FastAPI) -> None:
    """Make the OpenAPI document say what is true for this start-up: with keys configured, the
    protected operations list both security schemes and a 401; without, no security at all."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # cached by FastAPI after the first call; the edits are idempotent
        required = app.state.api_keys.required
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                if "security" not in operation:
                    continue
                if required:
                    operation["responses"].setdefault("401", _UNAUTHORIZED_RESPONSE)
                else:
                    del operation["security"]
        if not required:
            schema.get("components", {}).pop("securitySchemes", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
