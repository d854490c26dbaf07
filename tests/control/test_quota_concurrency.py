"""Quota admission under concurrency on real Postgres: threads, each with its own DB
connection, start together and race for one quota. Usage must never exceed the limit,
and releasing one reservation from many threads must give it back exactly once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection

from tenants import services
from tenants.errors import QuotaExceeded, SeatLimitReached
from tenants.models import Membership, QuotaUsage, Tenant
from tests.control.conftest import SYSTEM, seed_plans

pytestmark = pytest.mark.django_db(transaction=True)

THREADS = 24


def race(worker: Callable[[int], Any], n: int = THREADS) -> list[Any]:
    """Run ``worker(i)`` in n threads released together; return results or exceptions."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = worker(i)
        except Exception as exc:  # collected and asserted by the test
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


def make_racing_tenant(limit_overrides: dict[str, int]) -> Tenant:
    seed_plans()
    tenant, _ = services.create_tenant(
        slug="race", owner_email="o@race.example", plan_code="team", seats=2, actor=SYSTEM
    )
    base = tenant.quota_limits()
    for quota, wanted in limit_overrides.items():
        services.set_quota_override(tenant, quota, wanted - base[quota], actor=SYSTEM)
    assert {q: tenant.quota_limits()[q] for q in limit_overrides} == limit_overrides
    return tenant


def test_parallel_reservations_never_overshoot() -> None:
    tenant = make_racing_tenant({"containers": 10, "memory_mib": 1000})

    def reserve(i: int) -> Any:
        return services.reserve(
            tenant, {"containers": 1, "memory_mib": 300}, actor=SYSTEM, reason=f"worker {i}"
        )

    results = race(reserve)
    granted = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    others = [r for r in results if isinstance(r, Exception) and not isinstance(r, QuotaExceeded)]
    assert others == []
    # 1000 MiB / 300 MiB: exactly three fit; containers (10) never binds.
    assert len(granted) == 3 and len(refused) == THREADS - 3
    usage = dict(QuotaUsage.objects.filter(tenant=tenant).values_list("quota", "used"))
    assert usage["memory_mib"] == 900 and usage["containers"] == 3
    for err in refused:
        assert err.quota == "memory_mib" and err.limit == 1000
        assert err.used + err.requested > err.limit


def test_parallel_single_unit_reservations_fill_exactly_to_the_limit() -> None:
    tenant = make_racing_tenant({"concurrent_jobs": 7})
    results = race(
        lambda i: services.reserve(tenant, {"concurrent_jobs": 1}, actor=SYSTEM, reason=f"job {i}")
    )
    assert sum(not isinstance(r, Exception) for r in results) == 7
    assert all(isinstance(r, QuotaExceeded) for r in results if isinstance(r, Exception))
    assert QuotaUsage.objects.get(tenant=tenant, quota="concurrent_jobs").used == 7


def test_parallel_release_of_one_reservation_happens_once() -> None:
    tenant = make_racing_tenant({"containers": 10})
    keep = services.reserve(tenant, {"containers": 4}, actor=SYSTEM, reason="keep")
    held = services.reserve(tenant, {"containers": 3}, actor=SYSTEM, reason="drop")
    results = race(lambda i: services.release(held, actor=SYSTEM))
    assert results.count(True) == 1 and results.count(False) == THREADS - 1
    assert QuotaUsage.objects.get(tenant=tenant, quota="containers").used == 4
    keep.refresh_from_db()
    assert keep.released_at is None


def test_parallel_invitation_acceptances_never_exceed_seats() -> None:
    """Seats lowered after inviting: racing acceptances fill exactly the free seats."""
    seed_plans()
    tenant, _ = services.create_tenant(
        slug="seats", owner_email="o@seats.example", plan_code="team", seats=9, actor=SYSTEM
    )
    keys, users = [], []
    for i in range(8):
        _, key = services.invite_member(
            tenant, f"m{i}@seats.example", "viewer", actor=SYSTEM, actor_role=None
        )
        keys.append(key)
        users.append(services.get_or_create_user(f"m{i}@seats.example")[0])
    services.change_plan(tenant, seats=4, actor=SYSTEM)  # owner + 3 free seats
    results = race(
        lambda i: services.accept_invitation(keys[i], users[i], actor=SYSTEM), n=len(keys)
    )
    assert sum(not isinstance(r, Exception) for r in results) == 3
    assert all(isinstance(r, SeatLimitReached) for r in results if isinstance(r, Exception))
    assert Membership.objects.filter(tenant=tenant).count() == 4


def test_concurrent_reserve_release_loops_neither_deadlock_nor_drift() -> None:
    """Threads reserving and releasing several quotas at once on one tenant: no deadlock
    (every path locks usage rows in the same order) and usage returns to zero."""
    tenant = make_racing_tenant({"containers": 1000})
    amounts = {"cpu_millicores": 10, "memory_mib": 8, "containers": 1, "storage_gib": 1}

    def loop(i: int) -> int:
        for _ in range(12):
            held = services.reserve(tenant, amounts, actor=SYSTEM, reason=f"loop {i}")
            services.release(held, actor=SYSTEM)
        return 12

    results = race(loop, n=8)
    assert results == [12] * 8, [r for r in results if isinstance(r, Exception)]
    usage = dict(QuotaUsage.objects.filter(tenant=tenant).values_list("quota", "used"))
    assert all(usage[q] == 0 for q in amounts)
