"""Billing writes: subscriptions, the seat ledger, dunning, usage metering and spend caps.

Conventions (docs/billing.md):
- Berth's database is the source of truth for what a tenant *wants* (plan, seats);
  Stripe is told afterwards by :func:`sync_subscription`, run by a Celery task after the
  commit and retried until Stripe confirms. A Stripe outage therefore never loses a seat
  change: the change is committed with ``sync_pending`` set, and the latest desired state
  is what gets pushed once Stripe answers again.
- Every plan or seat change appends a :class:`~billing.models.SeatLedgerEntry` and goes
  through :func:`tenants.services.change_plan`, which writes the tenant row the quotas are
  computed from (plan × seats + overrides), so quotas follow every change at once.
- Functions that depend on the clock take ``now`` so the dunning timeline can be tested.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, connection, transaction
from django.db.models import Sum
from django.utils import timezone
from django.utils.module_loading import import_string

from billing import metering, stripe_api
from billing.models import (
    BillingAccount,
    BuildUsage,
    CreditGrant,
    DunningState,
    Plan,
    PlanPrice,
    SeatLedgerEntry,
    UsageLedgerEntry,
    UsageReading,
    UsageReport,
)
from billing.plans import PER_CONTAINER_QUOTAS, QUOTA_UNITS
from tenants import services as tenant_services
from tenants.choices import Role, TenantStatus
from tenants.errors import BerthError, InvalidInput, NotFound, PermissionDenied
from tenants.models import Membership, QuotaUsage, Tenant
from tenants.services import Actor, record

log = logging.getLogger(__name__)

#: Suspensions made by dunning carry this reason prefix, so paying lifts only those.
BILLING_SUSPENSION_PREFIX = "billing:"
STRIPE_ACTOR = Actor.for_system("stripe")
BILLING_ACTOR = Actor.for_system("billing")
#: Meter that receives overage, in cents (its Stripe price is 1 cent per unit).
OVERAGE_METER_EVENT = "berth_overage_cents"


# --------------------------------------------------------------------------- errors


class DowngradeBlocked(BerthError):
    """A plan or seat change would put a quota below what the tenant already uses."""

    status_code = 409
    code = "downgrade_blocked"


class CheckoutRequired(BerthError):
    """A paid plan needs a Stripe subscription, which starts with Checkout."""

    status_code = 409
    code = "checkout_required"


class AlreadySubscribed(BerthError):
    """Checkout was asked for while a subscription exists (it would charge twice)."""

    status_code = 409
    code = "already_subscribed"


class SpendCapReached(BerthError):
    """New usage is refused: the month's estimated bill has reached the spend cap."""

    status_code = 402
    code = "spend_cap_reached"


class BillingUnavailable(BerthError):
    """Stripe could not be reached; nothing was changed."""

    status_code = 503
    code = "billing_unavailable"


class BillingRefused(BerthError):
    """Stripe refused the request."""

    status_code = 400
    code = "billing_refused"


# --------------------------------------------------------------------------- accounts


def account_for(tenant: Tenant) -> BillingAccount:
    account, _ = BillingAccount.objects.get_or_create(tenant=tenant)
    return account


def _locked_account(tenant: Tenant) -> BillingAccount:
    account_for(tenant)
    return BillingAccount.objects.select_for_update().get(tenant=tenant)


def seat_price_for(plan: Plan) -> PlanPrice | None:
    """The newest Stripe seat price of ``plan`` (made by ``sync_stripe_plans``)."""
    return PlanPrice.objects.filter(plan=plan, usage_type="licensed").order_by("-id").first()


def billable_seats(tenant: Tenant, account: BillingAccount) -> int:
    return max(0, tenant.seats - account.comp_seats)


def _validate_seat_count(seats: Any) -> int:
    if isinstance(seats, bool) or not isinstance(seats, int):
        raise InvalidInput("seats must be a whole number", details={"field": "seats"})
    if seats < 1 or seats > settings.BILLING_MAX_SEATS:
        raise InvalidInput(
            f"seats must be between 1 and {settings.BILLING_MAX_SEATS}, got {seats}",
            details={"field": "seats", "min": 1, "max": settings.BILLING_MAX_SEATS},
        )
    return seats


def must_shrink(tenant: Tenant, plan: Plan, seats: int) -> list[dict[str, Any]]:
    """Quotas whose current use exceeds what ``plan`` × ``seats`` would allow.

    Call inside a transaction: the usage rows stay locked until it ends.
    """
    limits = plan.limits(seats, tenant.overrides())
    problems = []
    # Locked in name order, like ``reserve``: a reservation racing this change waits,
    # then reads the new limits.
    for row in QuotaUsage.objects.select_for_update().filter(tenant=tenant).order_by("quota"):
        if row.quota in PER_CONTAINER_QUOTAS:
            continue
        if row.used > limits[row.quota]:
            problems.append(
                {
                    "quota": row.quota,
                    "used": row.used,
                    "new_limit": limits[row.quota],
                    "shrink_by": row.used - limits[row.quota],
                    "unit": QUOTA_UNITS[row.quota],
                }
            )
    return problems


def _lock_tenant(tenant: Tenant | int) -> Tenant:
    """Lock the tenant row, then read it with its plan.

    The lock is taken without a join: Postgres re-checks a ``FOR UPDATE`` row that a
    concurrent transaction changed, and with a join to the old plan row that re-check drops
    the row (``DoesNotExist``) when the plan just changed. Holding the lock first makes the
    later joined reads (ours and those in tenants.services) stable.
    """
    pk = tenant if isinstance(tenant, int) else tenant.pk
    Tenant.objects.select_for_update(no_key=True).filter(pk=pk).values_list("pk", flat=True).get()
    return Tenant.objects.select_related("plan").get(pk=pk)


def _lock_usage_then_tenant(tenant: Tenant) -> Tenant:
    """Lock the tenant's quota usage rows (name order), then the tenant row.

    ``reserve`` locks usage rows and then writes an audit row referencing the tenant (a key
    share lock on it); taking the usage rows first here keeps the two from deadlocking.
    """
    list(QuotaUsage.objects.select_for_update().filter(tenant=tenant).order_by("quota"))
    return _lock_tenant(tenant)


def _refuse_if_over_usage(tenant: Tenant, plan: Plan, seats: int) -> None:
    problems = must_shrink(tenant, plan, seats)
    if problems:
        names = ", ".join(f"{p['quota']} (in use {p['used']} > {p['new_limit']})" for p in problems)
        raise DowngradeBlocked(
            f"{plan.name} with {seats} seat(s) is below what {tenant.slug} uses now: {names}; "
            "shrink these first",
            details={"plan": plan.code, "seats": seats, "must_shrink": problems},
        )


