"""Node names become unique (#27 item 4): a node joining under a running node's name took
over its registry credential. Existing duplicates keep their first-joined node's name;
the others get their id's first 8 characters appended, so the constraint can be added."""

from __future__ import annotations

from typing import Any

from django.db import migrations, models


def rename_duplicates(apps: Any, schema_editor: Any) -> None:
    Node = apps.get_model("workloads", "Node")
    seen: set[str] = set()
    for node in Node.objects.order_by("joined_at", "id"):
        if node.name in seen:
            node.name = f"{node.name[:91]}-{str(node.id)[:8]}"
            node.save(update_fields=["name"])
        seen.add(node.name)


class Migration(migrations.Migration):
    dependencies = [
        ("workloads", "0003_resolved_images"),
    ]

    operations = [
        migrations.RunPython(rename_duplicates, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="node",
            name="name",
            field=models.CharField(max_length=100, unique=True),
        ),
    ]
