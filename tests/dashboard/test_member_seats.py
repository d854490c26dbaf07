"""The members page's remove form: the "also drop the freed seat" box, for roles that may
change billing, releasing the seat in localstripe too; without it the seats stay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from billing.models import PlanPrice, SeatLedgerEntry
from tenants import services as tenant_services
from tenants.choices import Role
from tenants.models import Membership, Tenant, User
from tests.control.billing_helpers import stripe_get, subscribe

pytest_plugins = ["tests.control.billing_support"]
pytestmark = pytest.mark.django_db

TenantMaker = Callable[..., tuple[Tenant, User]]
BOX = 'name="release_seat"'


def _remove(client: Client, tenant: Tenant, user: User, **data: str) -> str:
    membership = Membership.objects.get(tenant=tenant, user=user)
    page = client.post(f"/t/{tenant.slug}/members/{membership.pk}/remove/", data, follow=True)
    assert page.status_code == 200
    return str(page.content.decode())


def test_dropping_the_freed_seat_from_the_members_page(
    make_tenant: TenantMaker,
    member: Callable[..., User],
    login: Callable[[User], Client],
    stripe_plans: dict[str, PlanPrice],
    localstripe: str,
    deliver_stripe_events: Callable[..., list[str]],
    eager_celery: None,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    tenant, owner = make_tenant("acme", plan="free", seats=1)
    account = subscribe(tenant, "team", 4, localstripe, deliver_stripe_events)
    developer, viewer = member(tenant, Role.DEVELOPER), member(tenant, Role.VIEWER)
    as_owner = login(owner)

    page = as_owner.get("/t/acme/members/").content.decode()
    assert BOX in page and "also drop the freed seat (4 → 3 seats)" in page
    assert BOX not in login(developer).get("/t/acme/members/").content.decode()

    with django_capture_on_commit_callbacks(execute=True):
        page = _remove(as_owner, tenant, viewer, release_seat="on")
    assert "viewer@acme.example removed; seats 4 → 3." in page
    tenant.refresh_from_db()
    assert tenant.seats == 3
    sub = stripe_get(localstripe, f"/v1/subscriptions/{account.stripe_subscription_id}")
    assert sub["quantity"] == 3
    assert "(3 → 2 seats)" in page  # the next removal would reach Team's minimum of 2

    # Unticked: the member goes, the seats stay.
    with django_capture_on_commit_callbacks(execute=True):
        page = _remove(as_owner, tenant, developer)
    assert "developer@acme.example removed." in page
    tenant.refresh_from_db()
    assert tenant.seats == 3
    assert BOX in page  # 3 seats, 1 member: dropping one would still be allowed

    # At the plan minimum (2 paid seats for Team) no box is offered, and a forged one
    # removes the member without going below it.
    with django_capture_on_commit_callbacks(execute=True):
        _remove(as_owner, tenant, member(tenant, Role.VIEWER), release_seat="on")
    tenant.refresh_from_db()
    assert tenant.seats == 2
    late = member(tenant, Role.DEVELOPER)
    assert BOX not in as_owner.get("/t/acme/members/").content.decode()
    page = _remove(as_owner, tenant, late, release_seat="on")
    assert "seats stay at 2" in page
    tenant.refresh_from_db()
    assert tenant.seats == 2 and not tenant.memberships.filter(user=late).exists()
    assert list(SeatLedgerEntry.objects.filter(tenant=tenant).values_list("kind", "seats")) == [
        ("stripe", 4),
        ("seats_changed", 3),
        ("seats_changed", 2),
    ]


def test_a_refused_seat_release_keeps_the_member(
    make_tenant: TenantMaker, member: Callable[..., User], login: Callable[[User], Client]
) -> None:
    tenant, owner = make_tenant("acme", plan="team", seats=4)  # 100 containers; 3 seats: 75
    viewer = member(tenant, Role.VIEWER)
    tenant_services.reserve(
        tenant, {"containers": 80}, actor=tenant_services.Actor.for_system("t"), reason="busy"
    )

    page = _remove(login(owner), tenant, viewer, release_seat="on")

    assert "containers (in use 80 &gt; 75)" in page
    assert tenant.memberships.filter(user=viewer).exists()
    tenant.refresh_from_db()
    assert tenant.seats == 4
