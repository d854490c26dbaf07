"""What images and snapshots existing containers use, so rmi and prune spare them.

The runtime owns container records; this reads them through ``agent.containers`` when
the runtime is present, so images never imports the runtime's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime_agent.agent import Agent


@dataclass
class InUse:
    image_ids: set[str] = field(default_factory=set)  # config digests
    manifests: set[str] = field(default_factory=set)
    snapshot_keys: set[str] = field(default_factory=set)
    known: bool = False  # False when there is no runtime to ask (then nothing is pruned)


def containers_in_use(agent: Agent) -> InUse:
    """Images and snapshot keys of every container on the node, of every tenant."""
    result = InUse()
    manager = getattr(agent, "containers", None)
    lister = getattr(manager, "all_records", None) or getattr(manager, "list_all", None)
    if lister is None:
        return result
    for record in lister():
        _collect(record, result)
    result.known = True
    return result


def _collect(record: Any, result: InUse) -> None:
    def get(name: str) -> Any:
        if isinstance(record, dict):
            return record.get(name)
        return getattr(record, name, None)

    for name in ("image_id", "config_digest"):
        value = get(name)
        if isinstance(value, str):
            result.image_ids.add(value)
    value = get("manifest_digest")
    if isinstance(value, str):
        result.manifests.add(value)
    for name in ("snapshot_key", "id"):
        value = get(name)
        if isinstance(value, str):
            result.snapshot_keys.add(value)
