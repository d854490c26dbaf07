"""Services: create, scale, deploy (start-first, health-gated, automatic roll-back),
stop, start, restart, delete. Every replica reserves its share of the tenant's quota
when it is created and gives it back exactly once when it is gone."""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from tenants import services as tenant_services
from tenants.errors import Conflict, InvalidInput, QuotaExceeded
from tenants.models import Tenant
from tenants.services import Actor, record
from workloads.choices import ContainerState, DeploymentState, DesiredState, ServiceState
from workloads.models import Container, Deployment, Service
from workloads.services import builds, placement, specs


def admit_new_usage(tenant: Tenant, kind: str) -> None:
    """New work needs an active tenant under its spend cap (running work is never touched)."""
    from billing.services import check_new_usage_allowed

    check_new_usage_allowed(tenant, kind)


def _reserve_replica(service: Service, container: Container, *, actor: Actor) -> None:
    amounts = {
        "cpu_millicores": service.cpu_millicores,
        "memory_mib": service.memory_mib,
        "containers": 1,
    }
    if service.gpus:
        amounts["gpus"] = service.gpus
    if service.blkio_bps:
        amounts["blkio_bps"] = service.blkio_bps
    container.reservation = tenant_services.reserve(
        service.tenant, amounts, actor=actor, reason=f"service {service.name} replica"
    )


def _add_replicas(service: Service, count: int, *, actor: Actor) -> list[Container]:
    """Create ``count`` replicas, each holding its own reservation (released on its own).

    A refusal is reported for the whole request: the use before it and what all the
    replicas together asked for, not the state halfway through the loop.
    """
    created = []
    for index in range(count):
        container = specs.new_service_container(service)
        try:
            _reserve_replica(service, container, actor=actor)
        except QuotaExceeded as exc:
            per_replica = exc.details["requested"]
            raise QuotaExceeded(
                exc.details["quota"],
                exc.details["limit"],
                exc.details["used"] - index * per_replica,
                count * per_replica,
            ) from None
        container.save()
        created.append(container)
    if created:
        placement.schedule_soon()
    return created


@transaction.atomic
def create_service(
    tenant: Tenant, *, name: str, data: dict[str, Any], replicas: int, actor: Actor
) -> Service:
    """Create a service and its replicas; all or nothing (a quota refusal creates nothing)."""
    admit_new_usage(tenant, "service")
    if "image" not in data:
        raise InvalidInput("image is required")
    fields = specs.service_fields(data, tenant)
    replicas = specs.validate_replicas(replicas)
    service = Service(tenant=tenant, name=name, replicas=replicas, **fields)
    service.full_clean(exclude=["tenant"], validate_unique=False, validate_constraints=False)
    service.resolved_image = builds.resolve_image(tenant, service.image)
    try:
        with transaction.atomic():
            service.save()
    except IntegrityError:
        raise Conflict(f"a service named {name!r} already exists") from None
    Deployment.objects.create(service=service, generation=1, spec=service.spec())
    _add_replicas(service, replicas, actor=actor)
    details: dict[str, Any] = {"replicas": replicas}
    if service.resolved_image:
        details["resolved_image"] = service.resolved_image
    record(actor, "service.create", tenant=tenant, target=service, details=details)
    return service


def _lock(service: Service) -> Service:
    # NO KEY UPDATE: writers of a service still exclude each other, but rows referencing
    # it (their foreign-key checks take KEY SHARE at commit, e.g. a node report's) don't
    # wait for us; a plain FOR UPDATE deadlocked a service delete with a report.
    locked = (
        Service.objects.select_for_update(no_key=True).select_related("tenant").get(pk=service.pk)
    )
    if locked.state == ServiceState.DELETED:
        raise Conflict(f"service {locked.name} is deleted")
    return locked


def live_containers(service: Service) -> Any:
    return service.containers.filter(desired_state=DesiredState.RUNNING).exclude(
        state__in=[ContainerState.REMOVED, ContainerState.LOST]
    )


def retire(container: Container) -> None:
    """Stop wanting ``container``: the node removes it, then its quota is released."""
    container.desired_state = DesiredState.REMOVED
    container.save(update_fields=["desired_state"])
    if container.node_id is None or container.state == ContainerState.PENDING:
        from workloads.services.reports import finish_container

        finish_container(container)
    else:
        placement.send_remove(container)