def _append_ledger(
    tenant: Tenant,
    kind: str,
    *,
    before: tuple[str, int] | None,
    account: BillingAccount,
    actor: Actor,
    stripe_event_id: str = "",
    note: str = "",
) -> SeatLedgerEntry:
    return SeatLedgerEntry.objects.create(
        tenant=tenant,
        kind=kind,
        plan_code=tenant.plan.code,
        seats=tenant.seats,
        comp_seats=account.comp_seats,
        previous_plan_code=before[0] if before else "",
        previous_seats=before[1] if before else None,
        actor_label=actor.label[:200],
        stripe_event_id=stripe_event_id,
        note=note[:500],
    )


def _schedule_sync(account: BillingAccount) -> None:
    """Mark Stripe out of date and push the change after commit (retried until it lands)."""
    account.sync_pending = True
    account.save(update_fields=["sync_pending", "updated_at"])
    tenant_id = account.tenant_id

    def enqueue() -> None:
        from billing.tasks import sync_subscription_task

        try:
            sync_subscription_task.delay(tenant_id)
        except Exception:  # broker down: the periodic sweep picks sync_pending rows up
            log.exception("could not enqueue the Stripe sync of tenant %s", tenant_id)

    transaction.on_commit(enqueue)


# --------------------------------------------------------------------------- seats and plans


@transaction.atomic
def change_seats(tenant: Tenant, seats: Any, *, actor: Actor, reason: str = "") -> Tenant:
    """Buy or release seats. Stripe's quantity follows (prorated) after the commit."""
    seats = _validate_seat_count(seats)
    tenant = _lock_usage_then_tenant(tenant)
    tenant_services.ensure_active(tenant)
    account = _locked_account(tenant)
    if seats - account.comp_seats < tenant.plan.min_seats:
        raise InvalidInput(
            f"the {tenant.plan.name} plan needs at least {tenant.plan.min_seats} paid seat(s) "
            f"({account.comp_seats} of {seats} would be comped)",
            details={"field": "seats", "comp_seats": account.comp_seats},
        )
    if seats == tenant.seats:
        return tenant
    _refuse_unpaid_seats(tenant, account, seats, actor)
    if seats < tenant.seats:
        _refuse_if_over_usage(tenant, tenant.plan, seats)
    before = (tenant.plan.code, tenant.seats)
    tenant = tenant_services.change_plan(tenant, actor=actor, seats=seats, reason=reason)
    _append_ledger(
        tenant,
        SeatLedgerEntry.Kind.SEATS_CHANGED,
        before=before,
        account=account,
        actor=actor,
        note=reason,
    )
    if account.stripe_subscription_id:
        _schedule_sync(account)
    return tenant


@transaction.atomic
def add_seats(tenant: Tenant, count: Any, *, actor: Actor, reason: str = "") -> Tenant:
    """Change the seat count by ``count`` (negative releases), read under the tenant lock so
    concurrent additions all count."""
    if isinstance(count, bool) or not isinstance(count, int) or count == 0:
        raise InvalidInput("add must be a non-zero whole number", details={"field": "add"})
    tenant = _lock_usage_then_tenant(tenant)
    return change_seats(tenant, tenant.seats + count, actor=actor, reason=reason)


#: Roles whose member-management actions may also change what the tenant pays: buying a
#: seat for an invitation, or dropping the seat a removed member freed.
SEAT_CHANGING_ROLES = frozenset({Role.OWNER, Role.ADMIN, Role.BILLING})


def may_change_seats(role: str | None) -> bool:
    """Whether a member with ``role`` may buy or release seats while managing members."""
    return role in SEAT_CHANGING_ROLES


@transaction.atomic
def add_seat_for_invitation(tenant: Tenant, *, actor: Actor, actor_role: str | None) -> Tenant:
    """Buy one more seat so an invitation beyond the current count can go out.

    Only owners, admins and billing members may spend money this way.
    """
    if not may_change_seats(actor_role):
        raise PermissionDenied("only owners, admins and billing members can buy seats")
    return add_seats(tenant, 1, actor=actor, reason="seat bought for invitation")


def _seat_floor(tenant: Tenant, account: BillingAccount, *, members: int) -> int:
    """The fewest seats the tenant may have with ``members`` members: those members, the
    open invitations, and the plan minimum on top of the comped seats."""
    used = members + tenant_services._pending_invitations(tenant)
    return max(used, tenant.plan.min_seats + account.comp_seats)


@transaction.atomic
def release_seat_after_removal(
    tenant: Tenant, *, actor: Actor, reason: str = "member removed"
) -> Tenant:
    """After a member left: drop one seat if it is now unused (never below the plan minimum)."""
    tenant = _lock_usage_then_tenant(tenant)
    account = _locked_account(tenant)
    if _seat_floor(tenant, account, members=tenant.memberships.count()) >= tenant.seats:
        return tenant
    return change_seats(tenant, tenant.seats - 1, actor=actor, reason=reason)


def seats_after_releasing_one_member(tenant: Tenant) -> int:
    """What the seat count would become if one member were removed with their seat
    released: one fewer, or unchanged when the plan minimum, comped seats or open
    invitations hold it (a preview for the dashboard; nothing is locked)."""
    floor = _seat_floor(tenant, account_for(tenant), members=tenant.memberships.count() - 1)
    return tenant.seats if floor >= tenant.seats else tenant.seats - 1


@dataclass(frozen=True)
class SeatRelease:
    """The outcome of :func:`remove_member_releasing_seat`."""

    previous_seats: int
    seats: int

    @property
    def released(self) -> bool:
        return self.seats < self.previous_seats


@transaction.atomic
def remove_member_releasing_seat(
    membership: Membership, *, actor: Actor, actor_role: str | None
) -> SeatRelease:
    """Remove a member and drop the seat they freed, both or neither.

    The caller must be allowed to change billing (owners, admins, billing members;
    ``actor_role`` None is a platform admin); otherwise nothing is removed. The seat goes
    through :func:`release_seat_after_removal` (never below the plan minimum plus comped
    seats, nor below members plus open invitations) and :func:`change_seats` (ledger, quota
    check): if that refuses, the removal is rolled back with it. Stripe's quantity follows
    after the commit, like every seat change (``sync_pending`` until Stripe confirms).
    """
    if actor_role is not None and not may_change_seats(actor_role):
        raise PermissionDenied(
            f"a {actor_role} cannot change the seats: only owners, admins and billing members "
            "can release the freed seat; remove the member without releasing it"
        )
    # Lock order of seat changes (usage rows, tenant, account) before remove_member locks
    # the tenant row, so this never deadlocks with a quota reservation.
    tenant = _lock_usage_then_tenant(membership.tenant)
    previous_seats = tenant.seats
    email = membership.user.email
    tenant_services.remove_member(membership, actor=actor, actor_role=actor_role)
    tenant = release_seat_after_removal(
        tenant, actor=actor, reason=f"seat freed by removing {email}"
    )
    return SeatRelease(previous_seats=previous_seats, seats=tenant.seats)


