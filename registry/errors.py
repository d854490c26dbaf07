"""Refusals of the registry's token server, in the distribution error format.

docker, skopeo and podman print ``errors[0].message`` from a failed token request, so a
refusal here reaches the user verbatim (e.g. which quota a push would exceed).
"""

from __future__ import annotations

from tenants.errors import BerthError


class RegistryAuthError(BerthError):
    """Credentials missing, malformed, unknown, revoked or expired (HTTP 401)."""

    status_code = 401
    code = "UNAUTHORIZED"


class RegistryDenied(BerthError):
    """Valid credentials, but this access is refused (HTTP 403), e.g. over quota."""

    status_code = 403
    code = "DENIED"


class RegistryUnavailable(BerthError):
    """The control plane could not reach the registry process."""

    status_code = 502
    code = "registry_unavailable"
