"""Node registry credentials keyed by node id (#27 item 4): a credential of a joined node
names that node's id; existing ones are linked to the node of their name."""

from __future__ import annotations

from typing import Any

from django.db import migrations, models


def link_to_nodes(apps: Any, schema_editor: Any) -> None:
    NodeCredential = apps.get_model("registry", "NodeCredential")
    Node = apps.get_model("workloads", "Node")
    ids = dict(Node.objects.values_list("name", "id"))
    for credential in NodeCredential.objects.all():
        if credential.node_name in ids:
            credential.node_id = ids[credential.node_name]
            credential.save(update_fields=["node_id"])


class Migration(migrations.Migration):
    dependencies = [
        ("registry", "0002_accounting_real_sizes"),
        ("workloads", "0004_node_name_unique"),
    ]

    operations = [
        migrations.AddField(
            model_name="nodecredential",
            name="node_id",
            field=models.UUIDField(blank=True, null=True, unique=True),
        ),
        migrations.RunPython(link_to_nodes, migrations.RunPython.noop),
    ]
