"""Optional API-key authentication: the configured keys, and what OpenAPI says about them.

Keys come from `CXR_API_KEYS` (comma-separated) and/or `CXR_API_KEYS_FILE` (SHA-256 digests, one
per line, so the plain keys need not sit on the server's disk). With no key configured the
service is open; with one or more, routes that declare `dependencies=REQUIRE_API_KEY` (in
`app.http.deps`) answer 401 in the JSON error shape unless the request carries a configured key as
`Authorization: Bearer <key>` or `X-API-Key: <key>`. Health probes stay open for orchestrators.

Every configured key is kept only as its SHA-256 digest. A presented key is hashed and compared
with every digest using `hmac.compare_digest`, without stopping at the first match, so the time
taken says nothing about which key, or how much of one, matched. Keys are never logged.

Roles: what a key may do. `read` (stored results, `GET /results/...`), `predict` (`POST /predict`,
`/predict/batch`), `deliver` (write into the PACS or RIS: `deliver=true`, STOW-RS), `operate`
(`DELETE /results/...`). A key file line names them with a `roles=` field after the digest
(`<sha256> viewer roles=read`); a line without one, and every key of `CXR_API_KEYS`, has
`DEFAULT_ROLES`: all that keys could do before roles existed (read, predict, deliver), never
`operate`, which only a line that names it gives. Without keys the service is open to the default
roles, and nothing can operate. `GET /model` and `/metrics` need a key, of any role.
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

READ, PREDICT, DELIVER, OPERATE = "read", "predict", "deliver", "operate"
ROLES = (READ, PREDICT, DELIVER, OPERATE)
DEFAULT_ROLES = frozenset({READ, PREDICT, DELIVER})
Roles = frozenset[str]


class ApiKeyConfigError(ValueError):
    """The configured keys cannot be used; the service refuses to start rather than run open."""


def key_digest(key: str) -> bytes:
    """SHA-256 of the key's UTF-8 bytes: what `printf %s "$KEY" | sha256sum` prints, as bytes."""
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The configured keys, as digests with their roles. Empty means authentication is off."""

    def __init__(self, digests: dict[bytes, Roles] | None = None) -> None:
        self._roles = dict(digests or {})

    @property
    def required(self) -> bool:
        return bool(self._roles)

    def __len__(self) -> int:
        return len(self._roles)

    def roles_of(self, presented: str) -> Roles | None:
        """The roles of `presented` (None when it is no configured key), in time independent of
        which key matched."""
        candidate = key_digest(presented)
        found: Roles | None = None
        for digest, roles in self._roles.items():
            if hmac.compare_digest(candidate, digest):
                found = roles
        return found

    def accepts(self, presented: str) -> bool:
        """Whether `presented` is a configured key, in time independent of which one matched."""
        return self.roles_of(presented) is not None

    def count_with(self, role: str) -> int:
        return sum(role in roles for roles in self._roles.values())

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        digests: dict[bytes, Roles] = {}
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
                digests[key_digest(key)] = DEFAULT_ROLES
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
            # a key in both places has the roles its file line gives
            digests |= from_file
        return cls(digests)


def read_digest_file(path: Path) -> dict[bytes, Roles]:
    """Digests from a file, with their roles: per line, a 64-hex-digit SHA-256 first, then
    anything (a label, or the `-` that `sha256sum` prints for stdin) and optionally
    `roles=read,predict,...` (else `DEFAULT_ROLES`); blank lines and `#` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ApiKeyConfigError(f"CXR_API_KEYS_FILE {path} cannot be read: {exc}") from exc
    digests: dict[bytes, Roles] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"CXR_API_KEYS_FILE {path}, line {number}"
        if not _HEX_DIGEST.match(fields[0]):
            raise ApiKeyConfigError(
                f"{where}: expected a SHA-256 hex digest (64 hex digits) first; store digests "
                "of keys, never the keys"
            )
        named = [f.removeprefix("roles=") for f in fields[1:] if f.startswith("roles=")]
        if len(named) > 1:
            raise ApiKeyConfigError(f"{where}: more than one roles= field")
        roles = DEFAULT_ROLES if not named else frozenset(r for r in named[0].split(",") if r)
        unknown = sorted(roles - set(ROLES))
        if unknown or not roles:
            raise ApiKeyConfigError(
                f"{where}: roles= takes one or more of {', '.join(ROLES)} "
                f"(found {', '.join(unknown) or 'none'})"
            )
        digests[bytes.fromhex(fields[0])] = roles
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