@transaction.atomic
def change_plan(
    tenant: Tenant,
    plan_code: str,
    *,
    actor: Actor,
    seats: Any = None,
    without_subscription: bool = False,
) -> Tenant:
    """Move to another plan. A downgrade below current usage is refused, naming what must
    shrink. A paid plan without a Stripe subscription needs Checkout, unless a platform
    admin passes ``without_subscription`` (comped tenants)."""
    plan = Plan.objects.filter(code=plan_code).first()
    if plan is None:
        raise InvalidInput(
            f"unknown plan {plan_code!r}",
            details={"field": "plan", "allowed": list(Plan.objects.values_list("code", flat=True))},
        )
    tenant = _lock_usage_then_tenant(tenant)
    tenant_services.ensure_active(tenant)
    account = _locked_account(tenant)
    if seats is None:
        seats = max(plan.min_seats, tenant.seats)
        if plan.max_seats is not None:
            seats = min(seats, plan.max_seats)
    seats = _validate_seat_count(seats)
    if problem := plan.seats_error(seats - account.comp_seats if plan.seat_price_cents else seats):
        raise InvalidInput(problem, details={"field": "seats"})
    _refuse_if_over_usage(tenant, plan, seats)
    if (
        plan.seat_price_cents > 0
        and not account.stripe_subscription_id
        and not without_subscription
    ):
        raise CheckoutRequired(
            f"{tenant.slug} has no subscription yet: subscribe to {plan.name} through Checkout",
            details={"plan": plan.code, "seats": seats, "checkout": "/api/v1/billing/checkout"},
        )
    if plan == tenant.plan and seats == tenant.seats:
        return tenant
    before = (tenant.plan.code, tenant.seats)
    tenant = tenant_services.change_plan(tenant, actor=actor, plan=plan, seats=seats)
    _append_ledger(
        tenant, SeatLedgerEntry.Kind.PLAN_CHANGED, before=before, account=account, actor=actor
    )
    if account.stripe_subscription_id:
        _schedule_sync(account)
    return tenant


@transaction.atomic
def comp_seats(tenant: Tenant, count: Any, *, actor: Actor, reason: str) -> Tenant:
    """Give (count > 0) or take back (count < 0) free seats. The Stripe quantity is unchanged."""
    if isinstance(count, bool) or not isinstance(count, int) or count == 0:
        raise InvalidInput("count must be a non-zero whole number", details={"field": "count"})
    if not reason.strip():
        raise InvalidInput("a reason is required", details={"field": "reason"})
    tenant = _lock_usage_then_tenant(tenant)
    account = _locked_account(tenant)
    if account.comp_seats + count < 0:
        raise InvalidInput(
            f"{tenant.slug} has only {account.comp_seats} comped seat(s)",
            details={"field": "count", "comp_seats": account.comp_seats},
        )
    seats = _validate_seat_count(tenant.seats + count)
    if count < 0:
        _refuse_if_over_usage(tenant, tenant.plan, seats)
    before = (tenant.plan.code, tenant.seats)
    tenant = tenant_services.change_plan(tenant, actor=actor, seats=seats, reason=reason)
    account.comp_seats += count
    account.save(update_fields=["comp_seats", "updated_at"])
    _append_ledger(
        tenant, SeatLedgerEntry.Kind.COMP, before=before, account=account, actor=actor, note=reason
    )
    record(actor, "billing.comp_seats", tenant=tenant, target=tenant, details={"count": count})
    return tenant


# --------------------------------------------------------------------------- Stripe sync


def ensure_customer(tenant: Tenant) -> str:
    """The tenant's Stripe customer id, created once (idempotency key per tenant)."""
    account = account_for(tenant)
    if account.stripe_customer_id:
        return account.stripe_customer_id
    owner = tenant.memberships.filter(role=Role.OWNER).select_related("user").first()
    try:
        customer = stripe_api.create_customer(
            name=tenant.name,
            email=owner.user.email if owner else "",
            metadata={"tenant_id": str(tenant.pk), "tenant_slug": tenant.slug},
            idempotency_key=f"berth-customer-{tenant.pk}",
        )
    except stripe_api.StripeUnavailable as exc:
        raise BillingUnavailable(f"Stripe is unreachable: {exc}") from exc
    BillingAccount.objects.filter(pk=account.pk, stripe_customer_id__isnull=True).update(
        stripe_customer_id=customer["id"]
    )
    account.refresh_from_db()
    return str(account.stripe_customer_id)


def sync_subscription(tenant_id: int) -> str:
    """Make Stripe's subscription match the tenant's plan and paid seats. Idempotent.

    Raises :class:`billing.stripe_api.StripeUnavailable` when Stripe cannot be reached
    (the task retries); ``sync_pending`` stays set until Stripe has confirmed the state
    that is current in the database when the call returns.
    """
    for _ in range(5):
        with transaction.atomic():
            account = BillingAccount.objects.select_for_update().get(tenant_id=tenant_id)
            tenant = Tenant.objects.select_related("plan").get(pk=tenant_id)
            if not account.sync_pending:
                return "in sync"
            want_plan, want_seats = tenant.plan, billable_seats(tenant, account)
            sub_id, item_id = account.stripe_subscription_id, account.stripe_subscription_item_id
            account.sync_attempts += 1
            account.save(update_fields=["sync_attempts", "updated_at"])
        if not sub_id:
            outcome, result = "no subscription", None
        elif want_plan.seat_price_cents == 0:
            result = _stripe_call(account, partial(stripe_api.cancel_subscription, sub_id))
            outcome = "canceled"
        else:
            price = seat_price_for(want_plan)
            if price is None:
                _note_sync_error(account, f"no Stripe price for plan {want_plan.code}")
                return "no price"
            result = _stripe_call(
                account,
                partial(
                    stripe_api.update_subscription_item,
                    subscription_id=sub_id,
                    item_id=item_id,
                    price_id=price.stripe_price_id,
                    quantity=want_seats,
                ),
            )
            outcome = f"quantity {want_seats} on {price.stripe_price_id}"
        with transaction.atomic():
            account = BillingAccount.objects.select_for_update().get(tenant_id=tenant_id)
            tenant = Tenant.objects.select_related("plan").get(pk=tenant_id)
            if result is not None:
                _store_subscription_fields(account, result)
            if outcome == "canceled":
                account.stripe_subscription_id = None
                account.stripe_subscription_item_id = ""
                account.subscription_status = "canceled"
            still_current = (
                tenant.plan == want_plan and billable_seats(tenant, account) == want_seats
            )
            account.sync_pending = not still_current
            account.sync_error = ""
            account.save()
            if still_current:
                return outcome
    return "still changing"


