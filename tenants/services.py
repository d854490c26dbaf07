"""Every write to tenants, memberships, invitations, tokens and quotas goes through here.

Each function runs under ``transaction.atomic``, records an :class:`~tenants.models.AuditLog`
row naming its :class:`Actor`, and schedules side effects (email) with
``transaction.on_commit`` so nothing is sent for a write that rolled back. Errors are the
typed ones in :mod:`tenants.errors`; on an error nothing is written.

Quota accounting (:func:`reserve`, :func:`release`) is the contract other apps use to admit
workloads, builds and storage: see docs/control-plane.md.
"""

from __future__ import annotations

import secrets
import string
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.db.models import BigIntegerField, Case, F, Value, When
from django.db.models.functions import Greatest
from django.utils import timezone

from billing.models import Plan
from billing.plans import PER_CONTAINER_QUOTAS, QUOTA_NAMES
from runtime_agent.names import reserved_name_reason
from tenants import permissions as perms
from tenants.choices import SCOPE_LEVEL, Role, Scope, TenantStatus
from tenants.errors import (
    AlreadyMember,
    InvalidInput,
    InvitationInvalid,
    LastOwner,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    SeatLimitReached,
    TenantSuspended,
)
from tenants.models import (
    TOKEN_PREFIX,
    APIToken,
    AuditLog,
    Invitation,
    Membership,
    QuotaOverride,
    QuotaReservation,
    QuotaUsage,
    Tenant,
    User,
    hash_secret,
    slug_validator,
)

_TOKEN_ALPHABET = string.ascii_lowercase + string.digits
INVITATION_KEY_PREFIX = "inv_"


# --------------------------------------------------------------------------- actors & audit


@dataclass(frozen=True)
class Actor:
    """Who performs a write: a user, a token (acting for its user), or the system."""

    user: User | None = None
    token: APIToken | None = None
    ip: str | None = None
    system: str | None = None

    @classmethod
    def from_request(cls, request: Any) -> Actor:
        """The actor of an HTTP request (DRF or Django). The IP is ``REMOTE_ADDR``."""
        token = getattr(request, "auth", None)
        user = getattr(request, "user", None)
        return cls(
            user=user if user is not None and user.is_authenticated else None,
            token=token if isinstance(token, APIToken) else None,
            ip=request.META.get("REMOTE_ADDR") or None,
        )

    @classmethod
    def for_system(cls, name: str) -> Actor:
        """A non-human actor: a management command, a Celery task, a webhook."""
        return cls(system=name)

    @property
    def label(self) -> str:
        if self.token is not None:
            who = self.user.email if self.user is not None else f"user {self.token.user_id}"
            return f"{who} via token {self.token.prefix}"
        if self.user is not None:
            return self.user.email or self.user.get_username()
        return f"system:{self.system or 'unknown'}"


def record(
    actor: Actor,
    action: str,
    *,
    tenant: Tenant | None,
    target: Any = None,
    details: Mapping[str, Any] | None = None,
) -> AuditLog:
    """Write one audit row. Call it inside the transaction of the write it describes."""
    target_type = target_id = target_repr = ""
    if target is not None:
        target_type = type(target).__name__.lower()
        target_id = str(getattr(target, "pk", "") or "")
        target_repr = str(target)[:200]
    return AuditLog.objects.create(
        tenant=tenant,
        tenant_slug=tenant.slug if tenant is not None else "",
        actor_user=actor.user,
        actor_token=actor.token,
        actor_label=actor.label[:200],
        action=action,
        target_type=target_type,
        target_id=target_id,
        target_repr=target_repr,
        details=dict(details or {}),
        ip=actor.ip,
    )


# --------------------------------------------------------------------------- helpers


def normalize_email(email: str) -> str:
    email = (email or "").strip().lower()
    try:
        validate_email(email)
    except ValidationError:
        raise InvalidInput(
            f"{email!r} is not a valid email address", details={"field": "email"}
        ) from None
    return email


