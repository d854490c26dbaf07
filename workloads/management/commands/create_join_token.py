"""Print a one-time token a new node joins with: ``berth-agent join URL TOKEN``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tenants.services import Actor
from workloads.services.nodes import create_join_token


class Command(BaseCommand):
    help = "Create a one-time node join token and print it on the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--ttl", type=int, default=3600, help="seconds the token stays valid (default 3600)"
        )
        parser.add_argument(
            "--label",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="label the joining node gets (repeatable)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["ttl"] < 1:
            raise CommandError("--ttl must be at least 1 second")
        labels = {}
        for item in options["label"]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise CommandError(f"--label must be KEY=VALUE, got {item!r}")
            labels[key] = value
        token, secret = create_join_token(
            actor=Actor.for_system("create_join_token"),
            ttl=timedelta(seconds=options["ttl"]),
            labels=labels,
        )
        self.stdout.write(f"join token valid until {token.expires_at:%Y-%m-%d %H:%M:%S %Z}:")
        self.stdout.write(secret)
