"""``manage.py bootstrap_demo``: the demo tenant ``infra/run.sh`` prints at start-up.

Idempotent: creates the ``demo`` tenant (Team plan, 5 seats) and its owner when missing,
then sets a fresh random password, revokes the previous demo tokens and mints a fresh
admin-scope token, and prints login, password and token.
"""

from __future__ import annotations

import secrets
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from tenants import services
from tenants.choices import Role, Scope
from tenants.models import APIToken, Membership, Tenant

DEMO_LABEL = "bootstrap_demo"


class Command(BaseCommand):
    help = "Create or refresh the demo tenant and print its owner's login, password and token."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--slug", default="demo")
        parser.add_argument("--email", default="demo@example.com")
        parser.add_argument("--plan", default="team")
        parser.add_argument("--seats", type=int, default=5)

    def handle(self, *args: Any, **options: Any) -> None:
        actor = services.Actor.for_system("bootstrap_demo")
        password = secrets.token_urlsafe(12)
        with transaction.atomic():
            tenant = Tenant.objects.filter(slug=options["slug"]).first()
            if tenant is None:
                tenant, owner = services.create_tenant(
                    slug=options["slug"],
                    name="Demo",
                    owner_email=options["email"],
                    plan_code=options["plan"],
                    seats=options["seats"],
                    actor=actor,
                )
            else:
                owner, _ = services.get_or_create_user(options["email"])
                if not Membership.objects.filter(tenant=tenant, user=owner).exists():
                    Membership.objects.create(tenant=tenant, user=owner, role=Role.OWNER)
            if not tenant.is_active:
                # The demo must be usable after every start; say so instead of failing.
                services.reactivate_tenant(tenant, reason="bootstrap_demo", actor=actor)
                self.stderr.write(f"Reactivated the suspended demo tenant {tenant.slug}.")
            owner.set_password(password)
            owner.save(update_fields=["password"])
            for old in APIToken.objects.filter(
                tenant=tenant, user=owner, name=DEMO_LABEL, revoked_at__isnull=True
            ):
                services.revoke_api_token(old, actor=actor)
            _, token = services.create_api_token(
                tenant, owner, name=DEMO_LABEL, scope=Scope.ADMIN, actor=actor
            )
        base = settings.BERTH_PUBLIC_URL.rstrip("/")
        self.stdout.write(
            "\n".join(
                [
                    f"Demo tenant: {tenant.slug} ({tenant.plan.name}, {tenant.seats} seats)",
                    f"Login:       {owner.username}",
                    f"Password:    {password}",
                    f"API token:   {token}",
                    f"Try:         curl -H 'Authorization: Bearer {token}' {base}/api/v1/me/",
                ]
            )
        )