def validate_slug(slug: str) -> str:
    """The slug rule, and none of the names the node, the registry or the platform keep
    (``runtime_agent.names``): a tenant's slug names its namespaces on nodes and in the
    registry, so ``library`` would write into every tenant's base images."""
    try:
        slug_validator(slug)
    except ValidationError as exc:
        raise InvalidInput(
            f"invalid slug {slug!r}: {exc.messages[0]}", details={"field": "slug"}
        ) from None
    if reason := reserved_name_reason(slug):
        raise InvalidInput(
            f"slug {slug!r} is not available: {reason}",
            details={"field": "slug", "reason": "reserved"},
        )
    return slug


def _validate_role(role: str) -> str:
    if role not in Role.values:
        raise InvalidInput(
            f"unknown role {role!r}", details={"field": "role", "allowed": list(Role.values)}
        )
    return role


def ensure_active(tenant: Tenant) -> None:
    """Raise :class:`TenantSuspended` unless the tenant may act (create, change, run)."""
    if tenant.status != TenantStatus.ACTIVE:
        raise TenantSuspended(tenant.slug, tenant.status_reason)


def _lock_tenant(tenant: Tenant) -> Tenant:
    """Re-read the tenant row under a row lock (serialises seat and membership changes).

    The lock is taken without a join: Postgres re-checks a locked row that a concurrent
    transaction changed, and with the plan joined a concurrent plan change made the row
    vanish from the result (``Tenant.DoesNotExist``). The plan is read after the lock.
    FOR NO KEY UPDATE: lockers still wait for each other, but rows being inserted that
    reference the tenant (audit entries, usage, builds) are not blocked by it, so a lock
    held here never forms a deadlock with another transaction's foreign-key check.
    """
    Tenant.objects.select_for_update(no_key=True).filter(pk=tenant.pk).values_list(
        "pk", flat=True
    ).get()
    return Tenant.objects.select_related("plan").get(pk=tenant.pk)


def get_or_create_user(email: str, *, password: str | None = None) -> tuple[User, bool]:
    """The user with this email, created (username = email) when missing."""
    email = normalize_email(email)
    user = User.objects.filter(email__iexact=email).first()
    if user is not None:
        return user, False
    user = User(username=email, email=email)
    if password:
        user.set_password(password)
    else:
        user.set_unusable_password()
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError:
        # Created concurrently by another request: use that account.
        return User.objects.get(email__iexact=email), False
    return user, True


def role_of(tenant: Tenant, user: Any) -> str | None:
    """The user's role in the tenant, or None when not a member."""
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    return (
        Membership.objects.filter(tenant=tenant, user=user).values_list("role", flat=True).first()
    )


def seats_full(tenant: Tenant) -> bool:
    """Members plus open invitations already fill the paid seats."""
    fresh = Tenant.objects.get(pk=tenant.pk)
    return fresh.memberships.count() + _pending_invitations(fresh) >= fresh.seats


def _pending_invitations(tenant: Tenant) -> int:
    return Invitation.objects.filter(
        tenant=tenant,
        accepted_at__isnull=True,
        revoked_at__isnull=True,
        expires_at__gt=timezone.now(),
    ).count()


# --------------------------------------------------------------------------- tenants


@transaction.atomic
def create_tenant(
    *,
    slug: str,
    owner_email: str,
    actor: Actor,
    name: str | None = None,
    plan_code: str = "free",
    seats: int | None = None,
    owner_password: str | None = None,
) -> tuple[Tenant, User]:
    """Create a tenant with its owner (created too when no user has that email).

    ``seats`` defaults to the plan's minimum and must fit the plan's range.
    """
    validate_slug(slug)
    plan = Plan.objects.filter(code=plan_code).first()
    if plan is None:
        raise InvalidInput(
            f"unknown plan {plan_code!r}",
            details={"field": "plan", "allowed": list(Plan.objects.values_list("code", flat=True))},
        )
    seats = plan.min_seats if seats is None else seats
    if problem := plan.seats_error(seats):
        raise InvalidInput(problem, details={"field": "seats"})
    if Tenant.objects.filter(slug=slug).exists():
        raise InvalidInput(f"slug {slug!r} is taken", details={"field": "slug"})
    owner, _ = get_or_create_user(owner_email, password=owner_password)
    try:
        with transaction.atomic():
            tenant = Tenant.objects.create(name=name or slug, slug=slug, plan=plan, seats=seats)
    except IntegrityError:
        raise InvalidInput(f"slug {slug!r} is taken", details={"field": "slug"}) from None
    Membership.objects.create(tenant=tenant, user=owner, role=Role.OWNER)
    QuotaUsage.objects.bulk_create(
        [QuotaUsage(tenant=tenant, quota=q) for q in QUOTA_NAMES if q not in PER_CONTAINER_QUOTAS]
    )
    record(
        actor,
        "tenant.create",
        tenant=tenant,
        target=tenant,
        details={"plan": plan.code, "seats": seats, "owner": owner.email},
    )
    return tenant, owner


