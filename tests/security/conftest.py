"""The attack suite uses the real fixtures of the areas it attacks: the control plane's
tenants, tokens and API clients, the agent's per-test node, and the e2e cluster (live
control plane, real agent worker, optional real registry)."""

from __future__ import annotations

from tests.agent.conftest import agent, agent_config, cli
from tests.control.conftest import (
    _default_plans,
    acme,
    add_member,
    client_for,
    make_tenant,
    make_token,
    owner_token,
    plans,
)
from tests.e2e.conftest import cluster, registry_cluster

__all__ = [
    "_default_plans",
    "acme",
    "add_member",
    "agent",
    "agent_config",
    "cli",
    "client_for",
    "cluster",
    "make_tenant",
    "make_token",
    "owner_token",
    "plans",
    "registry_cluster",
]
