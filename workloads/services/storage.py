"""Tenant volumes and networks: create, delete, and their use by services.

A volume reserves its ``size_gib`` from the tenant's ``storage_gib`` quota when it is
created and gives it back exactly once when it is deleted. It is node-local: the first
container mounting it pins it to that container's node (see :func:`pin_constraints`,
used by the scheduler), and every later container mounting it goes to the same node.
Deleting a volume or network that a service (or a live container) still uses is refused.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from typing import Any

from django.db import IntegrityError, transaction

from runtime_agent import protocol
from tenants import services as tenant_services
from tenants.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from tenants.models import QuotaReservation, Tenant
from tenants.services import Actor, record
from workloads.choices import ContainerState, NodeState, ServiceState
from workloads.models import Container, Network, Node, Service, Volume
from workloads.models.services import name_validator
from workloads.services import dispatch

MAX_VOLUME_GIB = 16 * 1024
#: A node label every node carries implicitly (its id): a constraint on it pins work there.
NODE_ID_LABEL = "berth.node.id"
RESERVED_NETWORKS = frozenset({"default", "bridge", "host", "none"})
GONE = (ContainerState.REMOVED, ContainerState.LOST)


def _validate_name(name: Any, what: str) -> str:
    from django.core.exceptions import ValidationError

    if not isinstance(name, str):
        raise InvalidInput(f"{what} name must be a string")
    try:
        name_validator(name)
    except ValidationError as exc:
        raise InvalidInput(f"{what} name {name!r}: {exc.messages[0]}") from None
    return name


def _validate_labels(labels: Any) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise InvalidInput("labels must be an object of string: string")
    return dict(labels)


# --------------------------------------------------------------------------- volumes


@transaction.atomic
def create_volume(
    tenant: Tenant,
    *,
    name: str,
    size_gib: int = 1,
    labels: dict[str, str] | None = None,
    actor: Actor,
) -> Volume:
    """Create a volume and reserve its size; a quota refusal, a suspended tenant or one at
    its spend cap (``billing.services.check_new_usage_allowed``) creates nothing."""
    from billing.services import check_new_usage_allowed

    check_new_usage_allowed(tenant, "volume")
    name = _validate_name(name, "volume")
    if isinstance(size_gib, bool) or not isinstance(size_gib, int):
        raise InvalidInput("size_gib must be an integer")
    if not 1 <= size_gib <= MAX_VOLUME_GIB:
        raise InvalidInput(f"size_gib must be between 1 and {MAX_VOLUME_GIB}")
    clean_labels = _validate_labels(labels)
    if Volume.objects.filter(tenant=tenant, name=name).exists():
        raise Conflict(f"a volume named {name!r} already exists")
    reservation = tenant_services.reserve(
        tenant, {"storage_gib": size_gib}, actor=actor, reason=f"volume {name}"
    )
    try:
        with transaction.atomic():
            volume = Volume.objects.create(
                tenant=tenant,
                name=name,
                size_gib=size_gib,
                labels=clean_labels,
                reservation=reservation,
            )
    except IntegrityError:
        raise Conflict(f"a volume named {name!r} already exists") from None
    record(actor, "volume.create", tenant=tenant, target=volume, details={"size_gib": size_gib})
    return volume


def services_using(
    tenant: Tenant, *, volume: str | None = None, network: str | None = None
) -> list[str]:
    names = []
    for service in Service.objects.filter(tenant=tenant).exclude(state=ServiceState.DELETED):
        if volume is not None and any(v.get("name") == volume for v in service.volumes or []):
            names.append(service.name)
        if network is not None and network in (service.networks or []):
            names.append(service.name)
    return sorted(names)


def _live_containers_mounting(tenant: Tenant, volume: str) -> int:
    """How many of the tenant's containers that are not gone mount ``volume``.

    Read with :func:`volume_names`, in Python: a JSON containment lookup
    (``spec__mounts__contains``) exists only on Postgres, and on SQLite (infra/run.sh's
    default database) it made every volume deletion a 500 that never gave the quota back.
    """
    live = Container.objects.filter(tenant=tenant).exclude(state__in=GONE).only("spec")
    return sum(1 for container in live.iterator() if volume in volume_names(container))


@transaction.atomic
def delete_volume(volume: Volume, *, actor: Actor) -> None:
    """Delete an unused volume: its data on its node goes, its quota comes back."""
    volume = (
        Volume.objects.select_for_update(of=("self",))
        .select_related("tenant", "node")
        .get(pk=volume.pk)
    )
    users = services_using(volume.tenant, volume=volume.name)
    if users:
        raise Conflict(
            f"volume {volume.name} is in use by service(s) {', '.join(users)}",
            details={"services": users},
        )
    live = _live_containers_mounting(volume.tenant, volume.name)
    if live:
        raise Conflict(
            f"volume {volume.name} is still mounted by {live} container(s) being removed; "
            "try again shortly",
            details={"containers": live},
        )
    if volume.reservation_id is not None:
        tenant_services.release(volume.reservation_id, actor=actor, reason="volume deleted")
    if volume.node is not None:
        dispatch.send_after_commit(
            volume.node,
            protocol.AGENT_REMOVE_VOLUME,
            op_id=f"volume:{volume.pk}:remove",
            tenant=volume.tenant.slug,
            name=volume.name,
        )
    record(actor, "volume.delete", tenant=volume.tenant, target=volume)
    volume.delete()


def validate_service_volumes(tenant: Tenant | None, value: Any) -> list[dict[str, Any]]:
    """``[{"name", "target", "read_only"}]``: existing volumes, absolute distinct targets."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidInput("volumes must be a list of {name, target, read_only}")
    clean: list[dict[str, Any]] = []
    targets: set[str] = set()
    for item in value:
        if not isinstance(item, dict) or set(item) - {"name", "target", "read_only"}:
            raise InvalidInput("each volume must be an object {name, target, read_only}")
        name = _validate_name(item.get("name"), "volume")
        target = item.get("target")
        if not isinstance(target, str) or not target.startswith("/") or len(target) > 1000:
            raise InvalidInput(f"volume {name}: target must be an absolute path")
        target = posixpath.normpath(target)
        if target == "/":
            raise InvalidInput(f"volume {name}: cannot be mounted on /")
        if target in targets:
            raise InvalidInput(f"two volumes are mounted on {target}")
        targets.add(target)
        read_only = item.get("read_only", False)
        if not isinstance(read_only, bool):
            raise InvalidInput(f"volume {name}: read_only must be true or false")
        if tenant is not None and not Volume.objects.filter(tenant=tenant, name=name).exists():
            raise NotFound(
                f"no volume named {name!r}; create it first (POST volumes/)",
                details={"volume": name},
            )
        clean.append({"name": name, "target": target, "read_only": read_only})
    return clean