@transaction.atomic
def update_tenant(tenant: Tenant, *, name: str, actor: Actor) -> Tenant:
    tenant = _lock_tenant(tenant)
    ensure_active(tenant)
    name = name.strip()
    if not name:
        raise InvalidInput("name must not be empty", details={"field": "name"})
    old = tenant.name
    tenant.name = name
    tenant.save(update_fields=["name"])
    record(actor, "tenant.update", tenant=tenant, target=tenant, details={"name": [old, name]})
    return tenant


@transaction.atomic
def change_plan(
    tenant: Tenant,
    *,
    actor: Actor,
    plan: Plan | None = None,
    seats: int | None = None,
    reason: str = "",
) -> Tenant:
    """Move a tenant to another plan and/or seat count (platform admins, billing).

    Seats must fit the plan and cover the current members. Quotas follow immediately;
    usage above a lowered limit stays, new reservations are refused until it drops.
    """
    tenant = _lock_tenant(tenant)
    new_plan = plan or tenant.plan
    new_seats = tenant.seats if seats is None else seats
    if problem := new_plan.seats_error(new_seats):
        raise InvalidInput(problem, details={"field": "seats"})
    members = tenant.memberships.count()
    if new_seats < members:
        raise SeatLimitReached(
            f"{tenant.slug} has {members} members; remove some before going to {new_seats} seats",
            details={"seats": new_seats, "members": members},
        )
    before = {"plan": tenant.plan.code, "seats": tenant.seats}
    tenant.plan, tenant.seats = new_plan, new_seats
    tenant.save(update_fields=["plan", "seats"])
    record(
        actor,
        "tenant.change_plan",
        tenant=tenant,
        target=tenant,
        details={"before": before, "after": {"plan": new_plan.code, "seats": new_seats}}
        | ({"reason": reason} if reason else {}),
    )
    return tenant


@transaction.atomic
def suspend_tenant(tenant: Tenant, *, reason: str, actor: Actor) -> Tenant:
    """Stop a tenant from acting (reads still work). Idempotent; the reason is required."""
    if not reason.strip():
        raise InvalidInput("a reason is required to suspend a tenant", details={"field": "reason"})
    tenant = _lock_tenant(tenant)
    tenant.status, tenant.status_reason = TenantStatus.SUSPENDED, reason.strip()
    tenant.save(update_fields=["status", "status_reason"])
    record(actor, "tenant.suspend", tenant=tenant, target=tenant, details={"reason": reason})
    return tenant


@transaction.atomic
def reactivate_tenant(tenant: Tenant, *, reason: str, actor: Actor) -> Tenant:
    if not reason.strip():
        raise InvalidInput(
            "a reason is required to reactivate a tenant", details={"field": "reason"}
        )
    tenant = _lock_tenant(tenant)
    tenant.status, tenant.status_reason = TenantStatus.ACTIVE, ""
    tenant.save(update_fields=["status", "status_reason"])
    record(actor, "tenant.reactivate", tenant=tenant, target=tenant, details={"reason": reason})
    return tenant


# --------------------------------------------------------------------------- members


@transaction.atomic
def change_role(
    membership: Membership, role: str, *, actor: Actor, actor_role: str | None
) -> Membership:
    """Give a member another role. Only owners touch owners; the last owner stays owner.

    ``actor_role`` is the acting member's role (None for platform admins and the system).
    """
    _validate_role(role)
    tenant = _lock_tenant(membership.tenant)
    ensure_active(tenant)
    membership = Membership.objects.select_for_update().get(pk=membership.pk)
    if actor_role is not None and (
        Role.OWNER in (role, membership.role) and actor_role != Role.OWNER
    ):
        raise PermissionDenied("only owners can grant or take the owner role")
    if membership.role == Role.OWNER and role != Role.OWNER:
        _ensure_other_owner(tenant, membership)
    before = membership.role
    membership.role = role
    membership.save(update_fields=["role"])
    record(
        actor,
        "member.change_role",
        tenant=tenant,
        target=membership,
        details={"user": membership.user.email, "role": [before, role]},
    )
    return membership