def _stripe_call(account: BillingAccount, fn: Any) -> dict[str, Any]:
    try:
        return fn()
    except (stripe_api.StripeUnavailable, stripe_api.StripeRequestError) as exc:
        _note_sync_error(account, str(exc))
        raise


def _note_sync_error(account: BillingAccount, message: str) -> None:
    BillingAccount.objects.filter(pk=account.pk).update(sync_error=message[:500])


def _store_subscription_fields(account: BillingAccount, sub: Mapping[str, Any]) -> None:
    item = _first_item(sub)
    account.stripe_subscription_id = sub["id"]
    account.subscription_status = sub.get("status") or ""
    if item:
        account.stripe_subscription_item_id = item.get("id") or ""
        account.stripe_price_id = _price_id(item)
        account.synced_quantity = int(item.get("quantity") or sub.get("quantity") or 0)


def _first_item(sub: Mapping[str, Any]) -> dict[str, Any] | None:
    items = sub.get("items") or {}
    data = items.get("data") if isinstance(items, Mapping) else None
    return data[0] if data else None


def _price_id(item: Mapping[str, Any]) -> str:
    for key in ("price", "plan"):
        value = item.get(key)
        if isinstance(value, Mapping) and value.get("id"):
            return str(value["id"])
        if isinstance(value, str):
            return value
    return ""


def apply_subscription_state(
    account: BillingAccount,
    sub: Mapping[str, Any],
    *,
    event_created: datetime,
    event_id: str,
) -> str:
    """Adopt a subscription as Stripe reports it, unless a newer state was applied already.

    Changes made in Stripe (Checkout, the customer portal) become Berth's plan and seats.
    If Berth has its own change waiting to be pushed (``sync_pending``), that change wins
    and is pushed again by the sync task.
    """
    with transaction.atomic():
        _lock_tenant(account.tenant)  # tenant before account, everywhere
        account = BillingAccount.objects.select_for_update().get(pk=account.pk)
        if account.subscription_event_at and event_created < account.subscription_event_at:
            return "stale: a newer subscription state was applied already"
        if (
            account.stripe_subscription_id
            and account.stripe_subscription_id != sub["id"]
            and account.subscription_status not in ("canceled", "incomplete_expired")
        ):
            return f"ignored: tenant is on subscription {account.stripe_subscription_id}"
        _store_subscription_fields(account, sub)
        account.subscription_event_at = event_created
        if sub.get("trial_end"):
            account.trial_ends_at = datetime.fromtimestamp(int(sub["trial_end"]), tz=UTC)
        account.save()
        if sub.get("status") in ("canceled", "incomplete_expired"):
            return _subscription_ended(account, event_id)
        if account.sync_pending:
            transaction.on_commit(lambda: _enqueue_sync(account.tenant_id))
            return "Berth has a newer local change; pushing it to Stripe"
        price = PlanPrice.objects.filter(stripe_price_id=account.stripe_price_id).first()
        tenant = _lock_tenant(account.tenant)
        plan = price.plan if price is not None and price.plan is not None else tenant.plan
        seats = int(account.synced_quantity or 0) + account.comp_seats
        if plan == tenant.plan and seats == tenant.seats:
            return "no change"
        before = (tenant.plan.code, tenant.seats)
        try:
            tenant = tenant_services.change_plan(
                tenant, actor=STRIPE_ACTOR, plan=plan, seats=seats, reason="changed in Stripe"
            )
        except BerthError as exc:
            record(
                STRIPE_ACTOR,
                "billing.stripe_change_refused",
                tenant=tenant,
                target=tenant,
                details={"plan": plan.code, "seats": seats, "error": exc.message},
            )
            return f"not applied: {exc.message}"
        _append_ledger(
            tenant,
            SeatLedgerEntry.Kind.STRIPE,
            before=before,
            account=account,
            actor=STRIPE_ACTOR,
            stripe_event_id=event_id,
        )
        return f"applied {plan.code} × {seats}"


def _enqueue_sync(tenant_id: int) -> None:
    from billing.tasks import sync_subscription_task

    sync_subscription_task.delay(tenant_id)


def _subscription_ended(account: BillingAccount, event_id: str) -> str:
    account.stripe_subscription_id = None
    account.stripe_subscription_item_id = ""
    account.sync_pending = False
    account.save()
    tenant = _lock_tenant(account.tenant)
    free = Plan.objects.filter(code="free").first()
    if free is None or tenant.plan == free:
        return "subscription ended"
    before = (tenant.plan.code, tenant.seats)
    seats = free.min_seats + account.comp_seats
    try:
        tenant = tenant_services.change_plan(
            tenant, actor=STRIPE_ACTOR, plan=free, seats=seats, reason="subscription ended"
        )
    except BerthError as exc:
        return _suspend_after_subscription_ended(tenant, exc.message)
    _append_ledger(
        tenant,
        SeatLedgerEntry.Kind.CANCELED,
        before=before,
        account=account,
        actor=STRIPE_ACTOR,
        stripe_event_id=event_id,
    )
    record(STRIPE_ACTOR, "billing.subscription_ended", tenant=tenant, target=tenant)
    return "subscription ended; moved to free"


def _suspend_after_subscription_ended(tenant: Tenant, problem: str) -> str:
    """The subscription ended but the tenant cannot move to Free (more members or usage
    than Free allows). It must not keep the paid plan's quotas for nothing: new work is
    suspended, with notice, until it subscribes again (the next paid invoice lifts the
    suspension, as after dunning) or a platform admin settles it. Running services and
    data are kept."""
    tenant = suspend_for_billing(
        tenant, reason=f"subscription ended; {problem}", actor=STRIPE_ACTOR
    )
    record(
        STRIPE_ACTOR,
        "billing.subscription_ended",
        tenant=tenant,
        target=tenant,
        details={"error": problem, "suspended": True},
    )
    _notify(
        tenant,
        f"Berth: the subscription of {tenant.name} ended",
        f"{tenant.slug} cannot move to the Free plan: {problem}. New deploys, jobs and builds "
        "are refused until you subscribe again. Running services and your data are kept.",
    )
    return f"subscription ended; suspended: {problem}"


def _refuse_unpaid_seats(tenant: Tenant, account: BillingAccount, seats: int, actor: Actor) -> None:
    """More seats on a paid plan are bought through a live subscription (Checkout first);
    only platform admins and the operator's own commands (system actors) may set seats
    without one (comped or invoiced by hand)."""
    if seats <= tenant.seats or tenant.plan.seat_price_cents == 0:
        return
    if account.stripe_subscription_id and account.subscription_status not in (
        "canceled",
        "incomplete_expired",
    ):
        return
    if actor.system is not None or (actor.user is not None and actor.user.is_staff):
        return
    raise CheckoutRequired(
        f"{tenant.slug} has no live subscription: subscribe to {tenant.plan.name} through "
        "Checkout before buying seats",
        details={"plan": tenant.plan.code, "seats": seats, "checkout": "/api/v1/billing/checkout"},
    )


