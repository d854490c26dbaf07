"""Errors a registry returns, as typed agent errors.

A registry answers failures with ``{"errors": [{"code": "DENIED", "message": ...}]}``;
``RegistryError`` keeps that code (``registry_code``) and the HTTP status so callers and
tests can tell "no such tag" from "not allowed" from "the registry is down".
"""

from __future__ import annotations

import json

from runtime_agent.errors import AgentError, NotFound


class RegistryError(AgentError):
    """The registry refused or failed a request."""

    code = "registry_error"

    def __init__(self, message: str, *, status: int = 0, registry_code: str = "") -> None:
        super().__init__(message, status=status, registry_code=registry_code)
        self.status = status
        self.registry_code = registry_code


class RegistryUnauthorized(RegistryError):
    """Credentials were missing or wrong, or the token does not grant the action."""

    code = "unauthenticated"


class RegistryDenied(RegistryError):
    """The credentials are valid but not allowed to do this (another tenant, read-only, quota)."""

    code = "permission_denied"


class ManifestNotFound(NotFound):
    """No manifest under that tag or digest (or no repository or blob of that name)."""

    def __init__(self, message: str, *, status: int = 404, registry_code: str = "") -> None:
        super().__init__(message, status=status, registry_code=registry_code)
        self.status = status
        self.registry_code = registry_code


_NOT_FOUND_CODES = {"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN", "TAG_INVALID"}


def error_from_response(status: int, body: bytes, what: str) -> AgentError:
    """Turn a registry error response into the matching typed error."""
    code, message = "", ""
    try:
        errors = json.loads(body or b"{}").get("errors") or []
        if errors:
            code = str(errors[0].get("code", ""))
            message = str(errors[0].get("message", ""))
            if len(errors) > 1:
                message += "; " + "; ".join(str(e.get("message", "")) for e in errors[1:])
    except (ValueError, AttributeError):
        message = body[:200].decode(errors="replace")
    text = f"{what}: {code or status} {message}".rstrip()
    if status == 404 or (code in _NOT_FOUND_CODES and status < 500):
        return ManifestNotFound(text, status=status, registry_code=code)
    if status == 401 or code == "UNAUTHORIZED":
        return RegistryUnauthorized(text, status=status, registry_code=code)
    if status == 403 or code == "DENIED":
        return RegistryDenied(text, status=status, registry_code=code)
    return RegistryError(text, status=status, registry_code=code)
