"""Tenant resolution and permission checks, shared by every tenant-scoped API view.

:class:`TenantPermission` asks the view for its tenant (which 404s for tenants the caller
cannot see), the caller's role there, and the permission the request needs; it then checks,
in order: the token's scope (403 ``insufficient_scope``), the role (403
``permission_denied``), and for writes that the tenant is active (403 ``tenant_suspended``).
Platform admins (``is_staff``) pass role checks in every tenant they can reach.
"""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions
from rest_framework.permissions import SAFE_METHODS, BasePermission

from tenants.errors import TenantSuspended
from tenants.models import APIToken
from tenants.permissions import has_permission, scope_for


def is_platform_admin(request: Any) -> bool:
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_authenticated and user.is_staff)


class InsufficientScope(exceptions.PermissionDenied):
    default_code = "insufficient_scope"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="insufficient_scope")


def check_scope(request: Any, permission: str, *, write: bool) -> None:
    """Refuse when the request's token scope is too narrow for ``permission``."""
    token = getattr(request, "auth", None)
    if not isinstance(token, APIToken):
        return
    needed = scope_for(permission, write=write)
    if not token.allows(needed):
        raise InsufficientScope(
            f"this needs a token with scope {needed!r}; token {token.prefix} has {token.scope!r}"
        )


class TenantPermission(BasePermission):
    """Checks a request against ``view.tenant``, ``view.tenant_role`` and
    ``view.get_required_permission()`` (see :class:`tenants.api.views.TenantScopedMixin`)."""

    def has_permission(self, request: Any, view: Any) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        tenant = view.tenant  # 404 when the caller cannot see it
        permission = view.get_required_permission()
        write = request.method not in SAFE_METHODS
        check_scope(request, permission, write=write)
        if not (has_permission(view.tenant_role, permission) or is_platform_admin(request)):
            role = view.tenant_role
            raise exceptions.PermissionDenied(
                f"your role ({role}) in {tenant.slug} does not allow {permission}"
            )
        if write and not tenant.is_active and not view.allow_when_suspended:
            raise TenantSuspended(tenant.slug, tenant.status_reason)
        return True


class PlatformAdminOnly(BasePermission):
    """Platform-wide endpoints (all tenants' audit log): staff using a session."""

    message = "only platform admins can do this"

    def has_permission(self, request: Any, view: Any) -> bool:
        return is_platform_admin(request) and not isinstance(request.auth, APIToken)