def mounts_for(tenant: Tenant, volumes: Iterable[dict[str, Any]]) -> tuple[protocol.MountSpec, ...]:
    """The ContainerSpec mounts of a service's volumes (sized as created)."""
    volumes = list(volumes)
    sizes = dict(
        Volume.objects.filter(tenant=tenant, name__in=[v["name"] for v in volumes]).values_list(
            "name", "size_gib"
        )
    )
    return tuple(
        protocol.MountSpec(
            kind="volume",
            source=v["name"],
            target=v["target"],
            read_only=bool(v.get("read_only")),
            size_bytes=sizes[v["name"]] * 1024**3 if v["name"] in sizes else None,
        )
        for v in volumes
    )


def volume_names(container: Container) -> list[str]:
    return [
        m["source"]
        for m in container.spec.get("mounts") or []
        if m.get("kind") == "volume" and m.get("source")
    ]


# --------------------------------------------------------------------------- networks


@transaction.atomic
def create_network(
    tenant: Tenant, *, name: str, labels: dict[str, str] | None = None, actor: Actor
) -> Network:
    tenant_services.ensure_active(tenant)
    name = _validate_name(name, "network")
    if name in RESERVED_NETWORKS:
        raise InvalidInput(f"{name!r} is a reserved network name")
    clean_labels = _validate_labels(labels)
    if Network.objects.filter(tenant=tenant, name=name).exists():
        raise Conflict(f"a network named {name!r} already exists")
    # One of the tenant's ``networks`` (node subnets are finite); delete_network gives it back.
    tenant_services.reserve(tenant, {"networks": 1}, actor=actor, reason=_network_reason(name))
    try:
        with transaction.atomic():
            network = Network.objects.create(tenant=tenant, name=name, labels=clean_labels)
    except IntegrityError:
        raise Conflict(f"a network named {name!r} already exists") from None
    record(actor, "network.create", tenant=tenant, target=network)
    return network


