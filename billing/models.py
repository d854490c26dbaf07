"""Billing data. This module holds :class:`Plan`; Stripe customers, subscriptions and the
seat ledger are added next to it by the billing work.

Quota arithmetic lives in :mod:`billing.plans` (pure functions); ``Plan`` only stores the
numbers. Field names of the per-seat resources are the quota names of
:data:`billing.plans.QUOTA_NAMES`, so ``plan.per_seat()`` feeds
:func:`billing.plans.effective_quota` directly.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models

from billing.plans import QUOTA_NAMES, effective_quota


class Plan(models.Model):
    """A seat-based tier: price per seat per month and resources included per seat.

    ``blkio_bps`` is a per-container cap (not multiplied by seats); every other resource is
    pooled across the tenant and scales with its seats.
    """

    code = models.SlugField(max_length=32, unique=True, help_text="Stable identifier: free, pro…")
    name = models.CharField(max_length=64)
    seat_price_cents = models.PositiveIntegerField(help_text="Price per seat per month, cents.")
    currency = models.CharField(max_length=3, default="usd")
    min_seats = models.PositiveIntegerField(default=1)
    max_seats = models.PositiveIntegerField(null=True, blank=True, help_text="Empty: no limit.")
    is_public = models.BooleanField(default=True, help_text="Offered to customers for sign-up.")
    sort_order = models.PositiveSmallIntegerField(default=0)

    cpu_millicores = models.PositiveBigIntegerField(help_text="vCPU per seat, millicores.")
    memory_mib = models.PositiveBigIntegerField(help_text="Memory per seat, MiB.")
    blkio_bps = models.PositiveBigIntegerField(help_text="Block I/O cap per container, bytes/s.")
    storage_gib = models.PositiveBigIntegerField(help_text="Storage per seat, GiB.")
    containers = models.PositiveBigIntegerField(help_text="Running containers per seat.")
    concurrent_jobs = models.PositiveBigIntegerField(help_text="Concurrent batch jobs per seat.")
    build_minutes_month = models.PositiveBigIntegerField(help_text="Build minutes per seat/month.")
    gpus = models.PositiveBigIntegerField(help_text="GPUs per seat.")

    class Meta:
        ordering = ["sort_order", "seat_price_cents", "code"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(max_seats__isnull=True)
                | models.Q(max_seats__gte=models.F("min_seats")),
                name="plan_max_seats_gte_min_seats",
            ),
            models.CheckConstraint(condition=models.Q(min_seats__gte=1), name="plan_min_seats_1"),
        ]

    def __str__(self) -> str:
        return self.name

    def per_seat(self) -> dict[str, int]:
        """Resources included per seat, keyed by quota name."""
        return {name: int(getattr(self, name)) for name in QUOTA_NAMES}

    def limits(self, seats: int, overrides: dict[str, int] | None = None) -> dict[str, int]:
        """Effective quotas for ``seats`` seats on this plan plus ``overrides``."""
        return effective_quota(self.per_seat(), seats, overrides)

    def seats_error(self, seats: int) -> str | None:
        """Why ``seats`` is not allowed on this plan, or None when it is."""
        if seats < self.min_seats:
            return f"the {self.name} plan needs at least {self.min_seats} seat(s)"
        if self.max_seats is not None and seats > self.max_seats:
            return f"the {self.name} plan allows at most {self.max_seats} seat(s)"
        return None

    def clean(self) -> None:
        if self.max_seats is not None and self.max_seats < self.min_seats:
            raise ValidationError({"max_seats": "must be at least min_seats"})

    def monthly_price_cents(self, seats: int) -> int:
        """What ``seats`` seats cost per month on this plan, in cents."""
        return self.seat_price_cents * seats
