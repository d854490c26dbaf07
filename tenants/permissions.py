"""What each membership role may do, and what each token scope allows.

A permission is a string ``"<area>.<verb>"``. Roles grant sets of permissions
(:data:`ROLE_PERMISSIONS`, documented in docs/control-plane.md). A request made with an API
token gets the intersection of its creator's role and the token's scope: ``read`` tokens
only use ``*.view`` permissions, ``write`` tokens also the ordinary write permissions, and
only ``admin`` tokens the permissions in :data:`ADMIN_SCOPE_PERMISSIONS` (membership,
invitations, other people's tokens, tenant settings, billing).

Other apps check ``has_permission(role, "workloads.manage")`` — or use the DRF permission
classes in :mod:`tenants.api.permissions` — instead of testing roles by name.
"""

from __future__ import annotations

from typing import Final

from tenants.choices import Role, Scope

TENANT_VIEW = "tenant.view"
TENANT_MANAGE = "tenant.manage"
MEMBERS_VIEW = "members.view"
MEMBERS_MANAGE = "members.manage"
OWNERS_MANAGE = "owners.manage"
INVITATIONS_MANAGE = "invitations.manage"
TOKENS_MANAGE_OWN = "tokens.manage_own"
TOKENS_MANAGE_ALL = "tokens.manage_all"
QUOTAS_VIEW = "quotas.view"
AUDIT_VIEW = "audit.view"
WORKLOADS_VIEW = "workloads.view"
WORKLOADS_MANAGE = "workloads.manage"
BILLING_VIEW = "billing.view"
BILLING_MANAGE = "billing.manage"
#: Held by no role: only platform admins (``User.is_staff``) pass checks for it.
QUOTAS_MANAGE = "quotas.manage"

_VIEW: Final = frozenset({TENANT_VIEW, MEMBERS_VIEW, QUOTAS_VIEW, WORKLOADS_VIEW})

ROLE_PERMISSIONS: Final[dict[str, frozenset[str]]] = {
    Role.OWNER: _VIEW
    | {
        TENANT_MANAGE,
        MEMBERS_MANAGE,
        OWNERS_MANAGE,
        INVITATIONS_MANAGE,
        TOKENS_MANAGE_OWN,
        TOKENS_MANAGE_ALL,
        AUDIT_VIEW,
        WORKLOADS_MANAGE,
        BILLING_VIEW,
        BILLING_MANAGE,
    },
    Role.ADMIN: _VIEW
    | {
        TENANT_MANAGE,
        MEMBERS_MANAGE,
        INVITATIONS_MANAGE,
        TOKENS_MANAGE_OWN,
        TOKENS_MANAGE_ALL,
        AUDIT_VIEW,
        WORKLOADS_MANAGE,
        BILLING_VIEW,
    },
    Role.DEVELOPER: _VIEW | {TOKENS_MANAGE_OWN, WORKLOADS_MANAGE},
    Role.BILLING: _VIEW | {TOKENS_MANAGE_OWN, BILLING_VIEW, BILLING_MANAGE},
    Role.VIEWER: _VIEW | {TOKENS_MANAGE_OWN},
}

#: Permissions only ``admin``-scope tokens (and sessions) can use.
ADMIN_SCOPE_PERMISSIONS: Final = frozenset(
    {
        TENANT_MANAGE,
        MEMBERS_MANAGE,
        OWNERS_MANAGE,
        INVITATIONS_MANAGE,
        TOKENS_MANAGE_ALL,
        BILLING_MANAGE,
        QUOTAS_MANAGE,
    }
)

#: Roles a member holding the key may hand out: only owners make owners.
ASSIGNABLE_ROLES: Final[dict[str, frozenset[str]]] = {
    Role.OWNER: frozenset(Role.values),
    Role.ADMIN: frozenset(Role.values) - {Role.OWNER},
}

#: Token scopes a member with a role may create (viewers cannot mint write tokens).
MAX_TOKEN_SCOPE: Final[dict[str, str]] = {
    Role.OWNER: Scope.ADMIN.value,
    Role.ADMIN: Scope.ADMIN.value,
    Role.DEVELOPER: Scope.WRITE.value,
    Role.BILLING: Scope.WRITE.value,
    Role.VIEWER: Scope.READ.value,
}


def has_permission(role: str | None, permission: str) -> bool:
    return role is not None and permission in ROLE_PERMISSIONS.get(role, frozenset())


def scope_for(permission: str, *, write: bool) -> str:
    """The token scope needed to use ``permission`` (for a write, or a read)."""
    if permission in ADMIN_SCOPE_PERMISSIONS:
        return Scope.ADMIN.value
    return Scope.WRITE.value if write else Scope.READ.value