def _ensure_other_owner(tenant: Tenant, membership: Membership) -> None:
    if not tenant.memberships.filter(role=Role.OWNER).exclude(pk=membership.pk).exists():
        raise LastOwner(
            f"{membership.user.email} is the last owner of {tenant.slug}; make someone else "
            "owner first",
            details={"user": membership.user.email},
        )


@transaction.atomic
def remove_member(membership: Membership, *, actor: Actor, actor_role: str | None) -> None:
    """Remove a member (and revoke their tokens in this tenant). Never the last owner."""
    tenant = _lock_tenant(membership.tenant)
    ensure_active(tenant)
    membership = Membership.objects.select_for_update().get(pk=membership.pk)
    if membership.role == Role.OWNER:
        if actor_role is not None and actor_role != Role.OWNER:
            raise PermissionDenied("only owners can remove an owner")
        _ensure_other_owner(tenant, membership)
    revoked = APIToken.objects.filter(
        tenant=tenant, user=membership.user, revoked_at__isnull=True
    ).update(revoked_at=timezone.now())
    record(
        actor,
        "member.remove",
        tenant=tenant,
        target=membership,
        details={"user": membership.user.email, "role": membership.role, "tokens_revoked": revoked},
    )
    membership.delete()


# --------------------------------------------------------------------------- invitations


def invitation_ttl() -> timedelta:
    return timedelta(hours=getattr(settings, "BERTH_INVITATION_TTL_HOURS", 7 * 24))


@transaction.atomic
def invite_member(
    tenant: Tenant, email: str, role: str, *, actor: Actor, actor_role: str | None
) -> tuple[Invitation, str]:
    """Invite ``email`` with ``role``; emails a one-time key and returns (invitation, key).

    Refused when the email is already a member, has an open invitation, or when members
    plus open invitations already fill the paid seats.
    """
    email = normalize_email(email)
    _validate_role(role)
    tenant = _lock_tenant(tenant)
    ensure_active(tenant)
    if actor_role is not None and role not in perms.ASSIGNABLE_ROLES.get(actor_role, frozenset()):
        raise PermissionDenied(f"a {actor_role} cannot invite with role {role!r}")
    if tenant.memberships.filter(user__email__iexact=email).exists():
        raise AlreadyMember(
            f"{email} is already a member of {tenant.slug}", details={"email": email}
        )
    now = timezone.now()
    open_invites = Invitation.objects.filter(
        tenant=tenant, email=email, accepted_at__isnull=True, revoked_at__isnull=True
    )
    # An expired invitation no longer blocks a new one: retire it.
    open_invites.filter(expires_at__lte=now).update(revoked_at=now)
    if open_invites.exists():
        raise AlreadyMember(
            f"{email} already has an open invitation to {tenant.slug}",
            details={"email": email, "reason": "invitation_pending"},
        )
    members, pending = tenant.memberships.count(), _pending_invitations(tenant)
    if members + pending >= tenant.seats:
        raise SeatLimitReached(
            f"{tenant.slug} has {tenant.seats} paid seat(s), all taken by {members} member(s) "
            f"and {pending} open invitation(s); buy more seats first",
            details={"seats": tenant.seats, "members": members, "pending_invitations": pending},
        )
    key = INVITATION_KEY_PREFIX + secrets.token_urlsafe(32)
    invitation = Invitation.objects.create(
        tenant=tenant,
        email=email,
        role=role,
        key_hash=hash_secret(key),
        invited_by=actor.user,
        expires_at=now + invitation_ttl(),
    )
    record(
        actor,
        "invitation.create",
        tenant=tenant,
        target=invitation,
        details={"email": email, "role": role},
    )
    transaction.on_commit(lambda: _send_invitation_email(invitation, key))
    return invitation, key