# --------------------------------------------------------------------------- Checkout, portal


def start_checkout(
    tenant: Tenant,
    plan_code: str,
    seats: Any,
    *,
    actor: Actor,
    success_url: str,
    cancel_url: str,
) -> dict[str, str]:
    """A Stripe Checkout link subscribing the tenant to ``plan_code`` with ``seats`` seats."""
    plan = Plan.objects.filter(code=plan_code, is_public=True).first()
    if plan is None or plan.seat_price_cents == 0:
        raise InvalidInput(
            f"{plan_code!r} is not a paid plan you can subscribe to", details={"field": "plan"}
        )
    seats = _validate_seat_count(seats)
    if problem := plan.seats_error(seats):
        raise InvalidInput(problem, details={"field": "seats"})
    if not tenant.is_active and not tenant.status_reason.startswith(BILLING_SUSPENSION_PREFIX):
        tenant_services.ensure_active(tenant)  # suspended for non-payment may still pay
    with transaction.atomic():
        _refuse_if_over_usage(tenant, plan, seats)
    members = tenant.memberships.count()
    if seats < members:
        raise InvalidInput(
            f"{tenant.slug} has {members} members; buy at least that many seats",
            details={"field": "seats", "members": members},
        )
    account = account_for(tenant)
    if account.stripe_subscription_id:
        # A second subscription would charge twice: change the existing one instead.
        raise AlreadySubscribed(
            f"{tenant.slug} already has a subscription; change plan or seats instead",
            details={"subscription_status": account.subscription_status},
        )
    price = seat_price_for(plan)
    if price is None:
        raise BillingUnavailable(f"plan {plan.code} is not in Stripe yet (run sync_stripe_plans)")
    customer_id = ensure_customer(tenant)
    try:
        session = stripe_api.create_checkout_session(
            customer_id=customer_id,
            price_id=price.stripe_price_id,
            quantity=seats,
            success_url=success_url,
            cancel_url=cancel_url,
            metadata={"tenant_id": str(tenant.pk), "plan": plan.code, "seats": str(seats)},
        )
    except stripe_api.StripeUnavailable as exc:
        raise BillingUnavailable(f"Stripe is unreachable: {exc}") from exc
    except stripe_api.StripeRequestError as exc:
        raise BillingRefused(str(exc)) from exc
    record(
        actor,
        "billing.checkout_started",
        tenant=tenant,
        target=tenant,
        details={"plan": plan.code, "seats": seats, "session": session["id"]},
    )
    return {"id": session["id"], "url": session["url"]}


def portal_link(tenant: Tenant, *, return_url: str) -> str:
    customer_id = ensure_customer(tenant)
    try:
        session = stripe_api.create_portal_session(customer_id=customer_id, return_url=return_url)
    except stripe_api.StripeUnavailable as exc:
        raise BillingUnavailable(f"Stripe is unreachable: {exc}") from exc
    return str(session["url"])


def link_checkout(
    account: BillingAccount, session: Mapping[str, Any], *, event_created: datetime, event_id: str
) -> str:
    """checkout.session.completed: attach the new subscription and adopt its state."""
    sub_id = session.get("subscription")
    if not sub_id:
        return "no subscription in session"
    sub = stripe_api.retrieve_subscription(str(sub_id))
    with transaction.atomic():
        _lock_tenant(account.tenant)
        locked = BillingAccount.objects.select_for_update().get(pk=account.pk)
        if not locked.stripe_customer_id and session.get("customer"):
            locked.stripe_customer_id = session["customer"]
        locked.sync_pending = False
        locked.save()
        record(
            STRIPE_ACTOR,
            "billing.checkout_completed",
            tenant=locked.tenant,
            target=locked.tenant,
            details={"session": session.get("id"), "subscription": sub_id},
        )
    return apply_subscription_state(account, sub, event_created=event_created, event_id=event_id)


# --------------------------------------------------------------------------- dunning


def _notify(tenant: Tenant, subject: str, body: str) -> None:
    emails = list(
        tenant.memberships.filter(role__in=[Role.OWNER, Role.BILLING]).values_list(
            "user__email", flat=True
        )
    )
    if emails:
        transaction.on_commit(
            lambda: send_mail(
                subject, body, settings.DEFAULT_FROM_EMAIL, emails, fail_silently=True
            )
        )


@transaction.atomic
def record_payment_failed(
    account: BillingAccount, *, failed_at: datetime, invoice_id: str, now: datetime | None = None
) -> str:
    """An invoice payment failed: past_due with a grace period (first failure only)."""
    now = now or timezone.now()
    account = BillingAccount.objects.select_for_update().get(pk=account.pk)
    if account.last_paid_at and failed_at < account.last_paid_at:
        return "stale: a later payment succeeded"
    if account.last_payment_failed_at is None or failed_at > account.last_payment_failed_at:
        account.last_payment_failed_at = failed_at
    if account.dunning_state != DunningState.OK:
        account.save()
        return f"already {account.dunning_state}"
    grace = timedelta(hours=settings.BILLING_GRACE_PERIOD_HOURS)
    account.dunning_state = DunningState.PAST_DUE
    account.past_due_since = now
    account.grace_ends_at = now + grace
    account.save()
    tenant = account.tenant
    record(
        STRIPE_ACTOR,
        "billing.past_due",
        tenant=tenant,
        target=tenant,
        details={"invoice": invoice_id, "grace_ends_at": account.grace_ends_at.isoformat()},
    )
    _notify(
        tenant,
        f"Berth: payment failed for {tenant.name}",
        f"We could not collect payment for invoice {invoice_id}. Please update your payment "
        f"method before {account.grace_ends_at:%Y-%m-%d %H:%M} UTC, or {tenant.slug} will be "
        "suspended: no new deploys, jobs or builds, and running services stopped after notice. "
        "Your data is kept.",
    )
    return "past_due"


@transaction.atomic
def record_payment_succeeded(
    account: BillingAccount, *, paid_at: datetime, invoice_id: str, now: datetime | None = None
) -> str:
    """An invoice was paid: leave dunning and lift a billing suspension."""
    now = now or timezone.now()
    _lock_tenant(account.tenant)
    account = BillingAccount.objects.select_for_update().get(pk=account.pk)
    if account.last_paid_at is None or paid_at > account.last_paid_at:
        account.last_paid_at = paid_at
    if account.last_payment_failed_at and paid_at < account.last_payment_failed_at:
        account.save()
        return "stale: a later payment failed"
    if account.dunning_state == DunningState.OK:
        account.save()
        return "in good standing"
    was = account.dunning_state
    account.dunning_state = DunningState.OK
    account.past_due_since = account.grace_ends_at = None
    account.suspended_at = account.stop_services_at = None
    account.save()
    tenant = _lock_tenant(account.tenant)
    if tenant.status == TenantStatus.SUSPENDED and tenant.status_reason.startswith(
        BILLING_SUSPENSION_PREFIX
    ):
        tenant_services.reactivate_tenant(
            tenant, reason=f"payment received (invoice {invoice_id})", actor=STRIPE_ACTOR
        )
    record(
        STRIPE_ACTOR,
        "billing.reactivated",
        tenant=tenant,
        target=tenant,
        details={"invoice": invoice_id, "was": was},
    )
    _notify(tenant, f"Berth: payment received for {tenant.name}", "Thank you: all is well again.")
    return f"reactivated from {was}"


