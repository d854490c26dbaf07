"""Typed errors of the control plane services.

Each carries an HTTP status, a stable machine-readable ``code``, a human ``message`` and
structured ``details``; the API's exception handler (``tenants.api.errors``) renders any
:class:`BerthError` as ``{"error": {"code", "message", "details"}}``. Other apps subclass
:class:`BerthError` for their own refusals.
"""

from __future__ import annotations

from typing import Any


class BerthError(Exception):
    """Base of all service errors that users should see."""

    status_code = 400
    code = "invalid"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidInput(BerthError):
    """The request names something malformed (slug, email, role…)."""

    status_code = 400
    code = "invalid"


class NotFound(BerthError):
    status_code = 404
    code = "not_found"


class PermissionDenied(BerthError):
    status_code = 403
    code = "permission_denied"


class Conflict(BerthError):
    status_code = 409
    code = "conflict"


class TenantSuspended(BerthError):
    """A suspended tenant tried to change something."""

    status_code = 403
    code = "tenant_suspended"

    def __init__(self, slug: str, reason: str) -> None:
        super().__init__(
            f"tenant {slug!r} is suspended" + (f": {reason}" if reason else ""),
            details={"tenant": slug, "reason": reason},
        )


class QuotaExceeded(BerthError):
    """A reservation would take ``quota`` over its limit.

    ``limit`` is the tenant's effective quota, ``used`` what is already reserved,
    ``requested`` what this call asked for.
    """

    status_code = 409
    code = "quota_exceeded"

    def __init__(self, quota: str, limit: int, used: int, requested: int) -> None:
        self.quota = quota
        self.limit = limit
        self.used = used
        self.requested = requested
        super().__init__(
            f"quota {quota} exceeded: limit {limit}, in use {used}, requested {requested}",
            details={"quota": quota, "limit": limit, "used": used, "requested": requested},
        )


class SeatLimitReached(BerthError):
    """Adding a member would exceed the tenant's paid seats."""

    status_code = 409
    code = "seat_limit_reached"


class LastOwner(Conflict):
    code = "last_owner"


class AlreadyMember(Conflict):
    code = "already_member"


class InvitationInvalid(BerthError):
    """The invitation key is unknown, used, revoked or expired (``details.state`` says)."""

    status_code = 410
    code = "invitation_invalid"


class ReservationReleased(Conflict):
    code = "already_released"