def _send_invitation_email(invitation: Invitation, key: str) -> None:
    base = settings.BERTH_PUBLIC_URL.rstrip("/")
    send_mail(
        subject=f"You are invited to {invitation.tenant.name} on Berth",
        message=(
            f"You have been invited to join {invitation.tenant.name} ({invitation.tenant.slug}) "
            f"on Berth as {invitation.role}.\n\n"
            f"Your invitation key (valid until {invitation.expires_at:%Y-%m-%d %H:%M} UTC, "
            f"usable once):\n\n    {key}\n\n"
            f"Accept it with:\n\n    curl -X POST {base}/api/v1/invitations/accept/ "
            f"-H 'Content-Type: application/json' "
            f'-d \'{{"key": "{key}", "password": "<choose one>"}}\'\n'
        ),
        from_email=settings.DEFAULT_FROM_EMAIL,
        recipient_list=[invitation.email],
    )


def find_invitation(key: str) -> Invitation:
    """The invitation for ``key`` whatever its state, or :class:`InvitationInvalid`."""
    invitation = (
        Invitation.objects.select_related("tenant").filter(key_hash=hash_secret(key or "")).first()
    )
    if invitation is None:
        raise InvitationInvalid("unknown invitation key", details={"state": "unknown"})
    return invitation


@transaction.atomic
def accept_invitation(key: str, user: User, *, actor: Actor) -> Membership:
    """Make ``user`` a member through the invitation ``key``. Works once.

    The user's email must be the invited one; the tenant must still have a free seat.
    """
    invitation = find_invitation(key)
    # Lock order everywhere: tenant row first, then its invitations.
    tenant = _lock_tenant(invitation.tenant)
    invitation = Invitation.objects.select_for_update().get(pk=invitation.pk)
    if invitation.state != "pending":
        raise InvitationInvalid(
            f"this invitation is {invitation.state}", details={"state": invitation.state}
        )
    if user.email.lower() != invitation.email.lower():
        raise PermissionDenied(
            "this invitation was sent to another email address",
            details={"invited": invitation.email},
        )
    ensure_active(tenant)
    if tenant.memberships.filter(user=user).exists():
        raise AlreadyMember(f"{user.email} is already a member of {tenant.slug}")
    members = tenant.memberships.count()
    if members >= tenant.seats:
        raise SeatLimitReached(
            f"{tenant.slug} has no free seat ({members} members, {tenant.seats} seats)",
            details={"seats": tenant.seats, "members": members},
        )
    membership = Membership.objects.create(tenant=tenant, user=user, role=invitation.role)
    invitation.accepted_at, invitation.accepted_by = timezone.now(), user
    invitation.save(update_fields=["accepted_at", "accepted_by"])
    record(
        actor,
        "invitation.accept",
        tenant=tenant,
        target=invitation,
        details={"email": user.email, "role": invitation.role},
    )
    return membership


@transaction.atomic
def revoke_invitation(invitation: Invitation, *, actor: Actor) -> Invitation:
    _lock_tenant(invitation.tenant)
    invitation = Invitation.objects.select_for_update().get(pk=invitation.pk)
    if invitation.state != "pending":
        raise InvitationInvalid(
            f"this invitation is already {invitation.state}", details={"state": invitation.state}
        )
    invitation.revoked_at = timezone.now()
    invitation.save(update_fields=["revoked_at"])
    record(
        actor,
        "invitation.revoke",
        tenant=invitation.tenant,
        target=invitation,
        details={"email": invitation.email},
    )
    return invitation


# --------------------------------------------------------------------------- API tokens