def enforce_dunning(now: datetime | None = None) -> dict[str, int]:
    """Suspend tenants whose grace period ran out; stop their services after the notice."""
    now = now or timezone.now()
    counts = {"suspended": 0, "services_stopped": 0}
    due = BillingAccount.objects.filter(dunning_state=DunningState.PAST_DUE, grace_ends_at__lte=now)
    for account_id in due.values_list("pk", flat=True):
        if _suspend_for_nonpayment(account_id, now):
            counts["suspended"] += 1
    stop = BillingAccount.objects.filter(
        dunning_state=DunningState.SUSPENDED,
        stop_services_at__lte=now,
        services_stopped_at__isnull=True,
    )
    for account_id in stop.values_list("pk", flat=True):
        if _stop_services(account_id, now):
            counts["services_stopped"] += 1
    return counts


@transaction.atomic
def _suspend_for_nonpayment(account_id: int, now: datetime) -> bool:
    _lock_tenant(BillingAccount.objects.get(pk=account_id).tenant_id)
    account = BillingAccount.objects.select_for_update().get(pk=account_id)
    if account.dunning_state != DunningState.PAST_DUE or not account.grace_ends_at:
        return False
    if account.grace_ends_at > now:
        return False
    tenant = account.tenant
    since = account.past_due_since or now
    tenant_services.suspend_tenant(
        tenant,
        reason=f"{BILLING_SUSPENSION_PREFIX} payment overdue since {since:%Y-%m-%d}",
        actor=BILLING_ACTOR,
    )
    account.dunning_state = DunningState.SUSPENDED
    account.suspended_at = now
    account.stop_services_at = now + timedelta(hours=settings.BILLING_STOP_SERVICES_AFTER_HOURS)
    account.services_stopped_at = None
    account.save()
    record(
        BILLING_ACTOR,
        "billing.suspended",
        tenant=tenant,
        target=tenant,
        details={"stop_services_at": account.stop_services_at.isoformat()},
    )
    _notify(
        tenant,
        f"Berth: {tenant.name} is suspended for non-payment",
        f"New deploys, jobs and builds are refused. Running services will be stopped at "
        f"{account.stop_services_at:%Y-%m-%d %H:%M} UTC unless payment is received. "
        "Your data is kept.",
    )
    return True


def stop_tenant_services(tenant: Tenant, *, reason: str) -> list[str]:
    """Stop every running service of the tenant (spec, volumes and data are kept); return
    their names. The default ``BILLING_STOP_SERVICES_HOOK``."""
    from workloads.choices import ServiceState
    from workloads.models import Service
    from workloads.services.deploy import stop_service

    stopped = []
    for service in Service.objects.filter(tenant=tenant, state=ServiceState.ACTIVE):
        stop_service(service, actor=BILLING_ACTOR)
        stopped.append(service.name)
    return stopped


@transaction.atomic
def _stop_services(account_id: int, now: datetime) -> bool:
    account = BillingAccount.objects.select_for_update().get(pk=account_id)
    if account.dunning_state != DunningState.SUSPENDED or account.services_stopped_at:
        return False
    hook = import_string(
        getattr(settings, "BILLING_STOP_SERVICES_HOOK", "billing.services.stop_tenant_services")
    )
    stopped = hook(account.tenant, reason="suspended for non-payment")
    account.services_stopped_at = now
    account.save(update_fields=["services_stopped_at", "updated_at"])
    record(
        BILLING_ACTOR,
        "billing.services_stopped",
        tenant=account.tenant,
        target=account.tenant,
        details={"services": list(stopped or [])},
    )
    return True


@transaction.atomic
def suspend_for_billing(tenant: Tenant, *, reason: str, actor: Actor) -> Tenant:
    """Suspend for a billing reason (lifted by the next payment): a platform admin's
    decision, or a subscription that ended with more than Free allows."""
    tenant = tenant_services.suspend_tenant(
        tenant, reason=f"{BILLING_SUSPENSION_PREFIX} {reason}", actor=actor
    )
    account = _locked_account(tenant)
    account.dunning_state = DunningState.SUSPENDED
    account.suspended_at = timezone.now()
    account.save()
    return tenant


@transaction.atomic
def reactivate_by_admin(tenant: Tenant, *, reason: str, actor: Actor) -> Tenant:
    tenant = tenant_services.reactivate_tenant(tenant, reason=reason, actor=actor)
    account = _locked_account(tenant)
    account.dunning_state = DunningState.OK
    account.past_due_since = account.grace_ends_at = None
    account.suspended_at = account.stop_services_at = account.services_stopped_at = None
    account.save()
    return tenant


# --------------------------------------------------------------------------- credits


@transaction.atomic
def grant_credit(tenant: Tenant, amount_cents: Any, *, reason: str, actor: Actor) -> CreditGrant:
    """Credit taken off the tenant's next invoice (pushed to Stripe after commit)."""
    if isinstance(amount_cents, bool) or not isinstance(amount_cents, int):
        raise InvalidInput("amount must be whole cents", details={"field": "amount_cents"})
    if amount_cents <= 0 or amount_cents > 10_000_000:
        raise InvalidInput(
            "amount must be between 1 and 10000000 cents", details={"field": "amount_cents"}
        )
    if not reason.strip():
        raise InvalidInput("a reason is required", details={"field": "reason"})
    grant = CreditGrant.objects.create(
        tenant=tenant, amount_cents=amount_cents, reason=reason, granted_by=actor.label[:200]
    )
    record(
        actor,
        "billing.credit_granted",
        tenant=tenant,
        target=tenant,
        details={"amount_cents": amount_cents, "reason": reason},
    )

    def enqueue() -> None:
        from billing.tasks import push_credit_task

        push_credit_task.delay(grant.pk)

    transaction.on_commit(enqueue)
    return grant


def push_credit(grant_id: int) -> str:
    grant = CreditGrant.objects.select_related("tenant").get(pk=grant_id)
    if grant.stripe_invoice_item_id:
        return "already in Stripe"
    customer_id = ensure_customer(grant.tenant)
    item = stripe_api.add_invoice_credit(
        customer_id=customer_id,
        amount_cents=grant.amount_cents,
        currency=settings.BILLING_CURRENCY,
        description=f"Credit: {grant.reason}"[:200],
        idempotency_key=f"berth-credit-{grant.pk}",
    )
    CreditGrant.objects.filter(pk=grant.pk).update(stripe_invoice_item_id=item["id"])
    return str(item["id"])


