"""Usage metering from known cgroup readings, the hourly ledger, the month-to-date estimate
and the spend cap."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from billing import metering, services
from billing.models import UsageLedgerEntry, UsageReading
from tenants.errors import InvalidInput

pytest_plugins = ["tests.control.billing_support"]

GIB = 1024**3
HOUR = datetime(2026, 5, 14, 10, 0, tzinfo=UTC)


def at(seconds: float) -> float:
    return (HOUR + timedelta(seconds=seconds)).timestamp()


def test_contribution_arithmetic() -> None:
    a = metering.Reading(
        at(0), cpu_usage_ns=0, memory_bytes=1 * GIB, gpus=1, storage_bytes=10 * GIB
    )
    b = metering.Reading(
        at(60), cpu_usage_ns=30 * 10**9, memory_bytes=3 * GIB, gpus=1, storage_bytes=10 * GIB
    )
    first = metering.contribution(None, a)
    assert first == metering.Contribution(Decimal(0), Decimal(0), Decimal(0), Decimal(0))

    c = metering.contribution(a, b)
    assert c.cpu_seconds == Decimal("30.000000")
    assert c.memory_gib_hours == Decimal("0.033333")  # 2 GiB average × 1 minute
    assert c.gpu_hours == Decimal("0.016667")
    assert c.storage_gib_hours == Decimal("0.166667")  # 10 GiB × 1 minute

    restarted = metering.Reading(at(120), cpu_usage_ns=10 * 10**9, memory_bytes=GIB)
    assert metering.contribution(b, restarted).cpu_seconds == Decimal("10.000000")

    after_gap = metering.Reading(at(120 + 3600), cpu_usage_ns=0, memory_bytes=GIB)
    capped = metering.contribution(restarted, after_gap)
    assert capped.memory_gib_hours == Decimal("0.166667")  # only 10 minutes are billed
    with pytest.raises(ValueError):
        metering.contribution(b, a)


def test_overage_arithmetic() -> None:
    included = metering.included_usage("pro", build_minutes_per_seat=1000, seats=2)
    assert included["cpu_seconds"] == Decimal(720_000)
    assert included["build_minutes"] == Decimal(2000)
    charges = {
        c.metric: c
        for c in metering.overage_charges(
            {"cpu_seconds": Decimal(730_000), "build_minutes": Decimal(1500)}, included
        )
    }
    assert charges["cpu_seconds"].overage == Decimal(10_000)
    assert charges["cpu_seconds"].cents == Decimal("12.0000")
    assert charges["build_minutes"].overage == 0 and charges["gpu_hours"].cents == 0
    assert metering.whole_cents(Decimal("12.99")) == 12


def test_readings_are_counted_once_into_the_hourly_ledger(make_tenant: Callable[..., Any]) -> None:
    tenant, _ = make_tenant("acme", plan="pro", seats=1)
    readings = [
        metering.Reading(at(0), 0, GIB, storage_bytes=10 * GIB),
        metering.Reading(at(60), 30 * 10**9, 3 * GIB, storage_bytes=10 * GIB),
        metering.Reading(at(3590), 40 * 10**9, GIB, storage_bytes=10 * GIB),  # 10 min gap
        metering.Reading(at(3650), 100 * 10**9, GIB, storage_bytes=10 * GIB),  # next hour
    ]
    stored = [services.record_reading(tenant, "node1/c1", r) for r in readings]
    assert stored == [True, True, True, True]
    # The same reading again, and one older than the newest: both already counted.
    assert services.record_reading(tenant, "node1/c1", readings[1]) is False
    assert services.record_reading(tenant, "node1/c1", metering.Reading(at(30), 5, GIB)) is False
    # Another container of the same tenant.
    services.record_reading(tenant, "node1/c2", metering.Reading(at(100), 7 * 10**9, 0))
    assert UsageReading.objects.filter(tenant=tenant).count() == 5

    first = services.aggregate_hour(tenant.pk, HOUR)
    again = services.aggregate_hour(tenant.pk, HOUR + timedelta(minutes=59))
    assert first == again
    assert first["cpu_seconds"] == Decimal(30 + 10 + 7)
    # 2 GiB on average for 1 minute, then (3+1)/2 GiB for the 10 minutes the gap counts
    assert first["memory_gib_hours"] == Decimal("0.033333") + Decimal("0.333333")
    assert first["storage_gib_hours"] == Decimal("0.166667") + Decimal("1.666667")
    second = services.aggregate_hour(tenant.pk, HOUR + timedelta(hours=1))
    assert second["cpu_seconds"] == Decimal(60)
    assert second["storage_gib_hours"] == Decimal("0.166667")
    rows = UsageLedgerEntry.objects.filter(tenant=tenant)
    assert rows.count() == 6  # cpu, memory, storage in each hour; no GPU or build rows
    total_cpu = sum(r.quantity for r in rows.filter(metric="cpu_seconds"))
    assert total_cpu == Decimal(107)


def test_build_minutes_and_spend_cap(
    make_tenant: Callable[..., Any],
    settings: Any,
    mailoutbox: list[Any],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    settings.BILLING_SPEND_CAP_WARN_PERCENT = 80
    tenant, _ = make_tenant("acme", plan="pro", seats=1)
    now = datetime(2026, 5, 20, 12, 0, tzinfo=UTC)
    with pytest.raises(InvalidInput):  # below the 900 cents the seat itself costs
        services.set_spend_cap(tenant, 899, actor=services.BILLING_ACTOR)
    services.set_spend_cap(tenant, 1000, actor=services.BILLING_ACTOR)

    def build(build_id: str, minutes: int) -> None:
        end = now - timedelta(minutes=30)
        assert services.record_build(
            tenant, build_id, started_at=end - timedelta(minutes=minutes), finished_at=end
        )
        services.aggregate_hour(tenant.pk, end)

    build("b1", 1000)
    build("b2", 100)  # 100 minutes above the 1000 included × 0.8 cents = 80 cents
    assert (
        services.record_build(tenant, "b2", started_at=now - timedelta(hours=9), finished_at=now)
        is False
    )  # counted once
    est = services.estimate(tenant, now)
    assert (est["seats_cents"], est["overage_cents"], est["total_cents"]) == (900, 80, 980)
    assert est["spend_cap"]["state"] == "warning"
    services.check_new_usage_allowed(tenant, "build", now)  # warned, not refused
    with django_capture_on_commit_callbacks(execute=True):
        assert services.warn_spend_caps(now) == 1
    assert services.warn_spend_caps(now) == 0  # once a month
    assert "spend cap" in mailoutbox[-1].subject

    build("b3", 50)  # now 150 over: 120 cents → 1020 > cap
    est = services.estimate(tenant, now)
    assert est["spend_cap"]["state"] == "reached"
    assert (est["overage_cents"], est["overage_billed_cents"], est["total_cents"]) == (
        120,
        100,
        1000,
    )  # never billed past the cap
    with pytest.raises(services.SpendCapReached) as refused:
        services.check_new_usage_allowed(tenant, "deploy", now)
    assert refused.value.details["cap_cents"] == 1000
    assert "Running services keep running" in refused.value.message


def test_node_report_stats_feed_the_meter(make_tenant: Callable[..., Any]) -> None:
    tenant, _ = make_tenant("acme", plan="pro", seats=1)
    t = HOUR + timedelta(minutes=5)
    for i, (cpu, mem) in enumerate([(1.5, GIB), (4.0, GIB), (4.0, 3 * GIB)]):
        assert services.record_container_usage(
            tenant,
            node_id="node-a",
            container_id="3f2c",
            at=t + timedelta(seconds=30 * i),
            cpu_seconds=cpu,
            memory_bytes=mem,
        )
    totals = services.aggregate_hour(tenant.pk, HOUR)
    assert totals["cpu_seconds"] == Decimal("4.000000")
    assert totals["memory_gib_hours"] == Decimal("0.008333") + Decimal("0.016667")


@pytest.mark.django_db(transaction=True)
def test_concurrent_deliveries_of_readings_count_each_once() -> None:
    """Agents retry reports: the same readings arrive from several workers at once."""
    import threading

    from django.db import connection

    from tenants import services as tenant_services
    from tests.control.conftest import seed_plans

    seed_plans()
    tenant, _ = tenant_services.create_tenant(
        slug="race",
        owner_email="o@race.example",
        plan_code="pro",
        seats=1,
        actor=services.BILLING_ACTOR,
    )
    readings = [metering.Reading(at(10 * i), i * 2 * 10**9, GIB) for i in range(1, 13)]
    n = 6
    barrier = threading.Barrier(n)
    errors: list[Exception] = []

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            for reading in readings if i % 2 else reversed(readings):
                services.record_reading(tenant, "node1/c1", reading)
        except Exception as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert errors == []
    totals = services.aggregate_hour(tenant.pk, HOUR)
    # Whatever subset got stored, the cumulative counter makes CPU exact: 24 s in all.
    assert totals["cpu_seconds"] == Decimal(24)
    stored = list(UsageReading.objects.order_by("read_at").values_list("read_at", flat=True))
    assert len(stored) == len(set(stored))  # no reading twice


def test_pending_usage_is_aggregated_once_including_late_readings(
    make_tenant: Callable[..., Any],
) -> None:
    tenant, _ = make_tenant("acme", plan="pro", seats=1)
    services.record_reading(tenant, "n/c1", metering.Reading(at(0), 0, GIB))
    services.record_reading(tenant, "n/c1", metering.Reading(at(60), 6 * 10**9, GIB))
    services.record_reading(tenant, "n/c2", metering.Reading(at(3700), 5 * 10**9, GIB))
    end = HOUR + timedelta(hours=2)
    services.record_build(tenant, "b1", started_at=end - timedelta(minutes=3), finished_at=end)

    assert services.aggregate_pending_usage() == 3  # hours 10 and 11, and the build's hour 12
    assert services.aggregate_pending_usage() == 0  # nothing new
    # A container first reported late, for an hour already in the ledger.
    services.record_reading(tenant, "n/c3", metering.Reading(at(120), 4 * 10**9, GIB))
    assert services.aggregate_pending_usage() == 1

    ledger = {
        (e.hour.hour, e.metric): e.quantity for e in UsageLedgerEntry.objects.filter(tenant=tenant)
    }
    assert ledger[(10, "cpu_seconds")] == Decimal(10)
    assert ledger[(11, "cpu_seconds")] == Decimal(5)
    assert ledger[(12, "build_minutes")] == Decimal(3)
    assert not UsageReading.objects.filter(aggregated=False).exists()
