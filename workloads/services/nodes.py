"""Nodes: join with a one-time token, heartbeats, cordon / drain / down."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from runtime_agent.names import node_name_problem
from tenants.errors import InvalidInput, NotFound, PermissionDenied
from tenants.models import hash_secret
from tenants.services import Actor, record
from workloads.choices import ContainerState, DesiredState, NodeState
from workloads.models import Container, JoinToken, Node
from workloads.services import broker

if TYPE_CHECKING:
    from registry.tokens import IssuedToken

JOIN_TOKEN_PREFIX = "bjt_"  # noqa: S105 - a prefix, not a secret
NODE_CREDENTIAL_PREFIX = "bnc_"

#: Legal moves an admin may make; ``down`` is set by the reconciler, ``ready`` again by a
#: heartbeat of a node that was down.
ADMIN_TRANSITIONS: dict[str, frozenset[str]] = {
    NodeState.READY: frozenset({NodeState.CORDONED, NodeState.DRAINING}),
    NodeState.CORDONED: frozenset({NodeState.READY, NodeState.DRAINING}),
    NodeState.DRAINING: frozenset({NodeState.READY, NodeState.CORDONED}),
    NodeState.DOWN: frozenset({NodeState.CORDONED, NodeState.DRAINING}),
}


@transaction.atomic
def create_join_token(
    *, actor: Actor, ttl: timedelta = timedelta(hours=1), labels: dict[str, str] | None = None
) -> tuple[JoinToken, str]:
    """A one-time token for a new node. Only its hash is stored; the secret is returned."""
    secret = JOIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = JoinToken.objects.create(
        token_hash=hash_secret(secret), expires_at=timezone.now() + ttl, labels=labels or {}
    )
    record(actor, "node.join_token.create", tenant=None, target=token)
    return token, secret


def _validate_capacity(capacity: dict[str, Any]) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key in ("cpu_millicores", "memory_mib", "disk_gib", "gpus"):
        value = capacity.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(f"capacity.{key} must be a non-negative integer, got {value!r}")
        clean[key] = value
    clean["arch"] = str(capacity.get("arch", ""))[:32]
    clean["version"] = str(capacity.get("version", ""))[:32]
    return clean


@transaction.atomic
def join_node(
    token: str, *, name: str, capacity: dict[str, Any], labels: dict[str, str]
) -> tuple[Node, str]:
    """Exchange a join token for a node identity and its credential (returned once).

    The node also gets its registry login (see :func:`registry_login`)."""
    now = timezone.now()
    from registry.services import node_credential_problem

    join = JoinToken.objects.select_for_update().filter(token_hash=hash_secret(token)).first()
    if join is None or join.used_at is not None or join.expires_at <= now:
        # One message for all three: a probe learns nothing about which tokens exist.
        raise PermissionDenied("this join token is invalid, expired or already used")
    # Everything the join and the registry login need is checked before anything is
    # written, so a refused join leaves no node behind and its token unused.
    taken = InvalidInput(
        f"a node named {name!r} already exists: every node needs a name of its own",
        details={"field": "name"},
    )
    if node_name_problem(name) is None and Node.objects.filter(name=name).exists():
        raise taken
    if problem := node_credential_problem(name):
        raise InvalidInput(problem, details={"field": "name"})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise InvalidInput("labels must be a mapping of strings to strings")
    credential = NODE_CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
    try:
        with transaction.atomic():
            node = Node.objects.create(
                name=name,
                credential_hash=hash_secret(credential),
                labels={**join.labels, **labels},
                last_heartbeat_at=now,
                **_validate_capacity(capacity),
            )
    except IntegrityError:
        raise taken from None  # a join under the same name committed meanwhile
    join.used_at = now
    join.node = node
    join.save(update_fields=["used_at", "node"])
    record(Actor.for_system(f"node:{node.name}"), "node.join", tenant=None, target=node)
    return node, credential


def registry_login(node: Node) -> dict[str, str]:
    """Mint the node's registry credential, keyed by the node's id (no other node can take
    it over by name): it pulls what anyone may; tenants' images come with tokens minted
    per pull (:func:`issue_pull_token`). Returned once, with the host the agent logs in to."""
    from django.conf import settings

    from registry.services import create_node_credential

    _, secret = create_node_credential(
        node.name, node_id=node.pk, actor=Actor.for_system(f"node:{node.name}")
    )
    return {
        "host": settings.BERTH_REGISTRY_HOST,
        "username": f"node-{node.name}",
        "password": secret,
    }


def broker_login(node: Node) -> str:
    """Create (or, on a re-join, rotate) the node's own broker user and return the broker
    URL carrying it: it consumes only ``node.<id>`` and writes only its own results
    (:mod:`workloads.services.broker`). Returned once, in the join response."""
    return broker.provision_node(node.pk)


@transaction.atomic
def remove_node(node: Node, *, actor: Actor) -> None:
    """Forget a node (platform admins): its row goes, and once that commits so does its
    broker user, closing the connections it holds, so a removed node can no longer reach
    even its own queue. Its containers are removed with it (the reconciler reschedules
    their services' replicas)."""
    node_id = node.pk
    record(actor, "node.remove", tenant=None, target=node, details={"name": node.name})
    node.delete()
    transaction.on_commit(lambda: broker.revoke_node(node_id))


def issue_pull_token(
    node_id: str, credential: str, tenant_slug: str, image: str
) -> IssuedToken | None:
    """A registry token for the node to pull ``image`` for one of ``tenant_slug``'s
    containers placed on it, right now; None when the image is not on this platform's
    registry (the node then pulls anonymously).

    Refused (PermissionDenied) unless a live container of that tenant on this node runs
    exactly that image, and (RegistryDenied) when the tenant may not read the repository:
    the token carries the tenant's rights, never the node's; the refusal becomes the
    containers' reason. Nothing else is stored.
    """
    from registry import services as registry_services
    from registry.errors import RegistryDenied

    node = authenticate_node(node_id, credential)
    running_it = Container.objects.filter(
        node=node, tenant__slug=tenant_slug, spec__image=image
    ).exclude(state__in=[ContainerState.REMOVED, ContainerState.LOST])
    container = running_it.select_related("tenant").first()
    if container is None:
        raise PermissionDenied(
            f"no container of tenant {tenant_slug!r} on this node runs the image {image!r}"
        )
    if not registry_services.registry_configured():
        return None
    try:
        return registry_services.tenant_pull_token(
            container.tenant, image, subject=f"pull for {tenant_slug} on node {node.name}"
        )
    except RegistryDenied as exc:
        # The tenant sees why its container does not start (the node only gets a 403).
        running_it.update(pending_reason=exc.message[:500])
        raise


def container_secrets(node_id: str, credential: str, container_id: str) -> dict[str, str]:
    """The decrypted service secrets of one container, for the node it is placed on only
    (right before that node creates it): the broker carries only ``secrets_from``, the
    container's id. Any other node, and a removed or lost container, gets the same
    PermissionDenied. The values are never logged or stored outside the encrypted spec."""
    from workloads.secrets import decrypt_secrets

    node = authenticate_node(node_id, credential)
    container = (
        Container.objects.filter(pk=container_id, node=node)
        .exclude(state__in=[ContainerState.REMOVED, ContainerState.LOST])
        .only("spec")
        .first()
    )
    if container is None:
        raise PermissionDenied(f"no live container {container_id} on this node")
    return decrypt_secrets(str(container.spec.get("secrets_encrypted") or ""))


def authenticate_node(node_id: str, credential: str) -> Node:
    node = Node.objects.filter(pk=node_id).first()
    if node is None or not secrets.compare_digest(node.credential_hash, hash_secret(credential)):
        raise PermissionDenied("unknown node or wrong node credential")
    return node


def heartbeat_timeout() -> timedelta:
    return timedelta(seconds=getattr(settings, "BERTH_NODE_TIMEOUT_SECONDS", 30))


@transaction.atomic
def set_node_state(node: Node, state: str, *, actor: Actor) -> Node:
    """Cordon, drain or make a node ready again (platform admins)."""
    node = Node.objects.select_for_update(no_key=True).get(pk=node.pk)
    if state not in ADMIN_TRANSITIONS.get(node.state, frozenset()):
        raise InvalidInput(
            f"a {node.state} node cannot become {state}",
            details={"from": node.state, "to": state},
        )
    previous = node.state
    node.state = state
    node.save(update_fields=["state"])
    record(actor, f"node.{state}", tenant=None, target=node, details={"from": previous})
    if state == NodeState.DRAINING:
        evacuate(node, reason="node is draining")
    return node


def evacuate(node: Node, *, reason: str) -> int:
    """Move the node's live service containers elsewhere: new copies go pending.

    The old containers are asked to stop and go away (they are marked ``lost`` when the
    node is down, so their quota is given back once; see ``reports.finish_container``).
    Batch runs are not moved; they fail and retry per their job's policy.
    """
    from workloads.services import placement

    moved = 0
    containers = (
        Container.objects.select_for_update()
        .filter(
            node=node,
            service__isnull=False,
            desired_state=DesiredState.RUNNING,
        )
        .exclude(state__in=[ContainerState.REMOVED, ContainerState.LOST])
    )
    for container in containers:
        placement.replace_container(container, reason=reason, node_down=node.state == "down")
        moved += 1
    return moved


def get_node(node_id: str) -> Node:
    node = Node.objects.filter(pk=node_id).first()
    if node is None:
        raise NotFound(f"no node {node_id}")
    return node
