"""Create Berth's plans in Stripe: one product per plan, one per-seat monthly price each,
and the metered overage price. Safe to run any number of times."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from billing import stripe_api
from billing.models import Plan, PlanPrice
from billing.services import OVERAGE_METER_EVENT

OVERAGE_PRODUCT = "berth_usage_overage"


def seat_lookup_key(plan: Plan) -> str:
    """Prices are immutable: a new amount means a new key (and a new price)."""
    return f"berth_{plan.code}_seat_monthly_{plan.currency}_{plan.seat_price_cents}"


class Command(BaseCommand):
    help = "Create or find Stripe products and per-seat monthly prices for every plan."

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            for plan in Plan.objects.all():
                if plan.seat_price_cents == 0:
                    self.stdout.write(f"{plan.code}: free, nothing to sell")
                    continue
                product_id = f"berth_plan_{plan.code}"
                stripe_api.ensure_product(
                    product_id, f"Berth {plan.name}", {"berth_plan": plan.code}
                )
                self._price(
                    plan,
                    product_id,
                    seat_lookup_key(plan),
                    plan.seat_price_cents,
                    plan.currency,
                    "licensed",
                )
            stripe_api.ensure_product(
                OVERAGE_PRODUCT, "Berth usage above plan", {"meter": OVERAGE_METER_EVENT}
            )
            self._price(
                None,
                OVERAGE_PRODUCT,
                f"berth_overage_cents_{settings.BILLING_CURRENCY}",
                1,
                settings.BILLING_CURRENCY,
                "metered",
            )
        except stripe_api.StripeUnavailable as exc:
            raise CommandError(f"Stripe is unreachable: {exc}") from exc
        except stripe_api.StripeRequestError as exc:
            raise CommandError(f"Stripe refused: {exc}") from exc

    def _price(
        self,
        plan: Plan | None,
        product_id: str,
        lookup_key: str,
        amount: int,
        currency: str,
        usage_type: str,
    ) -> None:
        price, created = stripe_api.ensure_monthly_price(
            product_id=product_id,
            lookup_key=lookup_key,
            unit_amount=amount,
            currency=currency,
            usage_type=usage_type,
        )
        PlanPrice.objects.update_or_create(
            lookup_key=lookup_key,
            defaults={
                "plan": plan,
                "stripe_price_id": price["id"],
                "stripe_product_id": product_id,
                "unit_amount_cents": amount,
                "usage_type": usage_type,
            },
        )
        verb = "created" if created else "exists"
        self.stdout.write(f"{lookup_key}: {verb} {price['id']}")
