"""Billing data. This module holds :class:`Plan`; Stripe customers, subscriptions and the
seat ledger are added next to it by the billing work.

Quota arithmetic lives in :mod:`billing.plans` (pure functions); ``Plan`` only stores the
numbers. Field names of the per-seat resources are the quota names of
:data:`billing.plans.QUOTA_NAMES`, so ``plan.per_seat()`` feeds
:func:`billing.plans.effective_quota` directly.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

from billing.plans import QUOTA_NAMES, effective_quota


class Plan(models.Model):
    """A seat-based tier: price per seat per month and resources included per seat.

    ``blkio_bps``, ``pids`` and ``networks_per_container`` are per-container caps and
    ``array_size`` a per-job cap (not multiplied by seats); every other resource is pooled
    across the tenant and scales with its seats.
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
    pids = models.PositiveBigIntegerField(
        default=256, help_text="Processes (and threads) per container; its pids.max."
    )
    networks = models.PositiveBigIntegerField(default=3, help_text="Networks per seat.")
    networks_per_container = models.PositiveBigIntegerField(
        default=4, help_text="Networks one container may join."
    )
    array_size = models.PositiveBigIntegerField(
        default=100, help_text="Runs in one batch job array."
    )

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


# --- Stripe accounts, the seat ledger, webhook events, usage metering ---------------------
# (billing helper; see docs/billing.md)


class PlanPrice(models.Model):
    """A Stripe price for a plan's seat (or for metered overage when ``plan`` is empty).

    Written by ``manage.py sync_stripe_plans``; a subscription's price id maps back to
    a plan through this table.
    """

    plan = models.ForeignKey(
        Plan, null=True, blank=True, on_delete=models.PROTECT, related_name="stripe_prices"
    )
    stripe_price_id = models.CharField(max_length=255, unique=True)
    stripe_product_id = models.CharField(max_length=255)
    lookup_key = models.CharField(max_length=200, unique=True)
    unit_amount_cents = models.PositiveIntegerField()
    usage_type = models.CharField(max_length=16, default="licensed")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.lookup_key


class DunningState(models.TextChoices):
    OK = "ok", "In good standing"
    PAST_DUE = "past_due", "Payment failed, in grace period"
    SUSPENDED = "suspended", "Suspended for non-payment"


class BillingAccount(models.Model):
    """A tenant's link to Stripe and its billing state.

    ``sync_pending`` says Berth's seats or plan changed and Stripe has not confirmed it
    yet (the sync task retries until it does). ``subscription_event_at`` is the Stripe
    ``created`` time of the newest subscription event applied: older ones are ignored, so
    an out-of-order delivery never rolls the state back.
    """

    tenant = models.OneToOneField(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="billing_account"
    )
    stripe_customer_id = models.CharField(max_length=255, unique=True, null=True, blank=True)
    stripe_subscription_id = models.CharField(max_length=255, unique=True, null=True, blank=True)
    stripe_subscription_item_id = models.CharField(max_length=255, blank=True)
    stripe_price_id = models.CharField(max_length=255, blank=True)
    subscription_status = models.CharField(max_length=32, blank=True)
    subscription_event_at = models.DateTimeField(null=True, blank=True)
    synced_quantity = models.PositiveIntegerField(null=True, blank=True)
    sync_pending = models.BooleanField(default=False)
    sync_error = models.CharField(max_length=500, blank=True)
    sync_attempts = models.PositiveIntegerField(default=0)

    comp_seats = models.PositiveIntegerField(default=0, help_text="Seats given free by admins.")

    dunning_state = models.CharField(
        max_length=16, choices=DunningState.choices, default=DunningState.OK
    )
    past_due_since = models.DateTimeField(null=True, blank=True)
    grace_ends_at = models.DateTimeField(null=True, blank=True)
    suspended_at = models.DateTimeField(null=True, blank=True)
    stop_services_at = models.DateTimeField(null=True, blank=True)
    services_stopped_at = models.DateTimeField(null=True, blank=True)
    last_payment_failed_at = models.DateTimeField(null=True, blank=True)
    last_paid_at = models.DateTimeField(null=True, blank=True)

    spend_cap_cents = models.PositiveBigIntegerField(null=True, blank=True)
    spend_cap_warned_month = models.DateField(null=True, blank=True)
    trial_ends_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"billing of {self.tenant_id}"