@transaction.atomic
def create_api_token(
    tenant: Tenant,
    user: User,
    *,
    name: str,
    scope: str,
    actor: Actor,
    expires_at: datetime | None = None,
) -> tuple[APIToken, str]:
    """Mint a token for ``user`` in ``tenant``; returns (row, secret). The secret is not kept.

    The scope may not exceed what the user's role allows (:data:`perms.MAX_TOKEN_SCOPE`).
    A token made with a token (``actor.token``) is bounded by its parent too: at most the
    parent's scope and never outliving it (no expiry given: the parent's), so a leaked
    write token cannot mint an admin token or an everlasting one.
    """
    if scope not in Scope.values:
        raise InvalidInput(
            f"unknown scope {scope!r}", details={"field": "scope", "allowed": list(Scope.values)}
        )
    if not name.strip():
        raise InvalidInput("name must not be empty", details={"field": "name"})
    if expires_at is not None and expires_at <= timezone.now():
        raise InvalidInput("expires_at must be in the future", details={"field": "expires_at"})
    tenant = _lock_tenant(tenant)
    ensure_active(tenant)
    role = role_of(tenant, user)
    if role is None:
        raise PermissionDenied(f"{user.email} is not a member of {tenant.slug}")
    if SCOPE_LEVEL[scope] > SCOPE_LEVEL[perms.MAX_TOKEN_SCOPE[role]]:
        raise PermissionDenied(
            f"a {role} can create tokens up to scope {perms.MAX_TOKEN_SCOPE[role]!r}",
            details={"scope": scope, "role": role},
        )
    parent = actor.token
    if parent is not None:
        if SCOPE_LEVEL[scope] > SCOPE_LEVEL[parent.scope]:
            raise PermissionDenied(
                f"a {parent.scope} token can create tokens up to scope {parent.scope!r}",
                details={"scope": scope, "token_scope": parent.scope},
            )
        if parent.expires_at is not None:
            if expires_at is None:
                expires_at = parent.expires_at
            elif expires_at > parent.expires_at:
                raise PermissionDenied(
                    "a token cannot create a token that outlives it",
                    details={
                        "field": "expires_at",
                        "token_expires_at": parent.expires_at.isoformat(),
                    },
                )
    prefix = TOKEN_PREFIX + "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(8))
    secret = f"{prefix}_{secrets.token_urlsafe(32)}"
    token = APIToken.objects.create(
        tenant=tenant,
        user=user,
        name=name.strip()[:100],
        prefix=prefix,
        token_hash=hash_secret(secret),
        scope=scope,
        expires_at=expires_at,
    )
    record(
        actor,
        "token.create",
        tenant=tenant,
        target=token,
        details={"name": token.name, "scope": scope, "user": user.email},
    )
    return token, secret


@transaction.atomic
def revoke_api_token(token: APIToken, *, actor: Actor) -> APIToken:
    """Revoke a token; it fails authentication from now on. Idempotent."""
    updated = APIToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    token.refresh_from_db()
    if updated:
        record(
            actor, "token.revoke", tenant=token.tenant, target=token, details={"name": token.name}
        )
    return token


def touch_token(token: APIToken, ip: str | None) -> None:
    """Note the token's last use, at most once a minute (one conditional UPDATE)."""
    now = timezone.now()
    fresh = now - timedelta(seconds=60)
    updated = (
        APIToken.objects.filter(pk=token.pk)
        .exclude(last_used_at__gt=fresh)
        .update(last_used_at=now, last_used_ip=ip)
    )
    if updated:
        token.last_used_at, token.last_used_ip = now, ip


# --------------------------------------------------------------------------- quotas


@transaction.atomic
def set_quota_override(
    tenant: Tenant, quota: str, value: int | None, *, actor: Actor, reason: str = ""
) -> QuotaOverride | None:
    """Set (or, with ``value=None``, remove) a platform admin's adjustment of one quota."""
    if quota not in QUOTA_NAMES:
        raise InvalidInput(
            f"unknown quota {quota!r}", details={"field": "quota", "allowed": list(QUOTA_NAMES)}
        )
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidInput("override must be an integer", details={"field": quota})
    tenant = _lock_tenant(tenant)
    before = QuotaOverride.objects.filter(tenant=tenant, quota=quota).first()
    old = before.value if before else None
    override: QuotaOverride | None = None
    if value is None:
        QuotaOverride.objects.filter(tenant=tenant, quota=quota).delete()
    else:
        override, _ = QuotaOverride.objects.update_or_create(
            tenant=tenant,
            quota=quota,
            defaults={"value": value, "reason": reason[:500], "updated_at": timezone.now()},
        )
    record(
        actor,
        "quota.override",
        tenant=tenant,
        target=tenant,
        details={"quota": quota, "override": [old, value]} | ({"reason": reason} if reason else {}),
    )
    return override


