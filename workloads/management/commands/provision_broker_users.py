"""(Re)create the broker users of existing nodes and remove those of removed nodes.

For nodes that joined before per-node broker users existed (they hold the control
plane's own broker URL), or to rotate a node's broker password: prints, per node, the
broker URL to put into that node's ``node.json`` (``broker_url``) before restarting its
worker. The URLs carry passwords: run it where only the operator reads the output.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from workloads.models import Node
from workloads.services import broker


class Command(BaseCommand):
    help = (
        "Create or rotate nodes' Redis ACL users (prints each node's new broker URL) and "
        "remove the users of nodes that no longer exist."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--node", action="append", default=[], metavar="ID", help="only this node (repeatable)"
        )
        parser.add_argument(
            "--prune-only",
            action="store_true",
            help="only remove users of removed nodes; rotate nothing",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        nodes = Node.objects.order_by("name")
        if options["node"]:
            nodes = nodes.filter(pk__in=options["node"])
        for stale in broker.stale_users(Node.objects.values_list("pk", flat=True)):
            broker.revoke_node(stale.removeprefix("node-"))
            self.stdout.write(f"removed {stale}")
        if options["prune_only"]:
            return
        for node in nodes:
            url = broker.provision_node(node.pk)
            self.stdout.write(f"{node.name} ({node.pk}): {url}")
