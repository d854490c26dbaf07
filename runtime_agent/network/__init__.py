"""Per-tenant container networking: bridges, netns, veth, IPAM, nftables, ports, DNS.

See ``manager.py`` for the model and ``docs/agent.md`` for the interface.
"""

from __future__ import annotations

from runtime_agent.network.manager import (
    DEFAULT_NETWORK,
    Endpoint,
    Network,
    NetworkManager,
    NetworkSetup,
    PublishedPort,
)

__all__ = [
    "DEFAULT_NETWORK",
    "Endpoint",
    "Network",
    "NetworkManager",
    "NetworkSetup",
    "PublishedPort",
]
