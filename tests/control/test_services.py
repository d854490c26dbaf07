"""Services: tenants, members, invitations, tokens, suspension, quotas, audit."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core import mail
from django.utils import timezone

from billing.models import Plan
from tenants import services
from tenants.choices import Role, Scope, TenantStatus
from tenants.errors import (
    AlreadyMember,
    InvalidInput,
    InvitationInvalid,
    LastOwner,
    PermissionDenied,
    QuotaExceeded,
    SeatLimitReached,
    TenantSuspended,
)
from tenants.models import (
    APIToken,
    AuditLog,
    Invitation,
    Membership,
    QuotaReservation,
    QuotaUsage,
    Tenant,
    User,
)
from tests.control.conftest import SYSTEM

pytestmark = pytest.mark.django_db


def used(tenant: Tenant, quota: str) -> int:
    return QuotaUsage.objects.get(tenant=tenant, quota=quota).used


# ------------------------------------------------------------------ tenants


def test_create_tenant_makes_owner_usage_rows_and_audit(make_tenant) -> None:
    tenant, owner = make_tenant("blue", plan="pro", seats=2, owner="Boss@Blue.Example")
    assert owner.email == "boss@blue.example" and owner.username == owner.email
    assert Membership.objects.get(tenant=tenant).role == Role.OWNER
    assert (
        tenant.quota_limits()["cpu_millicores"] == 2 * Plan.objects.get(code="pro").cpu_millicores
    )
    assert QuotaUsage.objects.filter(tenant=tenant).count() == 8  # all but per-container caps
    entry = AuditLog.objects.get(tenant=tenant, action="tenant.create")
    assert entry.actor_label == "system:tests"
    assert entry.details == {"plan": "pro", "seats": 2, "owner": "boss@blue.example"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slug": "Bad Slug"}, "invalid slug"),
        ({"slug": "-lead"}, "invalid slug"),
        ({"slug": "x" * 64}, "invalid slug"),
        ({"owner_email": "not-an-email"}, "not a valid email"),
        ({"plan_code": "platinum"}, "unknown plan"),
        ({"plan_code": "team", "seats": 1}, "at least 2"),
        ({"plan_code": "free", "seats": 2}, "at most 1"),
    ],
)
def test_create_tenant_bad_input_writes_nothing(plans, kwargs, message) -> None:
    args = {"slug": "ok", "owner_email": "a@b.example", "actor": SYSTEM} | kwargs
    with pytest.raises(InvalidInput, match=message):
        services.create_tenant(**args)
    assert not Tenant.objects.exists()
    assert not User.objects.exists()
    # Nothing audited for this tenant or its owner. (Platform-wide rows that other
    # processes of the suite commit meanwhile — node joins, live-server requests — are
    # not this call's writes.)
    assert not AuditLog.objects.filter(tenant_slug=args["slug"]).exists()
    assert not AuditLog.objects.filter(action__startswith="tenant.").exists()


def test_duplicate_slug_is_refused(make_tenant) -> None:
    make_tenant("dup")
    with pytest.raises(InvalidInput, match="taken"):
        make_tenant("dup", owner="other@x.example")
    assert not User.objects.filter(email="other@x.example").exists()


def test_change_plan_checks_seat_range_and_members(make_tenant, add_member) -> None:
    tenant, _ = make_tenant("grow", plan="team", seats=3)
    add_member(tenant, Role.DEVELOPER)
    add_member(tenant, Role.VIEWER)
    with pytest.raises(SeatLimitReached):
        services.change_plan(tenant, seats=2, actor=SYSTEM)
    business = Plan.objects.get(code="business")
    tenant = services.change_plan(tenant, plan=business, seats=10, actor=SYSTEM, reason="upsell")
    assert tenant.quota_limits()["gpus"] == 10 * business.gpus
    entry = AuditLog.objects.filter(action="tenant.change_plan").get()
    assert entry.details["before"] == {"plan": "team", "seats": 3}
    assert entry.details["reason"] == "upsell"


# ------------------------------------------------------------------ members & roles


def test_last_owner_can_be_neither_demoted_nor_removed(acme) -> None:
    tenant, owner = acme
    membership = Membership.objects.get(tenant=tenant, user=owner)
    with pytest.raises(LastOwner):
        services.change_role(membership, Role.ADMIN, actor=SYSTEM, actor_role=None)
    with pytest.raises(LastOwner):
        services.remove_member(membership, actor=SYSTEM, actor_role=None)
    assert Membership.objects.get(pk=membership.pk).role == Role.OWNER


def test_second_owner_allows_demoting_first(acme, add_member) -> None:
    tenant, owner = acme
    add_member(tenant, Role.OWNER, "second@acme.example")
    first = Membership.objects.get(tenant=tenant, user=owner)
    services.change_role(first, Role.ADMIN, actor=SYSTEM, actor_role=Role.OWNER)
    assert Membership.objects.get(pk=first.pk).role == Role.ADMIN


def test_admins_cannot_touch_owners(acme, add_member) -> None:
    tenant, owner = acme
    add_member(tenant, Role.ADMIN)
    dev = add_member(tenant, Role.DEVELOPER)
    dev_membership = Membership.objects.get(tenant=tenant, user=dev)
    with pytest.raises(PermissionDenied):
        services.change_role(dev_membership, Role.OWNER, actor=SYSTEM, actor_role=Role.ADMIN)
    owner_membership = Membership.objects.get(tenant=tenant, user=owner)
    with pytest.raises(PermissionDenied):
        services.remove_member(owner_membership, actor=SYSTEM, actor_role=Role.ADMIN)


def test_removing_a_member_revokes_their_tokens(acme, add_member, make_token) -> None:
    tenant, _ = acme
    dev = add_member(tenant, Role.DEVELOPER)
    make_token(tenant, dev, Scope.WRITE)
    services.remove_member(
        Membership.objects.get(tenant=tenant, user=dev), actor=SYSTEM, actor_role=Role.OWNER
    )
    assert APIToken.objects.get(user=dev).state == "revoked"
    assert AuditLog.objects.get(action="member.remove").details["tokens_revoked"] == 1


# ------------------------------------------------------------------ invitations


def test_invitation_is_emailed_hashed_and_accepted_once(
    acme, django_capture_on_commit_callbacks
) -> None:
    tenant, owner = acme
    with django_capture_on_commit_callbacks(execute=True):
        invitation, key = services.invite_member(
            tenant,
            "New@Dev.Example",
            Role.DEVELOPER,
            actor=services.Actor(user=owner),
            actor_role=Role.OWNER,
        )
    assert len(mail.outbox) == 1 and key in mail.outbox[0].body
    assert mail.outbox[0].to == ["new@dev.example"]
    assert key not in invitation.key_hash and len(invitation.key_hash) == 64
    user, _ = services.get_or_create_user("new@dev.example", password="x-very-long-pass")
    membership = services.accept_invitation(key, user, actor=services.Actor(user=user))
    assert membership.role == Role.DEVELOPER
    with pytest.raises(InvitationInvalid) as exc:
        services.accept_invitation(key, user, actor=services.Actor(user=user))
    assert exc.value.details == {"state": "accepted"}
    assert Membership.objects.filter(tenant=tenant).count() == 2


def test_accept_needs_the_invited_email(acme) -> None:
    tenant, _ = acme
    _, key = services.invite_member(
        tenant, "a@x.example", Role.VIEWER, actor=SYSTEM, actor_role=None
    )
    intruder, _ = services.get_or_create_user("b@x.example")
    with pytest.raises(PermissionDenied):
        services.accept_invitation(key, intruder, actor=SYSTEM)
    assert not Membership.objects.filter(user=intruder).exists()


def test_expired_and_revoked_invitations_are_refused(acme) -> None:
    tenant, _ = acme
    inv, key = services.invite_member(
        tenant, "late@x.example", Role.VIEWER, actor=SYSTEM, actor_role=None
    )
    Invitation.objects.filter(pk=inv.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    user, _ = services.get_or_create_user("late@x.example")
    with pytest.raises(InvitationInvalid, match="expired"):
        services.accept_invitation(key, user, actor=SYSTEM)
    # An expired invitation does not block a new one; a revoked one cannot be used.
    inv2, key2 = services.invite_member(
        tenant, "late@x.example", Role.VIEWER, actor=SYSTEM, actor_role=None
    )
    services.revoke_invitation(inv2, actor=SYSTEM)
    with pytest.raises(InvitationInvalid, match="revoked"):
        services.accept_invitation(key2, user, actor=SYSTEM)
    with pytest.raises(InvitationInvalid):
        services.accept_invitation("inv_unknown", user, actor=SYSTEM)


def test_inviting_a_member_or_twice_is_refused(acme) -> None:
    tenant, owner = acme
    with pytest.raises(AlreadyMember):
        services.invite_member(
            tenant, owner.email.upper(), Role.VIEWER, actor=SYSTEM, actor_role=None
        )
    services.invite_member(tenant, "twice@x.example", Role.VIEWER, actor=SYSTEM, actor_role=None)
    with pytest.raises(AlreadyMember):
        services.invite_member(
            tenant, "twice@x.example", Role.VIEWER, actor=SYSTEM, actor_role=None
        )
    assert Invitation.objects.count() == 1


def test_members_beyond_paid_seats_are_refused(make_tenant, add_member) -> None:
    tenant, _ = make_tenant("small", plan="team", seats=3)
    add_member(tenant, Role.DEVELOPER)
    _, key = services.invite_member(
        tenant, "third@x.example", Role.VIEWER, actor=SYSTEM, actor_role=None
    )
    with pytest.raises(SeatLimitReached) as exc:
        services.invite_member(
            tenant, "fourth@x.example", Role.VIEWER, actor=SYSTEM, actor_role=None
        )
    assert exc.value.details == {"seats": 3, "members": 2, "pending_invitations": 1}
    # Seats are checked again on acceptance (they may have been filled meanwhile).
    add_member(tenant, Role.VIEWER, "sneaky@x.example")
    user, _ = services.get_or_create_user("third@x.example")
    with pytest.raises(SeatLimitReached):
        services.accept_invitation(key, user, actor=SYSTEM)
    assert Membership.objects.filter(tenant=tenant).count() == 3


def test_accept_with_password_creates_account_only_on_success(acme) -> None:
    tenant, _ = acme
    _, key = services.invite_member(
        tenant, "fresh@x.example", Role.VIEWER, actor=SYSTEM, actor_role=None
    )
    with pytest.raises(InvalidInput):
        services.accept_invitation_with_password(key, "short", ip="127.0.0.1")
    assert not User.objects.filter(email="fresh@x.example").exists()
    services.suspend_tenant(tenant, reason="unpaid", actor=SYSTEM)
    with pytest.raises(TenantSuspended):
        services.accept_invitation_with_password(key, "a-Long-enough-pass-42", ip="127.0.0.1")
    assert not User.objects.filter(email="fresh@x.example").exists()
    services.reactivate_tenant(tenant, reason="paid", actor=SYSTEM)
    membership, created = services.accept_invitation_with_password(
        key, "a-Long-enough-pass-42", ip="127.0.0.1"
    )
    assert created and membership.user.check_password("a-Long-enough-pass-42")
    assert AuditLog.objects.get(action="invitation.accept").ip == "127.0.0.1"


# ------------------------------------------------------------------ tokens


def test_token_scope_is_bounded_by_role(acme, add_member) -> None:
    tenant, _ = acme
    viewer = add_member(tenant, Role.VIEWER)
    with pytest.raises(PermissionDenied):
        services.create_api_token(tenant, viewer, name="x", scope=Scope.WRITE, actor=SYSTEM)
    token, secret = services.create_api_token(
        tenant, viewer, name="x", scope=Scope.READ, actor=SYSTEM
    )
    assert secret.startswith(token.prefix + "_") and len(token.prefix) == 12
    assert secret not in token.token_hash
    outsider, _ = services.get_or_create_user("out@x.example")
    with pytest.raises(PermissionDenied):
        services.create_api_token(tenant, outsider, name="x", scope=Scope.READ, actor=SYSTEM)


def test_token_expiry_in_the_past_is_refused(acme) -> None:
    tenant, owner = acme
    with pytest.raises(InvalidInput):
        services.create_api_token(
            tenant,
            owner,
            name="x",
            scope="read",
            actor=SYSTEM,
            expires_at=timezone.now() - timedelta(minutes=1),
        )
    with pytest.raises(InvalidInput):
        services.create_api_token(tenant, owner, name="x", scope="root", actor=SYSTEM)
    assert not APIToken.objects.exists()


# ------------------------------------------------------------------ suspension


def test_suspended_tenant_cannot_act(acme) -> None:
    tenant, owner = acme
    with pytest.raises(InvalidInput):
        services.suspend_tenant(tenant, reason=" ", actor=SYSTEM)
    services.suspend_tenant(tenant, reason="chargeback", actor=SYSTEM)
    tenant.refresh_from_db()
    assert tenant.status == TenantStatus.SUSPENDED and tenant.status_reason == "chargeback"
    with pytest.raises(TenantSuspended, match="chargeback"):
        services.reserve(tenant, {"containers": 1}, actor=SYSTEM, reason="run")
    with pytest.raises(TenantSuspended):
        services.invite_member(tenant, "x@y.example", Role.VIEWER, actor=SYSTEM, actor_role=None)
    with pytest.raises(TenantSuspended):
        services.create_api_token(tenant, owner, name="x", scope="read", actor=SYSTEM)
    assert used(tenant, "containers") == 0
    services.reactivate_tenant(tenant, reason="resolved", actor=SYSTEM)
    services.reserve(tenant, {"containers": 1}, actor=SYSTEM, reason="run")
    actions = list(AuditLog.objects.filter(tenant=tenant).values_list("action", flat=True))
    assert {"tenant.suspend", "tenant.reactivate"} <= set(actions)


# ------------------------------------------------------------------ quotas


def test_reserve_and_release_exactly_once(acme) -> None:
    tenant, _ = acme
    limit = tenant.quota_limits()["memory_mib"]
    r = services.reserve(
        tenant, {"memory_mib": limit - 1, "containers": 2}, actor=SYSTEM, reason="svc web"
    )
    assert used(tenant, "memory_mib") == limit - 1 and used(tenant, "containers") == 2
    assert services.release(r, actor=SYSTEM) is True
    assert services.release(str(r.pk), actor=SYSTEM) is False
    assert used(tenant, "memory_mib") == 0 and used(tenant, "containers") == 0
    assert QuotaReservation.objects.get(pk=r.pk).released_at is not None


def test_quota_exceeded_names_quota_limit_used_requested_and_takes_nothing(acme) -> None:
    tenant, _ = acme
    limit = tenant.quota_limits()["cpu_millicores"]
    services.reserve(tenant, {"cpu_millicores": limit - 500}, actor=SYSTEM, reason="a")
    with pytest.raises(QuotaExceeded) as exc:
        services.reserve(tenant, {"containers": 1, "cpu_millicores": 501}, actor=SYSTEM, reason="b")
    err = exc.value
    assert (err.quota, err.limit, err.used, err.requested) == (
        "cpu_millicores",
        limit,
        limit - 500,
        501,
    )
    assert err.details == {
        "quota": "cpu_millicores",
        "limit": limit,
        "used": limit - 500,
        "requested": 501,
    }
    assert used(tenant, "containers") == 0  # all or nothing
    assert QuotaReservation.objects.count() == 1


def test_per_container_cap_is_checked_not_accumulated(acme) -> None:
    tenant, _ = acme
    cap = tenant.quota_limits()["blkio_bps"]
    for _ in range(3):
        services.reserve(tenant, {"blkio_bps": cap}, actor=SYSTEM, reason="io")
    with pytest.raises(QuotaExceeded) as exc:
        services.reserve(tenant, {"blkio_bps": cap + 1}, actor=SYSTEM, reason="io")
    assert exc.value.used == 0


def test_overrides_raise_and_lower_limits(acme) -> None:
    tenant, _ = acme
    base = tenant.quota_limits()["gpus"]
    services.set_quota_override(tenant, "gpus", 2, actor=SYSTEM, reason="pilot")
    assert tenant.quota_limits()["gpus"] == base + 2
    services.reserve(tenant, {"gpus": base + 2}, actor=SYSTEM, reason="train")
    services.set_quota_override(tenant, "gpus", None, actor=SYSTEM)
    with pytest.raises(QuotaExceeded):
        services.reserve(tenant, {"gpus": 1}, actor=SYSTEM, reason="train")
    with pytest.raises(InvalidInput):
        services.set_quota_override(tenant, "bananas", 1, actor=SYSTEM)


@pytest.mark.parametrize(
    "amounts", [{}, {"bananas": 1}, {"containers": -1}, {"containers": 1.5}, {"containers": True}]
)
def test_reserve_bad_amounts_are_refused(acme, amounts) -> None:
    tenant, _ = acme
    with pytest.raises(InvalidInput):
        services.reserve(tenant, amounts, actor=SYSTEM, reason="x")
    assert not QuotaReservation.objects.exists()


def test_monthly_reset_and_late_release_never_go_negative(acme) -> None:
    tenant, _ = acme
    r = services.reserve(tenant, {"build_minutes_month": 30}, actor=SYSTEM, reason="build")
    services.reset_usage(tenant, "build_minutes_month", actor=SYSTEM)
    assert used(tenant, "build_minutes_month") == 0
    services.release(r, actor=SYSTEM)
    assert used(tenant, "build_minutes_month") == 0


def test_every_write_is_audited_with_actor_and_ip(acme, add_member) -> None:
    tenant, owner = acme
    token, _ = services.create_api_token(tenant, owner, name="ci", scope="admin", actor=SYSTEM)
    actor = services.Actor(user=owner, token=token, ip="203.0.113.9")
    services.invite_member(tenant, "z@x.example", Role.VIEWER, actor=actor, actor_role=Role.OWNER)
    entry = AuditLog.objects.get(action="invitation.create")
    assert entry.actor_user == owner and entry.actor_token == token
    assert entry.ip == "203.0.113.9" and entry.tenant == tenant
    assert entry.actor_label == f"{owner.email} via token {token.prefix}"
    assert entry.target_type == "invitation"
