"""Apply every repository's retention policy, then garbage-collect the registry storage."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from registry import services
from tenants.services import Actor


class Command(BaseCommand):
    help = "Apply retention policies and run docker-registry garbage-collect."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true")
        parser.add_argument("--skip-retention", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        actor = Actor.for_system("manage.py registry_gc")
        if not options["skip_retention"] and not options["dry_run"]:
            for repo, removed in services.apply_all_retention(actor=actor).items():
                self.stdout.write(f"{repo}: removed {removed}")
        run = services.run_garbage_collection(dry_run=options["dry_run"], actor=actor)
        self.stdout.write(
            f"gc {'(dry run) ' if run.dry_run else ''}eligible blobs {run.blobs_eligible}, "
            f"manifests {run.manifests_eligible}, bytes freed {run.bytes_freed}"
        )
        if not run.succeeded:
            raise CommandError(f"garbage-collect failed:\n{run.output[-2000:]}")
