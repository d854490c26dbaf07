"""A volume on real agents: pinned to the node of its first container, its data seen by a
later service there, removed from the node when deleted."""

from __future__ import annotations

import pytest

from runtime_agent.errors import NotFound
from tests.e2e.conftest import Cluster, agent_api, wait_for
from tests.e2e.test_dispatch import _client, _running_nodes, _service

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(600)]


def test_volume_data_follows_its_node(cluster: Cluster) -> None:
    client = _client("e2ev")
    base = "/api/v1/tenants/e2ev"
    assert (
        client.post(f"{base}/volumes/", {"name": "data", "size_gib": 1}, format="json").status_code
        == 201
    )
    assert client.post(f"{base}/networks/", {"name": "back"}, format="json").status_code == 201
    writer = client.post(
        f"{base}/services/",
        {
            "name": "writer",
            "image": "busybox",
            "command": ["sh", "-c", "echo kept-on-the-volume > /data/file; exec sleep 100000"],
            "volumes": [{"name": "data", "target": "/data"}],
            "networks": ["back"],
            "memory_mib": 32,
        },
        format="json",
    )
    assert writer.status_code == 201, writer.content
    try:
        (node,) = wait_for(
            lambda: _running_nodes(client, "e2ev", "writer"), timeout=90, what="writer"
        )
    except AssertionError:
        raise AssertionError(f"not running: {_service(client, 'e2ev', 'writer')}") from None
    assert client.get(f"{base}/volumes/data/").json()["node"] == node
    # The node made it with its size: its own filesystem.
    volume = agent_api(cluster.agent_named(node)).volumes.get("e2ev", "data")
    assert volume.size_bytes == 1024**3

    # Two replicas of a reader would spread over both nodes; the volume keeps them on one.
    reader = client.post(
        f"{base}/services/",
        {
            "name": "reader",
            "image": "busybox",
            "command": ["sh", "-c", "cat /data/file; exec sleep 100000"],
            "volumes": [{"name": "data", "target": "/data", "read_only": True}],
            "replicas": 2,
            "memory_mib": 32,
        },
        format="json",
    )
    assert reader.status_code == 201, reader.content
    nodes = wait_for(lambda: _running_nodes(client, "e2ev", "reader"), timeout=90, what="reader")
    assert nodes == [node, node]

    def output() -> str | None:
        lines = client.get(f"{base}/services/reader/logs/").json()["lines"]
        text = "".join(line["line"] for line in lines)
        return text if text.count("kept-on-the-volume") == 2 else None

    wait_for(output, timeout=30, what="the readers' output")
    refused = client.delete(f"{base}/volumes/data/")
    assert refused.status_code == 409
    assert client.delete(f"{base}/networks/back/").status_code == 409

    for name in ("writer", "reader"):
        assert client.delete(f"{base}/services/{name}/").status_code == 204

    def deleted() -> bool:
        return client.delete(f"{base}/volumes/data/").status_code == 204

    wait_for(deleted, timeout=60, what="the volume to be free and deleted")
    assert client.delete(f"{base}/networks/back/").status_code == 204

    def gone_from_node() -> bool:
        try:
            agent_api(cluster.agent_named(node)).volumes.get("e2ev", "data")
        except NotFound:
            return True
        return False

    wait_for(gone_from_node, timeout=30, what="the volume's removal on its node")
