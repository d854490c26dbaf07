"""This node's identity and capacity: join the control plane, remember the credential.

``berth-agent join URL TOKEN`` exchanges a one-time join token (made by a platform admin
with ``manage.py create_join_token``) for a node id, a node credential and the broker URL,
and stores them in ``<root>/node.json`` (mode 0600). The worker reads that file to know
its queue (``node.<id>``) and signs its reports with the credential.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime_agent import __version__
from runtime_agent.config import AgentConfig
from runtime_agent.errors import FailedPrecondition, InvalidArgument, NotFound


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    credential: str
    broker_url: str
    control_url: str
    queue: str
    name: str = ""
    labels: dict[str, str] = field(default_factory=dict)


def identity_path(config: AgentConfig) -> Path:
    return config.root / "node.json"


def load_identity(config: AgentConfig) -> NodeIdentity:
    path = identity_path(config)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(
            f"this agent has not joined a control plane ({path} missing): "
            "run `berth-agent join URL TOKEN` first"
        ) from None
    return NodeIdentity(**data)


def save_identity(config: AgentConfig, identity: NodeIdentity) -> Path:
    path = identity_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(identity), handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def gpu_count() -> int:
    """GPUs this node can hand out: devices of class ``gpu`` in its CDI specs."""
    try:
        from runtime_agent.devices import cdi
    except ImportError:
        return 0
    try:
        return sum(1 for name in cdi.list_devices() if "/gpu=" in name)
    except Exception:  # a broken CDI spec must not stop the node from reporting
        return 0


def capacity(config: AgentConfig) -> dict[str, Any]:
    """What this node offers: CPUs, memory, disk under the state root, GPUs."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    config.root.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(config.root)
    return {
        "cpu_millicores": (os.cpu_count() or 1) * 1000,
        "memory_mib": total_kib // 1024,
        "disk_gib": disk.total // (1 << 30),
        "gpus": gpu_count(),
        "arch": platform.machine(),
        "version": __version__,
    }


def join(
    config: AgentConfig,
    control_url: str,
    token: str,
    *,
    name: str | None = None,
    labels: dict[str, str] | None = None,
    timeout: float = 15,
) -> NodeIdentity:
    """Exchange a join token for this node's identity and save it."""
    if not control_url.startswith(("http://", "https://")):
        raise InvalidArgument(
            f"control plane URL must start with http:// or https://: {control_url}"
        )
    body: dict[str, Any] = {
        "token": token,
        "name": name or platform.node(),
        "labels": labels or {},
        "capacity": capacity(config),
    }
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        control_url.rstrip("/") + "/api/v1/nodes/join/",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            data = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise FailedPrecondition(
            f"join refused by {control_url}: HTTP {exc.code}: {detail}"
        ) from None
    except urllib.error.URLError as exc:
        raise FailedPrecondition(f"cannot reach {control_url}: {exc.reason}") from None
    identity = NodeIdentity(
        node_id=data["node_id"],
        credential=data["credential"],
        broker_url=data["broker_url"],
        control_url=control_url.rstrip("/"),
        queue=data["queue"],
        name=body["name"],
        labels=body["labels"],
    )
    save_identity(config, identity)
    registry = data.get("registry")
    if registry:
        from runtime_agent.distribution.auth import Credentials, CredentialStore

        CredentialStore(config.root / "registry-auth.json").set(
            registry["host"], Credentials(registry["username"], registry["password"])
        )
    return identity
