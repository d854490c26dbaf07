"""``berth-agent network ...`` end to end through the CLI entry point."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator

import pytest

from runtime_agent.cli.main import main
from runtime_agent.config import AgentConfig
from runtime_agent.network import NetworkManager
from runtime_agent.protocol import NetworkAttachment

pytestmark = pytest.mark.privileged


@pytest.fixture
def cli_env(agent_config: AgentConfig, monkeypatch: pytest.MonkeyPatch) -> Iterator[NetworkManager]:
    monkeypatch.setenv("BERTH_ROOT", str(agent_config.root))
    monkeypatch.setenv("BERTH_RUN_ROOT", str(agent_config.run_root))
    monkeypatch.setenv("BERTH_AGENT_NAME", agent_config.name)
    monkeypatch.setenv("BERTH_NETWORK_POOL", "10.213.0.0/16")
    monkeypatch.setenv("BERTH_DNS_UPSTREAMS", "")
    manager = NetworkManager(agent_config)
    try:
        yield manager
    finally:
        manager.teardown()


def test_network_create_ls_inspect_rm(
    cli_env: NetworkManager, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["network", "create", "--tenant", "acme", "--subnet", "10.213.90.0/24", "web"]) == 0
    network_id = capsys.readouterr().out.strip()
    assert len(network_id) == 64
    assert main(["network", "ls", "--tenant", "acme"]) == 0
    listing = capsys.readouterr().out
    assert "web" in listing and "10.213.90.0/24" in listing
    assert main(["network", "ls", "--tenant", "globex"]) == 0
    assert "web" not in capsys.readouterr().out
    container = secrets.token_hex(32)
    cli_env.attach(
        "acme", container, "srv", [NetworkAttachment("web", aliases=("api",))], name="server"
    )
    assert main(["network", "inspect", "--tenant", "acme", "web"]) == 0
    [shown] = json.loads(capsys.readouterr().out)
    assert shown["IPAM"]["Config"][0] == {"Subnet": "10.213.90.0/24", "Gateway": "10.213.90.1"}
    entry = shown["Containers"][container]
    assert entry["Name"] == "server" and entry["Aliases"] == ["api"]
    assert entry["IPv4Address"].startswith("10.213.90.")
    # in use: refused with exit status 1 and the reason
    assert main(["network", "rm", "--tenant", "acme", "web"]) == 1
    assert "containers attached" in capsys.readouterr().err
    cli_env.detach("acme", container)
    assert main(["network", "rm", "--tenant", "acme", "web"]) == 0
    assert main(["network", "inspect", "--tenant", "acme", "web"]) == 1


def test_network_connect_disconnect_by_container_name(
    cli_env: NetworkManager, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_env.create("acme", "front")
    cli_env.create("acme", "back")
    container = secrets.token_hex(32)
    cli_env.attach("acme", container, "app", [NetworkAttachment("front")], name="app")
    assert main(["network", "connect", "--tenant", "acme", "--alias", "api", "back", "app"]) == 0
    endpoint = cli_env.endpoint("acme", container)
    assert endpoint is not None and set(endpoint.addresses) == {"front", "back"}
    assert main(["network", "disconnect", "--tenant", "acme", "back", container[:12]]) == 0
    endpoint = cli_env.endpoint("acme", container)
    assert endpoint is not None and set(endpoint.addresses) == {"front"}
    # other tenants can't see the container or the network
    assert main(["network", "connect", "--tenant", "globex", "back", "app"]) == 125
    assert "no container 'app'" in capsys.readouterr().err


def test_bad_subnet_is_a_clear_error(
    cli_env: NetworkManager, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["network", "create", "--tenant", "acme", "--subnet", "10.213.1.7/24", "x"]) == 125
    assert "bad subnet" in capsys.readouterr().err
