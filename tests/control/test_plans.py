"""Quota arithmetic: plan × seats + overrides, per-container caps not multiplied."""

from __future__ import annotations

import pytest

from billing.models import Plan
from billing.plans import DEFAULT_PLANS, QUOTA_NAMES, effective_quota

PER_SEAT = {name: 10 for name in QUOTA_NAMES}


def test_pooled_quotas_scale_with_seats_and_add_overrides() -> None:
    limits = effective_quota(PER_SEAT, 3, {"cpu_millicores": 5, "gpus": -40})
    assert limits["memory_mib"] == 30
    assert limits["cpu_millicores"] == 35
    assert limits["gpus"] == 0  # never negative


def test_per_container_cap_is_not_multiplied_by_seats() -> None:
    assert effective_quota(PER_SEAT, 7)["blkio_bps"] == 10
    assert effective_quota(PER_SEAT, 7, {"blkio_bps": 5})["blkio_bps"] == 15


def test_unknown_override_and_negative_seats_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown quota"):
        effective_quota(PER_SEAT, 1, {"bogus": 1})
    with pytest.raises(ValueError, match="seats"):
        effective_quota(PER_SEAT, -1)


def test_default_plans_cover_every_quota() -> None:
    assert [p.code for p in DEFAULT_PLANS] == ["free", "pro", "team", "business"]
    for plan in DEFAULT_PLANS:
        assert set(plan.per_seat) == set(QUOTA_NAMES)


@pytest.mark.django_db
def test_seeded_plans_are_rows_with_seat_rules(plans: None) -> None:
    team = Plan.objects.get(code="team")
    assert team.limits(4)["containers"] == 4 * team.containers
    assert team.seats_error(1) is not None
    assert team.seats_error(2) is None
    assert Plan.objects.get(code="business").max_seats is None
    assert team.monthly_price_cents(4) == 4 * team.seat_price_cents


def test_quota_choices_follow_the_quota_names() -> None:
    from tenants.choices import QuotaName

    assert tuple(QuotaName.values) == QUOTA_NAMES
