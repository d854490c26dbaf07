"""Removing a member can also release the seat they freed (``?release_seat=true``): opt-in,
only for roles that may change billing, atomic with the removal, and Stripe's quantity
follows after the commit. Real Postgres, localstripe as Stripe."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from celery.exceptions import Retry
from rest_framework.test import APIClient

from billing import services
from billing.models import BillingAccount, PlanPrice, SeatLedgerEntry
from billing.tasks import sweep_billing_task, sync_subscription_task
from tenants import services as tenant_services
from tenants.choices import Role, Scope
from tenants.errors import PermissionDenied
from tenants.models import AuditLog, Membership, Tenant, User
from tests.control.billing_helpers import free_port, stripe_get, subscribe

pytest_plugins = ["tests.control.billing_support"]

ACTOR = tenant_services.Actor.for_system("tests")


def _url(tenant: Tenant, membership: Membership, query: str = "") -> str:
    return f"/api/v1/tenants/{tenant.slug}/members/{membership.pk}/{query}"


def _membership(tenant: Tenant, user: User) -> Membership:
    return Membership.objects.get(tenant=tenant, user=user)


def _stripe_quantity(localstripe: str, account: BillingAccount) -> int:
    sub = stripe_get(localstripe, f"/v1/subscriptions/{account.stripe_subscription_id}")
    return int(sub["quantity"])


@pytest.fixture
def subscribed(
    make_tenant: Callable[..., tuple[Tenant, User]],
    add_member: Callable[..., User],
    make_token: Callable[..., str],
    client_for: Callable[..., APIClient],
    stripe_plans: dict[str, PlanPrice],
    localstripe: str,
    deliver_stripe_events: Callable[..., list[str]],
    eager_celery: None,
) -> dict[str, Any]:
    """acme on Team with 4 paid seats in Stripe, 3 members (owner, developer, viewer)."""
    tenant, owner = make_tenant("acme", plan="free", seats=1)
    account = subscribe(tenant, "team", 4, localstripe, deliver_stripe_events)
    developer = add_member(tenant, Role.DEVELOPER)
    viewer = add_member(tenant, Role.VIEWER)
    tenant.refresh_from_db()
    assert tenant.seats == 4 and _stripe_quantity(localstripe, account) == 4
    return {
        "tenant": tenant,
        "account": account,
        "owner": client_for(make_token(tenant, owner, Scope.ADMIN)),
        "developer": developer,
        "viewer": viewer,
    }


def test_removal_with_release_drops_the_seat_and_the_stripe_quantity(
    subscribed: dict[str, Any],
    localstripe: str,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    tenant, account = subscribed["tenant"], subscribed["account"]
    viewer = _membership(tenant, subscribed["viewer"])

    with django_capture_on_commit_callbacks(execute=True):
        response = subscribed["owner"].delete(_url(tenant, viewer, "?release_seat=true"))

    assert response.status_code == 200, response.content
    assert response.json() == {"seat_released": True, "previous_seats": 4, "seats": 3}
    assert not Membership.objects.filter(pk=viewer.pk).exists()
    tenant.refresh_from_db()
    account.refresh_from_db()
    assert tenant.seats == 3
    assert tenant.quota_limits()["containers"] == 3 * tenant.plan.containers
    assert not account.sync_pending and account.synced_quantity == 3
    assert _stripe_quantity(localstripe, account) == 3  # what "Stripe" now bills
    ledger = SeatLedgerEntry.objects.filter(tenant=tenant).order_by("-id").first()
    assert ledger is not None
    assert (ledger.kind, ledger.previous_seats, ledger.seats) == ("seats_changed", 4, 3)
    assert ledger.note == "seat freed by removing viewer@acme.example"
    audit = list(
        AuditLog.objects.filter(tenant=tenant, action__in=["member.remove", "tenant.change_plan"])
        .order_by("id")
        .values_list("action", "details")
    )
    assert [action for action, _ in audit[-2:]] == ["member.remove", "tenant.change_plan"]
    assert audit[-2][1]["user"] == "viewer@acme.example"
    assert audit[-1][1]["after"] == {"plan": "team", "seats": 3}


def test_removal_without_the_flag_keeps_the_seats(
    subscribed: dict[str, Any],
    localstripe: str,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    tenant, account = subscribed["tenant"], subscribed["account"]
    ledger_before = SeatLedgerEntry.objects.filter(tenant=tenant).count()
    for query in ("", "?release_seat=false"):
        member = tenant.memberships.exclude(role=Role.OWNER).first()
        assert member is not None
        with django_capture_on_commit_callbacks(execute=True):
            response = subscribed["owner"].delete(_url(tenant, member, query))
        assert response.status_code == 204, response.content
        assert not Membership.objects.filter(pk=member.pk).exists()

    tenant.refresh_from_db()
    assert tenant.seats == 4
    assert SeatLedgerEntry.objects.filter(tenant=tenant).count() == ledger_before
    assert _stripe_quantity(localstripe, account) == 4


@pytest.mark.parametrize("value", ["maybe", "", "2"])
def test_bad_release_seat_values_are_refused(subscribed: dict[str, Any], value: str) -> None:
    tenant = subscribed["tenant"]
    viewer = _membership(tenant, subscribed["viewer"])

    response = subscribed["owner"].delete(_url(tenant, viewer, f"?release_seat={value}"))

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid" and "release_seat" in error["message"]
    assert Membership.objects.filter(pk=viewer.pk).exists()
    tenant.refresh_from_db()
    assert tenant.seats == 4


def test_a_developer_asking_for_release_is_refused_and_the_member_stays(
    subscribed: dict[str, Any],
) -> None:
    tenant = subscribed["tenant"]
    viewer = _membership(tenant, subscribed["viewer"])
    as_developer = APIClient()
    as_developer.force_login(subscribed["developer"])

    response = as_developer.delete(_url(tenant, viewer, "?release_seat=true"))

    assert response.status_code == 403, response.content
    assert "developer" in response.json()["error"]["message"]
    # The service refuses too, whatever the view checked (defence in depth).
    with pytest.raises(PermissionDenied, match="only owners, admins and billing members"):
        services.remove_member_releasing_seat(viewer, actor=ACTOR, actor_role=Role.DEVELOPER)
    assert Membership.objects.filter(pk=viewer.pk).exists()
    tenant.refresh_from_db()
    assert tenant.seats == 4
    assert not AuditLog.objects.filter(tenant=tenant, action="member.remove").exists()


def test_an_admin_may_release_the_seat(
    subscribed: dict[str, Any],
    add_member: Callable[..., User],
    make_token: Callable[..., str],
    client_for: Callable[..., APIClient],
) -> None:
    tenant = subscribed["tenant"]
    # 4 seats: owner, developer, viewer, admin — every seat taken.
    admin = client_for(make_token(tenant, add_member(tenant, Role.ADMIN), Scope.ADMIN))
    viewer = _membership(tenant, subscribed["viewer"])

    response = admin.delete(_url(tenant, viewer, "?release_seat=1"))

    assert response.status_code == 200, response.content
    assert response.json()["seats"] == 3


def test_never_below_the_plan_minimum_plus_comped_seats(
    subscribed: dict[str, Any],
    localstripe: str,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    tenant, account = subscribed["tenant"], subscribed["account"]
    services.comp_seats(tenant, 1, actor=ACTOR, reason="design partner")  # 5 seats, 4 paid
    owner = subscribed["owner"]
    viewer = _membership(tenant, subscribed["viewer"])
    developer = _membership(tenant, subscribed["developer"])

    with django_capture_on_commit_callbacks(execute=True):
        first = owner.delete(_url(tenant, viewer, "?release_seat=true"))
    assert first.json() == {"seat_released": True, "previous_seats": 5, "seats": 4}

    # Team needs 2 paid seats; with 1 comped the floor is 3, whatever the members.
    with django_capture_on_commit_callbacks(execute=True):
        second = owner.delete(_url(tenant, developer, "?release_seat=true"))
    assert second.json() == {"seat_released": True, "previous_seats": 4, "seats": 3}
    assert tenant.memberships.count() == 1

    extra = Membership.objects.create(
        tenant=tenant,
        user=tenant_services.get_or_create_user("late@acme.example")[0],
        role=Role.VIEWER,
    )
    with django_capture_on_commit_callbacks(execute=True):
        third = owner.delete(_url(tenant, extra, "?release_seat=true"))
    assert third.status_code == 200, third.content
    assert third.json() == {"seat_released": False, "previous_seats": 3, "seats": 3}
    assert not Membership.objects.filter(pk=extra.pk).exists()  # removed all the same
    tenant.refresh_from_db()
    account.refresh_from_db()
    assert tenant.seats == 3 and account.comp_seats == 1
    assert _stripe_quantity(localstripe, account) == 2  # paid seats = seats - comped


def test_a_refused_seat_change_keeps_the_member(
    subscribed: dict[str, Any], localstripe: str
) -> None:
    tenant, account = subscribed["tenant"], subscribed["account"]
    # Team × 4 allows 100 containers; × 3 would allow 75.
    tenant_services.reserve(tenant, {"containers": 80}, actor=ACTOR, reason="running services")
    viewer = _membership(tenant, subscribed["viewer"])

    response = subscribed["owner"].delete(_url(tenant, viewer, "?release_seat=true"))

    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "downgrade_blocked"
    assert Membership.objects.filter(pk=viewer.pk).exists()
    assert not AuditLog.objects.filter(tenant=tenant, action="member.remove").exists()
    tenant.refresh_from_db()
    account.refresh_from_db()
    assert tenant.seats == 4 and not account.sync_pending
    assert _stripe_quantity(localstripe, account) == 4


def test_a_stripe_outage_delays_the_quantity_but_loses_nothing(
    subscribed: dict[str, Any],
    localstripe: str,
    stripe_settings: Any,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    """Stripe is told after the commit (docs/billing.md, "Stripe outages"): an outage
    cannot undo the removal, and the seat change waits in ``sync_pending`` until Stripe
    is back, so Stripe ends up billing exactly the seats Berth holds."""
    tenant, account = subscribed["tenant"], subscribed["account"]
    viewer = _membership(tenant, subscribed["viewer"])
    stripe_settings.STRIPE_API_BASE = f"http://127.0.0.1:{free_port()}"  # Stripe is down

    response = subscribed["owner"].delete(_url(tenant, viewer, "?release_seat=true"))
    assert response.status_code == 200, response.content
    with pytest.raises(Retry):
        sync_subscription_task.apply(args=[tenant.pk])

    tenant.refresh_from_db()
    account.refresh_from_db()
    assert not Membership.objects.filter(pk=viewer.pk).exists()
    assert tenant.seats == 3 and account.sync_pending and account.sync_error
    stripe_settings.STRIPE_API_BASE = localstripe
    assert _stripe_quantity(localstripe, account) == 4  # not yet told

    with django_capture_on_commit_callbacks(execute=True):
        sweep_billing_task.apply()
    account.refresh_from_db()
    assert not account.sync_pending and account.synced_quantity == 3
    assert _stripe_quantity(localstripe, account) == 3


def test_another_tenants_member_is_404_and_untouched(
    subscribed: dict[str, Any], make_tenant: Callable[..., tuple[Tenant, User]]
) -> None:
    other, other_owner = make_tenant("globex", seats=3)
    theirs = _membership(other, other_owner)

    response = subscribed["owner"].delete(_url(other, theirs, "?release_seat=true"))
    assert response.status_code == 404
    response = subscribed["owner"].delete(
        f"/api/v1/tenants/acme/members/{theirs.pk}/?release_seat=true"
    )
    assert response.status_code == 404
    assert Membership.objects.filter(pk=theirs.pk).exists()
    other.refresh_from_db()
    assert other.seats == 3


def test_the_schema_documents_release_seat(client_for: Callable[..., APIClient]) -> None:
    schema = client_for().get("/api/v1/schema/?format=json").json()
    op = schema["paths"]["/api/v1/tenants/{tenant_slug}/members/{id}/"]["delete"]
    params = {p["name"]: p for p in op["parameters"] if p["in"] == "query"}
    assert params["release_seat"]["schema"]["type"] == "boolean"
    assert "owners, admins and billing members" in params["release_seat"]["description"]
    assert {"200", "204"} <= set(op["responses"])