def _network_reason(name: str) -> str:
    """The reason of a network's ``networks`` reservation: how delete finds it again."""
    return f"network {name}"


@transaction.atomic
def delete_network(network: Network, *, actor: Actor) -> None:
    """Delete an unused network here and on every node that may have created it."""
    network = Network.objects.select_for_update().select_related("tenant").get(pk=network.pk)
    users = services_using(network.tenant, network=network.name)
    if users:
        raise Conflict(
            f"network {network.name} is in use by service(s) {', '.join(users)}",
            details={"services": users},
        )
    for node in Node.objects.exclude(state=NodeState.DOWN):
        dispatch.send_after_commit(
            node,
            protocol.AGENT_REMOVE_NETWORK,
            op_id=f"network:{network.pk}:remove",
            tenant=network.tenant.slug,
            name=network.name,
        )
    record(actor, "network.delete", tenant=network.tenant, target=network)
    held = QuotaReservation.objects.filter(
        tenant=network.tenant, reason=_network_reason(network.name), released_at__isnull=True
    ).first()
    if held is not None:  # networks created before the quota existed hold none
        tenant_services.release(held, actor=actor, reason="network deleted")
    network.delete()


def validate_service_networks(tenant: Tenant | None, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise InvalidInput("networks must be a list of network names")
    if tenant is not None:
        # Each network a container joins takes a node subnet's veth, routes and rules.
        cap = tenant.quota_limits()["networks_per_container"]
        if len(set(value)) > cap:
            raise QuotaExceeded("networks_per_container", cap, 0, len(set(value)))
    clean: list[str] = []
    for name in value:
        _validate_name(name, "network")
        if name in clean:
            continue
        if tenant is not None and not Network.objects.filter(tenant=tenant, name=name).exists():
            raise NotFound(
                f"no network named {name!r}; create it first (POST networks/)",
                details={"network": name},
            )
        clean.append(name)
    return clean


# --------------------------------------------------------------------------- placement


def normalize_image(image: str) -> str:
    """``name`` -> ``name:latest``; references with a tag or digest stay as they are."""
    last = image.rsplit("/", 1)[-1]
    if not image or "@" in image or ":" in last:
        return image
    return f"{image}:latest"


class Pins:
    """Node pins of one scheduling round (see :func:`pin_constraints`)."""

    def __init__(self) -> None:
        #: container pk -> extra constraints (the node-id label)
        self.constraints: dict[str, dict[str, str]] = {}
        #: container pk -> why it waits this round
        self.deferred: dict[str, str] = {}
        #: container pk -> volumes it pins to its node once placed
        self.claims: dict[str, list[Volume]] = {}
        #: container pk -> what pins it ("volume data", "image app:v1 (built there)")
        self.why: dict[str, str] = {}

    def explain(self, unplaced: dict[str, str]) -> None:
        """Say in the reasons of pinned containers that could not be placed where they are
        pinned, instead of the bare node-id label the scheduler reports."""
        pinned = {k: c[NODE_ID_LABEL] for k, c in self.constraints.items() if k in unplaced}
        if not pinned:
            return
        nodes = {
            str(pk): (name, state)
            for pk, name, state in Node.objects.filter(pk__in=set(pinned.values())).values_list(
                "pk", "name", "state"
            )
        }
        for key, node_id in pinned.items():
            name, state = nodes.get(node_id, (node_id, "gone"))
            reason = unplaced[key]
            if state != NodeState.READY:
                reason = f"node {name} is {state}"
            unplaced[key] = f"pinned to node {name} by its {self.why[key]}: {reason}"


def pin_constraints(pending: list[Container]) -> Pins:
    """Constraints that keep node-local things together, for one scheduling round.

    - A container mounting a volume that lives on a node must go to that node.
    - Of the containers mounting a volume that lives nowhere yet, the oldest is placed
      this round (and pins the volume); the others wait for the next round.
    - A container whose image was built on a node and not pushed to a registry must go
      to that node (the image exists only there), and so must one still naming a build's
      bare tag (``app:v1``: the node's local name for it), which happens only when its
      service or job was created before the build was pushed. Services and jobs resolve
      a pushed build's tag to its registry reference when created or deployed
      (``builds.resolve_image``), and that (``<host>/<tenant>/app@sha256:…``) is pulled
      by whichever node runs it.
    Must run inside the scheduler's transaction (it locks the volumes' rows).
    """
    from django.db.models import Q

    from workloads.models import Build

    pins = Pins()
    wanted = {(c.tenant_id, name) for c in pending for name in volume_names(c)}
    volumes: dict[tuple[int, str], Volume] = {}
    if wanted:
        for volume in Volume.objects.select_for_update(of=("self",)).filter(
            tenant_id__in={t for t, _ in wanted}, name__in={n for _, n in wanted}
        ):
            volumes[(volume.tenant_id, volume.name)] = volume
    images = {(c.tenant_id, normalize_image(c.spec.get("image") or "")) for c in pending}
    built: dict[tuple[int, str], str] = {}
    names = {i for _, i in images if i}
    if names:
        for build in (
            Build.objects.filter(
                Q(pushed=False, image_reference__in=names) | Q(tag__in=names),
                tenant_id__in={t for t, _ in images},
                state="succeeded",
                node__isnull=False,
            )
            .order_by("finished_at")
            .values("tenant_id", "tag", "image_reference", "pushed", "node_id")
        ):
            local = build["tag"] if build["pushed"] else build["image_reference"]
            built[(build["tenant_id"], local)] = str(build["node_id"])
    claimed: set[int] = set()
    for container in pending:
        key = str(container.pk)
        nodes: dict[str, str] = {}  # node id -> why
        unpinned: list[Volume] = []
        for name in volume_names(container):
            found = volumes.get((container.tenant_id, name))
            if found is None:
                continue  # deleted meanwhile: the agent will create it empty
            if found.node_id is not None:
                nodes[str(found.node_id)] = f"volume {name}"
            else:
                unpinned.append(found)
        image_node = built.get(
            (container.tenant_id, normalize_image(container.spec.get("image") or ""))
        )
        if image_node is not None:
            nodes[image_node] = f"image {container.spec.get('image')} (built there)"
        if len(nodes) > 1:
            pins.deferred[key] = (
                "its " + " and ".join(sorted(nodes.values())) + (" live on different nodes")
            )
            continue
        if any(v.pk in claimed for v in unpinned):
            pins.deferred[key] = "waiting for another container to place volume " + ", ".join(
                v.name for v in unpinned if v.pk in claimed
            )
            continue
        claimed.update(v.pk for v in unpinned)
        if unpinned:
            pins.claims[key] = unpinned
        if nodes:
            node_id, why = next(iter(nodes.items()))
            pins.constraints[key] = {NODE_ID_LABEL: node_id}
            pins.why[key] = why
    return pins


def pin_placed(pins: Pins, assignments: dict[str, str]) -> int:
    """Pin the claimed volumes to the nodes their containers were placed on."""
    pinned = 0
    for key, volumes in pins.claims.items():
        node_id = assignments.get(key)
        if node_id is None:
            continue
        pinned += Volume.objects.filter(pk__in=[v.pk for v in volumes], node__isnull=True).update(
            node_id=node_id
        )
    return pinned