def quota_report(tenant: Tenant) -> list[dict[str, Any]]:
    """Every quota of the tenant: per-seat, seats, override, limit, used, available."""
    tenant = Tenant.objects.select_related("plan").get(pk=tenant.pk)
    overrides = tenant.overrides()
    limits = tenant.plan.limits(tenant.seats, overrides)
    used = dict(QuotaUsage.objects.filter(tenant=tenant).values_list("quota", "used"))
    per_seat = tenant.plan.per_seat()
    rows = []
    for name in QUOTA_NAMES:
        per_container = name in PER_CONTAINER_QUOTAS
        in_use = 0 if per_container else int(used.get(name, 0))
        rows.append(
            {
                "quota": name,
                "per_seat": per_seat[name],
                "seats": tenant.seats,
                "override": overrides.get(name, 0),
                "limit": limits[name],
                "used": in_use,
                "available": max(0, limits[name] - in_use),
                "per_container": per_container,
            }
        )
    return rows


def _validate_amounts(amounts: Mapping[str, int]) -> dict[str, int]:
    if not amounts:
        raise InvalidInput("nothing to reserve", details={"amounts": {}})
    clean: dict[str, int] = {}
    for name, amount in amounts.items():
        if name not in QUOTA_NAMES:
            raise InvalidInput(
                f"unknown quota {name!r}", details={"quota": name, "allowed": list(QUOTA_NAMES)}
            )
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise InvalidInput(
                f"amount of {name} must be a non-negative integer, got {amount!r}",
                details={"quota": name},
            )
        clean[name] = amount
    return clean


def _lock_usage_rows(tenant_id: int, quotas: Mapping[str, int]) -> dict[str, QuotaUsage]:
    """Lock the tenant's usage rows of ``quotas`` (in name order: no deadlocks between
    callers), creating missing ones first."""

    def locked() -> dict[str, QuotaUsage]:
        return {
            row.quota: row
            for row in QuotaUsage.objects.select_for_update()
            .filter(tenant_id=tenant_id, quota__in=sorted(quotas))
            .order_by("quota")
        }

    rows = locked()
    if len(rows) < len(quotas):
        QuotaUsage.objects.bulk_create(
            [QuotaUsage(tenant_id=tenant_id, quota=q) for q in quotas if q not in rows],
            ignore_conflicts=True,
        )
        rows = locked()
    return rows


def _per_quota(amounts: Mapping[str, int]) -> Case:
    """An SQL expression worth ``amounts[quota]`` on each usage row (one UPDATE for all)."""
    return Case(
        *[When(quota=name, then=Value(amount)) for name, amount in amounts.items()],
        default=Value(0),
        output_field=BigIntegerField(),
    )


@transaction.atomic
def reserve(
    tenant: Tenant, amounts: Mapping[str, int], *, actor: Actor, reason: str
) -> QuotaReservation:
    """Take ``amounts`` ({quota: amount}) from the tenant's quotas, all or nothing.

    Pooled quotas are locked (``SELECT … FOR UPDATE`` on their usage rows, in name order so
    concurrent callers never deadlock), checked against the effective limit and increased.
    Per-container caps (``blkio_bps``) are only checked. Raises :class:`QuotaExceeded` for
    the first quota that would overshoot, :class:`TenantSuspended` for a suspended tenant;
    nothing is taken then. Give the result back with :func:`release`.
    """
    clean = _validate_amounts(amounts)
    pooled = {q: a for q, a in clean.items() if q not in PER_CONTAINER_QUOTAS and a > 0}
    rows = _lock_usage_rows(tenant.pk, pooled) if pooled else {}
    # Read the tenant after taking the locks so a plan change committed meanwhile counts.
    fresh = Tenant.objects.select_related("plan").get(pk=tenant.pk)
    ensure_active(fresh)
    limits = fresh.quota_limits()
    for name in QUOTA_NAMES:
        if name not in clean:
            continue
        amount = clean[name]
        if name in PER_CONTAINER_QUOTAS:
            if amount > limits[name]:
                raise QuotaExceeded(name, limits[name], 0, amount)
        elif amount and rows[name].used + amount > limits[name]:
            raise QuotaExceeded(name, limits[name], rows[name].used, amount)
    if pooled:
        QuotaUsage.objects.filter(pk__in=[rows[q].pk for q in pooled]).update(
            used=F("used") + _per_quota(pooled), updated_at=timezone.now()
        )
    reservation = QuotaReservation.objects.create(
        tenant_id=tenant.pk, amounts=pooled, reason=reason[:200]
    )
    record(
        actor,
        "quota.reserve",
        tenant=fresh,
        target=reservation,
        details={"amounts": clean, "reason": reason},
    )
    return reservation


