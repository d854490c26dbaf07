"""Names the node, the registry and the platform keep for themselves: no tenant may have one.

A tenant's slug names its namespaces everywhere: image references on a node
(``images/<tenant>/``), containers, volumes, networks and cgroups, registry repositories
(``<slug>/<repo>``) and dashboard URLs (``/t/<slug>/``). A tenant called ``library``
would write into the node's shared base images, one called ``default`` into the agent
CLI's own objects, one called ``v2`` or ``admin`` would shadow registry or site paths.
This module is the one list of such names. It depends on nothing, so the node agent (which
also refuses tasks for these names) and the control plane (tenant signup and creation)
both use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: The node's shared image namespace: base images every tenant can use (``busybox``).
SHARED_NAMESPACE = "library"
#: The namespace the agent's local CLI acts in when no ``--tenant`` is given.
CLI_NAMESPACE = "default"

#: Exact names no tenant may use.
RESERVED_NAMES: frozenset[str] = frozenset(
    {
        # the node's own namespaces and words its CLI, networks and runtime use
        SHARED_NAMESPACE,
        CLI_NAMESPACE,
        "shared",
        "system",
        "root",
        "node",
        "nodes",
        "agent",
        "host",
        "localhost",
        "local",
        "bridge",
        "none",
        "runtime",
        "builder",
        "build",
        "builds",
        "images",
        "image",
        "volumes",
        "networks",
        "containers",
        "snapshots",
        "content",
        "cgroup",
        "kernel",
        # the registry: its API root, token and notification paths, Docker Hub's words
        "v1",
        "v2",
        "registry",
        "token",
        "events",
        "docker",
        "docker-io",
        "index",
        "official",
        "public",
        "scratch",
        # the platform's URL words and accounts
        "admin",
        "administrator",
        "api",
        "api-auth",
        "static",
        "media",
        "assets",
        "dashboard",
        "billing",
        "login",
        "logout",
        "signup",
        "register",
        "account",
        "accounts",
        "auth",
        "oauth",
        "invitations",
        "invite",
        "settings",
        "t",
        "tenants",
        "tenant",
        "platform",
        "internal",
        "support",
        "help",
        "docs",
        "status",
        "health",
        "healthz",
        "metrics",
        "www",
        "mail",
        "security",
        "stripe",
        "webhooks",
        "null",
        "undefined",
    }
)

#: Prefixes kept for the platform (``berth``, ``berth-ops``, ``berthd``...) and for the
#: node credentials' registry usernames (``node-<name>``).
RESERVED_PREFIXES: tuple[str, ...] = ("berth", "node-")


#: A node's name (``berth-agent join --name``): it is the registry username ``node-<name>``,
#: in logs and in placement, so one rule for the control plane and the registry.
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def node_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a node's name, or None."""
    if not isinstance(name, str) or not NODE_NAME_RE.fullmatch(name):
        return (
            f"invalid node name {name!r}: 1-100 characters, letters, digits, '.', '_' and "
            "'-', starting with a letter or digit"
        )
    return None


def reserved_name_reason(name: str) -> str | None:
    """Why ``name`` may not be a tenant's, or None when it may.

    Compared in lower case: the slug rule only allows lower case, but this list must
    not depend on that.
    """
    folded = name.strip().lower()
    if folded in RESERVED_NAMES:
        return f"{name!r} is reserved for the platform"
    for prefix in RESERVED_PREFIXES:
        if folded.startswith(prefix):
            return f"names starting with {prefix!r} are reserved for the platform"
    return None


def is_reserved_name(name: str) -> bool:
    return reserved_name_reason(name) is not None


def node_namespace_refusal(task_kwargs: Mapping[str, object]) -> str | None:
    """Why a task the control plane sent must not run on a node: its tenant (the task's
    ``tenant``, or its ``spec``'s or ``request``'s) is one of the names above, so acting
    for it would touch the node's own namespaces (``library``'s images, the CLI's
    ``default`` objects). No tenant can have such a name; a tenant created before the
    name was reserved is stopped here. The node's operator still uses them from the CLI.
    """
    candidates = [task_kwargs.get("tenant")]
    for key in ("spec", "request"):
        nested = task_kwargs.get(key)
        if isinstance(nested, Mapping):
            candidates.append(nested.get("tenant"))
    for name in candidates:
        if isinstance(name, str) and (reason := reserved_name_reason(name)):
            return f"tenant {name!r}: {reason}; a node acts for it only from its own CLI"
    return None