@transaction.atomic
def scale_service(service: Service, replicas: int, *, actor: Actor) -> Service:
    service = _lock(service)
    replicas = specs.validate_replicas(replicas)
    current = list(
        live_containers(service).filter(generation=service.generation).order_by("-created_at")
    )
    if replicas > len(current) and service.state == ServiceState.ACTIVE:
        admit_new_usage(service.tenant, "replicas")  # scaling down is always allowed
        _add_replicas(service, replicas - len(current), actor=actor)
    elif replicas < len(current):
        for container in current[: len(current) - replicas]:
            retire(container)
    previous = service.replicas
    service.replicas = replicas
    service.updated_at = timezone.now()
    service.save(update_fields=["replicas", "updated_at"])
    record(
        actor,
        "service.scale",
        tenant=service.tenant,
        target=service,
        details={"from": previous, "to": replicas},
    )
    return service


@transaction.atomic
def deploy_service(service: Service, data: dict[str, Any], *, actor: Actor) -> Deployment:
    """Roll out a new spec start-first: new replicas start beside the old ones, which are
    retired only once every new replica runs (and passes its health check). If a new
    replica fails, the reconciler rolls back (see ``reconcile.advance_deployments``)."""
    service = _lock(service)
    # Input a tenant may never deploy is refused as such (400), whatever else is going on.
    fields = specs.service_fields(data, service.tenant)
    admit_new_usage(service.tenant, "deploy")
    if service.deployments.filter(state=DeploymentState.IN_PROGRESS).exists():
        raise Conflict(f"a deployment of {service.name} is already in progress")
    previous_spec = service.spec()
    previous_generation = service.generation
    generation = (service.deployments.aggregate(m=Max("generation"))["m"] or 0) + 1
    for key, value in fields.items():
        setattr(service, key, value)
    # Every deploy resolves the image again: deploying the same tag after a new build
    # rolls out the new build's digest (a change like any other image change).
    service.resolved_image = builds.resolve_image(service.tenant, service.image)
    changed = set(fields)
    if service.resolved_image != previous_spec["resolved_image"]:
        changed.add("resolved_image")
    service.generation = generation
    service.updated_at = timezone.now()
    service.save()
    deployment = Deployment.objects.create(
        service=service,
        generation=generation,
        previous_generation=previous_generation,
        spec=service.spec(),
        previous_spec=previous_spec,
    )
    if service.state == ServiceState.ACTIVE:
        _add_replicas(service, service.replicas, actor=actor)
    record(
        actor,
        "service.deploy",
        tenant=service.tenant,
        target=service,
        details={"generation": generation, "changed": sorted(changed)},
    )
    return deployment


@transaction.atomic
def stop_service(service: Service, *, actor: Actor) -> Service:
    """Stop every replica and give their quota back; the spec and replica count stay."""
    service = _lock(service)
    for container in live_containers(service):
        retire(container)
    service.state = ServiceState.STOPPED
    service.save(update_fields=["state"])
    record(actor, "service.stop", tenant=service.tenant, target=service)
    return service


@transaction.atomic
def start_service(service: Service, *, actor: Actor) -> Service:
    service = _lock(service)
    admit_new_usage(service.tenant, "service start")
    if service.state != ServiceState.STOPPED:
        raise Conflict(f"service {service.name} is not stopped")
    service.state = ServiceState.ACTIVE
    service.save(update_fields=["state"])
    _add_replicas(service, service.replicas, actor=actor)
    record(actor, "service.start", tenant=service.tenant, target=service)
    return service


def restart_service(service: Service, *, actor: Actor) -> Deployment:
    """A rolling restart is a deployment of the same spec: start-first, health-gated."""
    return deploy_service(service, {}, actor=actor)


@transaction.atomic
def delete_service(service: Service, *, actor: Actor) -> None:
    service = _lock(service)
    for container in live_containers(service):
        retire(container)
    for container in service.containers.filter(state=ContainerState.EXITED).exclude(
        desired_state=DesiredState.REMOVED
    ):
        retire(container)
    service.state = ServiceState.DELETED
    service.save(update_fields=["state"])
    record(actor, "service.delete", tenant=service.tenant, target=service)
