from __future__ import annotations

from django.apps import AppConfig


class WorkloadsConfig(AppConfig):
    name = "workloads"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_delete

        from workloads.models import Node
        from workloads.services.broker import on_node_deleted

        # A removed node loses its broker user (workloads.services.broker).
        post_delete.connect(on_node_deleted, sender=Node, dispatch_uid="node-broker-user")
