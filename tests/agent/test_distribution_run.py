"""An image pushed by skopeo, pulled by the agent, runs in a container (runc + overlayfs)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.config import AgentConfig
from runtime_agent.distribution import pull
from tests.agent.test_runtime_fixtures import cleanup_agent, needs_runtime, spec
from tests.registry_process import (
    RegistryProcess,
    busybox_layers,
    needs_registry,
    skopeo,
    start_registry,
    write_oci_layout,
)

pytestmark = [*needs_runtime, needs_registry]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    process = start_registry(tmp_path / "registry", auth=False)
    yield process
    process.stop()


@pytest.fixture
def node(agent_config: AgentConfig) -> Iterator[Agent]:
    agent = Agent(agent_config)
    try:
        yield agent
    finally:
        cleanup_agent(agent)


def test_pulled_image_runs(node: Agent, registry: RegistryProcess, tmp_path: Path) -> None:
    write_oci_layout(
        tmp_path / "img",
        busybox_layers({"etc/motd": b"hello from a pushed image\n"}),
        cmd=["/bin/busybox", "cat", "/etc/motd", "/etc/berth-test"],
    )
    ref = f"{registry.host}/acme/hello:1"
    pushed = skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'img'}", f"docker://{ref}")
    assert pushed.returncode == 0, pushed.stderr

    pull(node, "acme", ref)
    info = node.containers.run(spec(None, tenant="acme", image=ref))

    assert node.containers.wait("acme", info.id, timeout=30) == 0
    lines = [e.line for e in node.containers.logs("acme", info.id)]
    assert lines == [b"hello from a pushed image", b"pulled from the registry"]
