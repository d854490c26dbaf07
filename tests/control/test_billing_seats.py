"""Seat and plan changes: validation, downgrades refused below usage, the append-only seat
ledger, quotas following every change, and concurrent seat changes on real Postgres."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection

from billing import services
from billing.models import SeatLedgerEntry
from tenants import services as tenant_services
from tenants.choices import Role
from tenants.errors import InvalidInput, QuotaExceeded, SeatLimitReached
from tenants.models import QuotaUsage, Tenant
from tests.control.conftest import seed_plans

pytest_plugins = ["tests.control.billing_support"]

ACTOR = tenant_services.Actor.for_system("tests")


@pytest.mark.parametrize("bad", [-1, 0, 10_001, True, "3", 2.5, None])
def test_absurd_seat_counts_are_refused(make_tenant: Callable[..., Any], bad: Any) -> None:
    tenant, _ = make_tenant("acme", plan="team", seats=5)
    with pytest.raises(InvalidInput) as err:
        services.change_seats(tenant, bad, actor=ACTOR)
    assert err.value.details["field"] == "seats"
    tenant.refresh_from_db()
    assert tenant.seats == 5 and not SeatLedgerEntry.objects.exists()


def test_seats_cannot_drop_below_members_or_plan_minimum(
    make_tenant: Callable[..., Any], add_member: Callable[..., Any]
) -> None:
    tenant, _ = make_tenant("acme", plan="team", seats=5)
    add_member(tenant, Role.DEVELOPER)
    add_member(tenant, Role.VIEWER)
    with pytest.raises(SeatLimitReached):
        services.change_seats(tenant, 2, actor=ACTOR)
    with pytest.raises(InvalidInput, match="at least 2"):
        services.change_seats(tenant, 1, actor=ACTOR)
    tenant = services.change_seats(tenant, 3, actor=ACTOR)
    assert tenant.seats == 3


def test_downgrade_below_usage_names_what_must_shrink(make_tenant: Callable[..., Any]) -> None:
    tenant, _ = make_tenant("acme", plan="team", seats=4)  # 100 containers, 400 GiB
    tenant_services.reserve(
        tenant, {"containers": 60, "storage_gib": 120}, actor=ACTOR, reason="running services"
    )

    with pytest.raises(services.DowngradeBlocked) as blocked:
        services.change_seats(tenant, 2, actor=ACTOR)
    assert blocked.value.status_code == 409
    assert blocked.value.details["must_shrink"] == [
        {
            "quota": "containers",
            "used": 60,
            "new_limit": 50,
            "shrink_by": 10,
            "unit": "running containers",
        }
    ]
    assert "containers (in use 60 > 50)" in blocked.value.message

    with pytest.raises(services.DowngradeBlocked) as blocked:
        services.change_plan(tenant, "free", seats=1, actor=ACTOR)
    shrink = {p["quota"]: p["shrink_by"] for p in blocked.value.details["must_shrink"]}
    assert shrink == {"containers": 57, "storage_gib": 115}
    tenant.refresh_from_db()
    assert (tenant.plan.code, tenant.seats) == ("team", 4)
    assert not SeatLedgerEntry.objects.exists()


def test_paid_plan_without_subscription_needs_checkout(make_tenant: Callable[..., Any]) -> None:
    tenant, _ = make_tenant("acme", plan="free", seats=1)
    with pytest.raises(services.CheckoutRequired):
        services.change_plan(tenant, "pro", seats=1, actor=ACTOR)
    # A platform admin may move a tenant without a subscription (comped).
    tenant = services.change_plan(tenant, "pro", seats=2, actor=ACTOR, without_subscription=True)
    assert (tenant.plan.code, tenant.seats) == ("pro", 2)
    assert tenant.quota_limits()["cpu_millicores"] == 2 * 4000


def test_ledger_records_every_change_and_is_append_only(make_tenant: Callable[..., Any]) -> None:
    tenant, _ = make_tenant("acme", plan="team", seats=2)
    services.change_seats(tenant, 6, actor=ACTOR)
    services.comp_seats(tenant, 2, actor=ACTOR, reason="design partner")
    services.change_plan(tenant, "business", seats=8, actor=ACTOR, without_subscription=True)
    rows = list(
        SeatLedgerEntry.objects.filter(tenant=tenant).values_list(
            "kind", "plan_code", "seats", "comp_seats", "previous_seats"
        )
    )
    assert rows == [
        ("seats_changed", "team", 6, 0, 2),
        ("comp", "team", 8, 2, 6),
        ("plan_changed", "business", 8, 2, 8),
    ]
    entry = SeatLedgerEntry.objects.first()
    assert entry is not None
    entry.seats = 99
    with pytest.raises(ValueError, match="append-only"):
        entry.save()
    with pytest.raises(ValueError, match="append-only"):
        entry.delete()
    account = services.account_for(tenant)
    assert services.billable_seats(Tenant.objects.get(pk=tenant.pk), account) == 6


def _race(worker: Callable[[int], Any], n: int) -> list[Any]:
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = worker(i)
        except Exception as exc:  # asserted by the test
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.mark.django_db(transaction=True)
def test_concurrent_seat_purchases_each_land_once() -> None:
    seed_plans()
    tenant, _ = tenant_services.create_tenant(
        slug="race", owner_email="o@race.example", plan_code="team", seats=2, actor=ACTOR
    )
    n = 12

    results = _race(
        lambda i: services.add_seat_for_invitation(tenant, actor=ACTOR, actor_role=Role.OWNER), n
    )

    assert [r for r in results if isinstance(r, Exception)] == []
    tenant.refresh_from_db()
    assert tenant.seats == 2 + n
    assert tenant.quota_limits()["containers"] == 25 * (2 + n)
    chain = list(
        SeatLedgerEntry.objects.filter(tenant=tenant).values_list("previous_seats", "seats")
    )
    assert chain == [(2 + i, 3 + i) for i in range(n)]  # serialised: no lost or double update


@pytest.mark.django_db(transaction=True)
def test_seat_reduction_racing_reservations_never_leaves_usage_above_quota() -> None:
    seed_plans()
    tenant, _ = tenant_services.create_tenant(
        slug="race", owner_email="o@race.example", plan_code="team", seats=4, actor=ACTOR
    )  # 100 containers; 2 seats would be 50
    tenant_services.reserve(tenant, {"containers": 40}, actor=ACTOR, reason="base")

    def work(i: int) -> Any:
        if i == 0:
            return services.change_seats(tenant, 2, actor=ACTOR)
        return tenant_services.reserve(tenant, {"containers": 5}, actor=ACTOR, reason=f"w{i}")

    results = _race(work, 9)

    unexpected = [
        r
        for r in results
        if isinstance(r, Exception) and not isinstance(r, QuotaExceeded | services.DowngradeBlocked)
    ]
    assert unexpected == []
    tenant.refresh_from_db()
    used = QuotaUsage.objects.get(tenant=tenant, quota="containers").used
    assert used <= tenant.quota_limits()["containers"]
    if tenant.seats == 2:  # the reduction won: later reservations were held to 50
        assert used <= 50
    else:
        assert isinstance(results[0], services.DowngradeBlocked)


def test_inviting_beyond_the_seats_buys_one_when_the_role_allows(
    make_tenant: Callable[..., Any], add_member: Callable[..., Any]
) -> None:
    tenant, _ = make_tenant("acme", plan="team", seats=2)
    add_member(tenant, Role.DEVELOPER)
    with pytest.raises(SeatLimitReached):
        tenant_services.invite_member(
            tenant, "new@acme.example", Role.DEVELOPER, actor=ACTOR, actor_role=Role.OWNER
        )
    with pytest.raises(tenant_services.PermissionDenied):
        services.add_seat_for_invitation(tenant, actor=ACTOR, actor_role=Role.DEVELOPER)

    services.add_seat_for_invitation(tenant, actor=ACTOR, actor_role=Role.OWNER)
    tenant_services.invite_member(
        tenant, "new@acme.example", Role.DEVELOPER, actor=ACTOR, actor_role=Role.OWNER
    )
    tenant.refresh_from_db()
    assert tenant.seats == 3
    entry = SeatLedgerEntry.objects.get(tenant=tenant)
    assert (entry.previous_seats, entry.seats, entry.note) == (2, 3, "seat bought for invitation")


def test_removing_a_member_releases_the_unused_seat(
    make_tenant: Callable[..., Any], add_member: Callable[..., Any]
) -> None:
    tenant, _ = make_tenant("acme", plan="team", seats=4)
    add_member(tenant, Role.DEVELOPER)
    viewer = add_member(tenant, Role.VIEWER)
    membership = tenant.memberships.get(user=viewer)
    tenant_services.remove_member(membership, actor=ACTOR, actor_role=Role.OWNER)

    tenant = services.release_seat_after_removal(tenant, actor=ACTOR)
    assert tenant.seats == 3
    tenant = services.release_seat_after_removal(tenant, actor=ACTOR)
    assert tenant.seats == 2  # two members left, and Team's minimum is 2
    tenant = services.release_seat_after_removal(tenant, actor=ACTOR)
    assert tenant.seats == 2
