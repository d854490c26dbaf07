"""Mint (or rotate) a node's registry credential and print the secret once.

    python manage.py registry_node_credential NODE_NAME | \\
        berth-agent login HOST -u node-NODE_NAME --password-stdin
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from registry import services
from tenants.errors import BerthError
from tenants.services import Actor


class Command(BaseCommand):
    help = "Create or rotate the registry credential of a node; prints the secret."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("node_name")
        parser.add_argument("--revoke", action="store_true", help="revoke instead")

    def handle(self, *args: Any, **options: Any) -> None:
        actor = Actor.for_system("manage.py registry_node_credential")
        if options["revoke"]:
            revoked = services.revoke_node_credential(options["node_name"], actor=actor)
            self.stderr.write("revoked" if revoked else "no active credential")
            return
        try:
            _, secret = services.create_node_credential(options["node_name"], actor=actor)
        except BerthError as exc:  # a joined node's credential is not minted by name
            raise CommandError(exc.message) from None
        self.stdout.write(secret)