# --------------------------------------------------------------------------- usage metering


def record_reading(tenant: Tenant, source: str, reading: metering.Reading) -> bool:
    """Store one cgroup reading once; False when it was already seen or is older than the
    newest reading of that container (its usage is then already counted)."""
    read_at = datetime.fromtimestamp(reading.at, tz=UTC)
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"usage:{source}"])
        latest = UsageReading.objects.filter(source=source).order_by("-read_at").first()
        if latest is not None and latest.read_at >= read_at:
            return False
        previous = (
            metering.Reading(
                at=latest.read_at.timestamp(),
                cpu_usage_ns=latest.cpu_usage_ns,
                memory_bytes=latest.memory_bytes,
                gpus=latest.gpus,
                storage_bytes=latest.storage_bytes,
            )
            if latest is not None
            else None
        )
        used = metering.contribution(previous, reading)
        try:
            with transaction.atomic():
                UsageReading.objects.create(
                    tenant=tenant,
                    source=source,
                    read_at=read_at,
                    cpu_usage_ns=reading.cpu_usage_ns,
                    memory_bytes=reading.memory_bytes,
                    gpus=reading.gpus,
                    storage_bytes=reading.storage_bytes,
                    cpu_seconds_used=used.cpu_seconds,
                    memory_gib_hours_used=used.memory_gib_hours,
                    gpu_hours_used=used.gpu_hours,
                    storage_gib_hours_used=used.storage_gib_hours,
                )
        except IntegrityError:
            return False
    return True


def record_container_usage(
    tenant: Tenant,
    *,
    node_id: str,
    container_id: str,
    at: datetime,
    cpu_seconds: float,
    memory_bytes: int,
    gpus: int = 0,
    storage_bytes: int = 0,
) -> bool:
    """Meter one container's stats from a node report (``protocol.ContainerReport``).

    For the workloads app to call per known container while handling a node report:
    ``cpu_seconds`` is the cgroup's cumulative CPU time, ``memory_bytes`` current usage.
    """
    return record_reading(
        tenant,
        f"{node_id}/{container_id}",
        metering.Reading(
            at=at.timestamp(),
            cpu_usage_ns=round(cpu_seconds * 1_000_000_000),
            memory_bytes=memory_bytes,
            gpus=gpus,
            storage_bytes=storage_bytes,
        ),
    )


def record_build(
    tenant: Tenant, build_id: str, *, started_at: datetime, finished_at: datetime
) -> bool:
    """Count a finished build's minutes once."""
    if finished_at < started_at:
        raise InvalidInput(
            "a build cannot finish before it starts", details={"field": "finished_at"}
        )
    minutes = Decimal(str((finished_at - started_at).total_seconds())) / 60
    _, created = BuildUsage.objects.get_or_create(
        build_id=build_id,
        defaults={
            "tenant": tenant,
            "finished_at": finished_at,
            "minutes": minutes.quantize(Decimal("0.000001")),
        },
    )
    return created