class SeatLedgerEntry(models.Model):
    """One change of a tenant's seats or plan. Append-only (Zulip's LicenseLedger).

    ``seats`` is the tenant's seat count after the change, ``comp_seats`` how many of them
    are free; the Stripe quantity is ``seats - comp_seats``.
    """

    class Kind(models.TextChoices):
        INITIAL = "initial", "Initial"
        SEATS_CHANGED = "seats_changed", "Seats changed"
        PLAN_CHANGED = "plan_changed", "Plan changed"
        COMP = "comp", "Seats comped by an admin"
        STRIPE = "stripe", "Changed in Stripe (Checkout or portal)"
        CANCELED = "canceled", "Subscription canceled"

    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="seat_ledger"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    plan_code = models.CharField(max_length=32)
    seats = models.PositiveIntegerField()
    comp_seats = models.PositiveIntegerField(default=0)
    previous_plan_code = models.CharField(max_length=32, blank=True)
    previous_seats = models.PositiveIntegerField(null=True, blank=True)
    actor_label = models.CharField(max_length=200)
    stripe_event_id = models.CharField(max_length=255, blank=True)
    note = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["tenant", "-id"])]

    def __str__(self) -> str:
        return f"{self.tenant_id}: {self.plan_code} × {self.seats} ({self.kind})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise ValueError("the seat ledger is append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("the seat ledger is append-only")


class StripeEvent(models.Model):
    """A webhook event, stored once by its Stripe id before it is processed."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        PROCESSED = "processed", "Processed"
        IGNORED = "ignored", "Ignored"
        FAILED = "failed", "Failed"

    stripe_id = models.CharField(max_length=255, unique=True)
    type = models.CharField(max_length=100)
    created = models.DateTimeField(help_text="When Stripe created the event.")
    payload = models.JSONField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    result = models.CharField(max_length=500, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    received_at = models.DateTimeField(default=timezone.now)
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.stripe_id} {self.type} ({self.status})"


class UsageReading(models.Model):
    """One cgroup reading of one container, stored once per (source, read_at).

    CPU comes as the cgroup's cumulative counter; memory, GPUs and storage as gauges.
    The ``*_used`` fields are this reading's contribution since the previous reading of
    the same source, computed once when it is recorded.
    """

    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="usage_readings"
    )
    source = models.CharField(max_length=200, help_text="node/container the reading is from")
    read_at = models.DateTimeField()
    cpu_usage_ns = models.PositiveBigIntegerField()
    memory_bytes = models.PositiveBigIntegerField()
    gpus = models.PositiveIntegerField(default=0)
    storage_bytes = models.PositiveBigIntegerField(default=0)
    cpu_seconds_used = models.DecimalField(max_digits=20, decimal_places=6, default=0)
    memory_gib_hours_used = models.DecimalField(max_digits=20, decimal_places=6, default=0)
    gpu_hours_used = models.DecimalField(max_digits=20, decimal_places=6, default=0)
    storage_gib_hours_used = models.DecimalField(max_digits=20, decimal_places=6, default=0)
    aggregated = models.BooleanField(default=False, help_text="Counted in the usage ledger.")

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["source", "read_at"], name="usage_reading_once"),
        ]
        indexes = [
            models.Index(fields=["tenant", "read_at"]),
            models.Index(
                fields=["aggregated"],
                condition=models.Q(aggregated=False),
                name="usage_reading_pending",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.source} at {self.read_at:%Y-%m-%d %H:%M:%S}"


class BuildUsage(models.Model):
    """Minutes one build ran, recorded once per build."""

    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="build_usage"
    )
    build_id = models.CharField(max_length=100, unique=True)
    finished_at = models.DateTimeField()
    minutes = models.DecimalField(max_digits=20, decimal_places=6)
    aggregated = models.BooleanField(default=False, help_text="Counted in the usage ledger.")

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"build {self.build_id}: {self.minutes} min"


class UsageLedgerEntry(models.Model):
    """A tenant's use of one metric during one clock hour (recomputed from readings)."""

    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="usage_ledger"
    )
    hour = models.DateTimeField()
    metric = models.CharField(max_length=32)
    quantity = models.DecimalField(max_digits=20, decimal_places=6)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["hour", "metric"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "hour", "metric"], name="usage_hour_once"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.hour:%Y-%m-%d %H}h {self.metric}={self.quantity}"


class UsageReport(models.Model):
    """Overage (in cents) reported to Stripe for one tenant and month.

    ``pending_cents`` is written before calling Stripe and cleared after; a retry sends the
    same cumulative figure with the same identifier, which Stripe counts once.
    """

    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="usage_reports"
    )
    month = models.DateField()
    reported_cents = models.PositiveBigIntegerField(default=0)
    pending_cents = models.PositiveBigIntegerField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["month"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "month"], name="usage_report_once"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.month:%Y-%m}: {self.reported_cents} cents reported"


class CreditGrant(models.Model):
    """Credit an admin granted; pushed to Stripe as a negative invoice item."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="credits")
    amount_cents = models.PositiveIntegerField()
    reason = models.CharField(max_length=500)
    granted_by = models.CharField(max_length=200)
    stripe_invoice_item_id = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.amount_cents} cents credit for {self.tenant_id}"
