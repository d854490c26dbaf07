"""``manage.py create_tenant SLUG --owner EMAIL [--plan P] [--seats N]``.

Creates a tenant and its owner (the user too, if new) and prints a new admin-scope API
token on the last line, so scripts can do ``TOKEN=$(manage.py create_tenant … | tail -1)``.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tenants import services
from tenants.choices import Scope
from tenants.errors import BerthError


class Command(BaseCommand):
    help = "Create a tenant with an owner; print an admin-scope API token on the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug", help="lowercase letters, digits and '-', 1-63 characters")
        parser.add_argument("--owner", required=True, help="owner's email (created if new)")
        parser.add_argument("--plan", default="free", help="plan code (default: free)")
        parser.add_argument("--seats", type=int, default=None, help="default: plan minimum")
        parser.add_argument("--name", default=None, help="display name (default: the slug)")

    def handle(self, *args: Any, **options: Any) -> None:
        actor = services.Actor.for_system("create_tenant")
        try:
            tenant, owner = services.create_tenant(
                slug=options["slug"],
                owner_email=options["owner"],
                name=options["name"],
                plan_code=options["plan"],
                seats=options["seats"],
                actor=actor,
            )
            _, secret = services.create_api_token(
                tenant, owner, name="create_tenant", scope=Scope.ADMIN, actor=actor
            )
        except BerthError as exc:
            raise CommandError(exc.message) from None
        self.stderr.write(
            f"Created tenant {tenant.slug} ({tenant.plan.name}, {tenant.seats} seat(s)) "
            f"owned by {owner.email}. Admin-scope API token (shown once):"
        )
        self.stdout.write(secret)