def hour_start(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def aggregate_hour(tenant_id: int, hour: datetime) -> dict[str, Decimal]:
    """Recompute one tenant-hour of the usage ledger from its readings (idempotent)."""
    hour = hour_start(hour)
    end = hour + timedelta(hours=1)
    sums = UsageReading.objects.filter(
        tenant_id=tenant_id, read_at__gte=hour, read_at__lt=end
    ).aggregate(
        cpu_seconds=Sum("cpu_seconds_used"),
        memory_gib_hours=Sum("memory_gib_hours_used"),
        gpu_hours=Sum("gpu_hours_used"),
        storage_gib_hours=Sum("storage_gib_hours_used"),
    )
    sums["build_minutes"] = BuildUsage.objects.filter(
        tenant_id=tenant_id, finished_at__gte=hour, finished_at__lt=end
    ).aggregate(total=Sum("minutes"))["total"]
    totals = {metric: sums.get(metric) or Decimal(0) for metric in metering.METRICS}
    with transaction.atomic():
        for metric, quantity in totals.items():
            if quantity == 0:
                UsageLedgerEntry.objects.filter(
                    tenant_id=tenant_id, hour=hour, metric=metric
                ).delete()
                continue
            UsageLedgerEntry.objects.update_or_create(
                tenant_id=tenant_id, hour=hour, metric=metric, defaults={"quantity": quantity}
            )
    return totals


def aggregate_pending_usage(batch: int = 5000) -> int:
    """Bring the usage ledger up to date: recompute every tenant-hour that has readings or
    builds not counted yet (late ones and catch-up after downtime included), then mark
    exactly those rows counted. Returns the number of tenant-hours recomputed."""
    done = 0
    for model, when in ((UsageReading, "read_at"), (BuildUsage, "finished_at")):
        while True:
            rows = list(
                model.objects.filter(aggregated=False)
                .order_by("id")
                .values_list("id", "tenant_id", when)[:batch]
            )
            if not rows:
                break
            hours = sorted({(tenant_id, hour_start(at)) for _, tenant_id, at in rows})
            for tenant_id, hour in hours:
                aggregate_hour(tenant_id, hour)
            model.objects.filter(id__in=[r[0] for r in rows]).update(aggregated=True)
            done += len(hours)
    return done


def month_start(moment: datetime) -> datetime:
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _next_month(start: datetime) -> datetime:
    return (start + timedelta(days=32)).replace(day=1)


def month_usage(tenant: Tenant, now: datetime) -> dict[str, Decimal]:
    start = month_start(now)
    rows = (
        UsageLedgerEntry.objects.filter(tenant=tenant, hour__gte=start, hour__lt=_next_month(start))
        .values("metric")
        .annotate(total=Sum("quantity"))
    )
    return {row["metric"]: row["total"] for row in rows}


def estimate(tenant: Tenant, now: datetime | None = None) -> dict[str, Any]:
    """The month-to-date bill: seats, usage above what they include, credits, spend cap."""
    now = now or timezone.now()
    tenant = Tenant.objects.select_related("plan").get(pk=tenant.pk)
    account = account_for(tenant)
    paid = billable_seats(tenant, account)
    seat_cents = tenant.plan.seat_price_cents * paid
    included = metering.included_usage(
        tenant.plan.code, tenant.plan.build_minutes_month, tenant.seats
    )
    charges = metering.overage_charges(month_usage(tenant, now), included)
    overage_cents = metering.whole_cents(sum((c.cents for c in charges), Decimal(0)))
    start = month_start(now)
    credits = (
        CreditGrant.objects.filter(tenant=tenant, created_at__gte=start).aggregate(
            total=Sum("amount_cents")
        )["total"]
        or 0
    )
    billable_overage = overage_cents
    cap = account.spend_cap_cents
    if cap is not None:
        billable_overage = min(overage_cents, max(0, cap - seat_cents))
    total = max(0, seat_cents + billable_overage - credits)
    return {
        "month": start.date().isoformat(),
        "plan": tenant.plan.code,
        "seats": tenant.seats,
        "paid_seats": paid,
        "comp_seats": account.comp_seats,
        "seat_price_cents": tenant.plan.seat_price_cents,
        "seats_cents": seat_cents,
        "usage": [
            {
                "metric": c.metric,
                "unit": metering.METRIC_UNITS[c.metric],
                "used": str(c.used),
                "included": str(c.included),
                "overage": str(c.overage),
                "cents": metering.whole_cents(c.cents),
            }
            for c in charges
        ],
        "overage_cents": overage_cents,
        "overage_billed_cents": billable_overage,
        "credits_cents": credits,
        "total_cents": total,
        "currency": settings.BILLING_CURRENCY,
        "spend_cap": spend_cap_status(account, seat_cents + overage_cents),
    }


def spend_cap_status(account: BillingAccount, spend_cents: int) -> dict[str, Any]:
    cap = account.spend_cap_cents
    if cap is None:
        return {"cap_cents": None, "state": "none"}
    warn_at = cap * settings.BILLING_SPEND_CAP_WARN_PERCENT // 100
    state = "reached" if spend_cents >= cap else "warning" if spend_cents >= warn_at else "ok"
    return {"cap_cents": cap, "warn_at_cents": warn_at, "spend_cents": spend_cents, "state": state}


@transaction.atomic
def set_spend_cap(tenant: Tenant, cap_cents: Any, *, actor: Actor) -> BillingAccount:
    """Set the monthly cap (None removes it). It may not be below the seats' own price."""
    if cap_cents is not None:
        if isinstance(cap_cents, bool) or not isinstance(cap_cents, int):
            raise InvalidInput("cap must be whole cents or null", details={"field": "cap_cents"})
        if cap_cents < 0 or cap_cents > 100_000_000_00:
            raise InvalidInput("cap is out of range", details={"field": "cap_cents"})
    tenant = _lock_tenant(tenant)
    account = _locked_account(tenant)
    seat_cents = tenant.plan.seat_price_cents * billable_seats(tenant, account)
    if cap_cents is not None and cap_cents < seat_cents:
        raise InvalidInput(
            f"the cap must cover the seats themselves ({seat_cents} cents a month)",
            details={"field": "cap_cents", "minimum": seat_cents},
        )
    old = account.spend_cap_cents
    account.spend_cap_cents = cap_cents
    account.spend_cap_warned_month = None
    account.save()
    record(
        actor, "billing.spend_cap", tenant=tenant, target=tenant, details={"cap": [old, cap_cents]}
    )
    return account


def check_new_usage_allowed(tenant: Tenant, kind: str, now: datetime | None = None) -> None:
    """Call before admitting new usage (a deploy, a job, a build).

    Raises :class:`tenants.errors.TenantSuspended` for a suspended tenant and
    :class:`SpendCapReached` when the month's spend has reached the cap. Running services
    are not touched by the cap: it only refuses *new* usage.
    """
    tenant_services.ensure_active(tenant)
    account = account_for(tenant)
    if account.spend_cap_cents is None:
        return
    est = estimate(tenant, now)
    status = est["spend_cap"]
    if status["state"] == "reached":
        raise SpendCapReached(
            f"{tenant.slug} has reached its monthly spend cap of {status['cap_cents']} cents "
            f"(estimated {status['spend_cents']} cents); new {kind} is refused until the cap is "
            "raised or the month ends. Running services keep running.",
            details={
                "kind": kind,
                "cap_cents": status["cap_cents"],
                "spend_cents": status["spend_cents"],
            },
        )


def warn_spend_caps(now: datetime | None = None) -> int:
    """Email and audit once a month when a tenant's spend passes the warning threshold."""
    now = now or timezone.now()
    month: date = month_start(now).date()
    warned = 0
    for account in BillingAccount.objects.filter(spend_cap_cents__isnull=False).select_related(
        "tenant"
    ):
        if account.spend_cap_warned_month == month:
            continue
        status = estimate(account.tenant, now)["spend_cap"]
        if status["state"] not in ("warning", "reached"):
            continue
        with transaction.atomic():
            updated = (
                BillingAccount.objects.filter(pk=account.pk)
                .exclude(spend_cap_warned_month=month)
                .update(spend_cap_warned_month=month)
            )
            if not updated:
                continue
            record(
                BILLING_ACTOR, "billing.spend_cap_warning", tenant=account.tenant, details=status
            )
            _notify(
                account.tenant,
                f"Berth: {account.tenant.name} is near its spend cap",
                f"Estimated spend this month: {status['spend_cents']} cents of a "
                f"{status['cap_cents']} cents cap. At the cap, new deploys, jobs and builds "
                "are refused; running services keep running.",
            )
        warned += 1
    return warned


def report_overage(tenant_id: int, now: datetime | None = None) -> int:
    """Report the month's billable overage to Stripe; returns the cents newly reported.

    The figure sent is cumulative-minus-reported, with an identifier naming the new
    cumulative total, written to ``pending_cents`` before the call: a crash or a retry
    re-sends the very same event, which Stripe counts once.
    """
    now = now or timezone.now()
    tenant = Tenant.objects.select_related("plan").get(pk=tenant_id)
    account = account_for(tenant)
    if not account.stripe_customer_id:
        return 0
    month = month_start(now).date()
    target = estimate(tenant, now)["overage_billed_cents"]
    with transaction.atomic():
        report, _ = UsageReport.objects.select_for_update().get_or_create(
            tenant=tenant, month=month
        )
        if report.pending_cents is None:
            if target <= report.reported_cents:
                return 0
            report.pending_cents = target
            report.save()
        pending, reported = report.pending_cents, report.reported_cents
    stripe_api.report_meter_event(
        event_name=OVERAGE_METER_EVENT,
        customer_id=str(account.stripe_customer_id),
        value=pending - reported,
        identifier=f"berth-{tenant_id}-{month:%Y-%m}-{pending}",
        timestamp=int(now.timestamp()),
    )
    UsageReport.objects.filter(pk=report.pk, pending_cents=pending).update(
        reported_cents=pending, pending_cents=None
    )
    return pending - reported


def tenant_for_customer(customer_id: str | None) -> BillingAccount:
    account = (
        BillingAccount.objects.filter(stripe_customer_id=customer_id).first()
        if customer_id
        else None
    )
    if account is None:
        raise NotFound(f"no tenant has Stripe customer {customer_id!r}")
    return account