@transaction.atomic
def release(
    reservation: QuotaReservation | uuid.UUID | str, *, actor: Actor, reason: str = ""
) -> bool:
    """Give a reservation back. Exactly once: returns True the first time, False after.

    Safe to call from retried tasks: the ``released_at IS NULL`` guard is a single
    conditional UPDATE, so two concurrent calls cannot both decrement usage.
    """
    pk = reservation.pk if isinstance(reservation, QuotaReservation) else reservation
    now = timezone.now()
    if not QuotaReservation.objects.filter(pk=pk, released_at__isnull=True).update(released_at=now):
        if not QuotaReservation.objects.filter(pk=pk).exists():
            raise NotFound(f"no quota reservation {pk}")
        return False
    held = QuotaReservation.objects.select_related("tenant").get(pk=pk)
    amounts = {name: int(amount) for name, amount in held.amounts.items()}
    if amounts:
        # Lock in name order first, as reserve does: a multi-row UPDATE alone would lock
        # in scan order and deadlock against concurrent reservations.
        rows = _lock_usage_rows(held.tenant_id, amounts)
        QuotaUsage.objects.filter(pk__in=[row.pk for row in rows.values()]).update(
            # Never below zero: a monthly quota may have been reset since the reservation.
            used=Greatest(F("used") - _per_quota(amounts), Value(0)),
            updated_at=now,
        )
    record(
        actor,
        "quota.release",
        tenant=held.tenant,
        target=held,
        details={"amounts": held.amounts, "reason": reason or held.reason},
    )
    return True


@transaction.atomic
def reset_usage(tenant: Tenant, quota: str, *, actor: Actor) -> None:
    """Zero a monthly quota's usage (``build_minutes_month``) at the start of a period.

    Open reservations of that quota stay open; releasing them later cannot go below zero.
    """
    if quota not in QUOTA_NAMES:
        raise InvalidInput(f"unknown quota {quota!r}")
    updated = QuotaUsage.objects.filter(tenant=tenant, quota=quota).update(
        used=0, updated_at=timezone.now()
    )
    record(
        actor,
        "quota.reset",
        tenant=tenant,
        target=tenant,
        details={"quota": quota, "rows": updated},
    )


@transaction.atomic
def accept_invitation_with_password(
    key: str, password: str | None, *, ip: str | None
) -> tuple[Membership, bool]:
    """Accept an invitation without a session: returns (membership, account_created).

    When the invited email has no account yet, one is created with ``password`` (checked by
    Django's password validators); otherwise ``password`` must be that account's. Creating
    the account and joining happen in one transaction: a refusal leaves no account behind.
    """
    invitation = find_invitation(key)
    if invitation.state != "pending":
        raise InvitationInvalid(
            f"this invitation is {invitation.state}", details={"state": invitation.state}
        )
    user = User.objects.filter(email__iexact=invitation.email).first()
    created = False
    if user is not None:
        if not password or not user.check_password(password):
            raise PermissionDenied(
                f"{invitation.email} already has an account: log in, or give its password",
                details={"field": "password"},
            )
    else:
        if not password:
            raise InvalidInput(
                "choose a password for the new account", details={"field": "password"}
            )
        candidate = User(username=invitation.email, email=invitation.email)
        try:
            validate_password(password, candidate)
        except ValidationError as exc:
            raise InvalidInput(
                " ".join(exc.messages), details={"field": "password", "problems": exc.messages}
            ) from None
        user, created = get_or_create_user(invitation.email, password=password)
    membership = accept_invitation(key, user, actor=Actor(user=user, ip=ip))
    return membership, created


@transaction.atomic
def set_quota_overrides(
    tenant: Tenant, overrides: Mapping[str, int | None], *, actor: Actor, reason: str = ""
) -> None:
    """Set several overrides at once, all or nothing (see :func:`set_quota_override`)."""
    for quota in sorted(overrides):
        set_quota_override(tenant, quota, overrides[quota], actor=actor, reason=reason)
