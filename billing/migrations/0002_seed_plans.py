"""Seed the Free, Pro, Team and Business plans from billing.plans.DEFAULT_PLANS.

Existing rows (matched by code) are left alone so admin edits survive re-running.
"""

from django.db import migrations


def seed_plans(apps, schema_editor):
    from billing.plans import DEFAULT_PLANS

    Plan = apps.get_model("billing", "Plan")
    # Quotas added by later migrations (0005) are not fields of the model at this point.
    fields = {f.name for f in Plan._meta.get_fields()}
    for order, plan in enumerate(DEFAULT_PLANS):
        Plan.objects.get_or_create(
            code=plan.code,
            defaults={
                "name": plan.name,
                "seat_price_cents": plan.seat_price_cents,
                "min_seats": plan.min_seats,
                "max_seats": plan.max_seats,
                "sort_order": order,
                **{k: v for k, v in plan.per_seat.items() if k in fields},
            },
        )


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]

    operations = [migrations.RunPython(seed_plans, migrations.RunPython.noop)]
