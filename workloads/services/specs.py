"""Validation of workload specs and their translation into node ContainerSpecs."""

from __future__ import annotations

import re
import uuid
from typing import Any

from django.conf import settings

from runtime_agent import netpolicy, protocol
from tenants.errors import InvalidInput, PermissionDenied
from tenants.models import Tenant
from workloads.models import Container, Service
from workloads.scheduling import PLATFORM_LABEL_PREFIX, is_platform_label
from workloads.secrets import MAX_SECRET_BYTES, encrypt_secrets
from workloads.services.storage import mounts_for

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_REPLICAS = 100
MAX_ENV_BYTES = 256 * 1024


def validate_env(env: Any, *, field: str = "env") -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise InvalidInput(f"{field} must be an object of NAME: value")
    total = 0
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME_RE.match(key):
            raise InvalidInput(f"{field} name {key!r} is not a valid variable name")
        if not isinstance(value, str):
            raise InvalidInput(f"{field}.{key} must be a string")
        total += len(key) + len(value.encode())
    if total > MAX_ENV_BYTES:
        raise InvalidInput(f"{field} is {total} bytes; at most {MAX_ENV_BYTES} are allowed")
    return dict(env)


def validate_secrets(secrets: Any) -> dict[str, str]:
    clean = validate_env(secrets, field="secrets")
    for key, value in clean.items():
        if len(value.encode()) > MAX_SECRET_BYTES:
            raise InvalidInput(
                f"secret {key} is {len(value.encode())} bytes; at most {MAX_SECRET_BYTES}",
                details={"secret": key, "limit_bytes": MAX_SECRET_BYTES},
            )
    return clean


class HostPortNotAllowed(InvalidInput):
    """A host port a tenant may not publish: privileged, or one of the node's services."""

    code = "host_port_not_allowed"


def host_port_refusal(port: int) -> str | None:
    """Why a tenant may not publish ``port`` on a node (0, ephemeral, is always fine)."""
    if port == 0:
        return None
    if port < settings.BERTH_TENANT_MIN_HOST_PORT:
        return (
            f"host_port {port} is a privileged port: publish "
            f"{settings.BERTH_TENANT_MIN_HOST_PORT}-65535, or 0 for an ephemeral port"
        )
    if port in settings.BERTH_RESERVED_HOST_PORTS:
        return f"host_port {port} is reserved for the node's own services"
    return None


def validate_ports(ports: Any) -> list[dict[str, Any]]:
    """``[{container_port, host_port, protocol}]``; a fixed host port must be one a tenant
    may publish (:func:`host_port_refusal`) and appear once per protocol."""
    if ports is None:
        return []
    if not isinstance(ports, list):
        raise InvalidInput("ports must be a list")
    clean: list[dict[str, Any]] = []
    for item in ports:
        if not isinstance(item, dict):
            raise InvalidInput("each port must be an object {container_port, host_port, protocol}")
        container_port = item.get("container_port")
        host_port = item.get("host_port", 0)
        protocol_name = item.get("protocol", "tcp")
        for name, value, low in (
            ("container_port", container_port, 1),
            ("host_port", host_port, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
                raise InvalidInput(
                    f"{name} must be an integer between {low} and 65535, got {value!r}",
                    details={"field": name},
                )
        if protocol_name not in ("tcp", "udp"):
            raise InvalidInput(f"protocol must be tcp or udp, got {protocol_name!r}")
        details = {"field": "host_port", "host_port": host_port}
        if (refusal := host_port_refusal(host_port)) is not None:
            raise HostPortNotAllowed(refusal, details=details)
        if host_port and any(
            (p["host_port"], p["protocol"]) == (host_port, protocol_name) for p in clean
        ):
            raise InvalidInput(
                f"host_port {host_port}/{protocol_name} is published twice", details=details
            )
        clean.append(
            {"container_port": container_port, "host_port": host_port, "protocol": protocol_name}
        )
    return clean


def validate_argv(value: Any, field: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"{field} must be a list of strings")
    return list(value)


def validate_health_check(value: Any) -> dict[str, Any] | None:
    """``{"test": [argv], "interval": s, "retries": n, "timeout": s, "start_period": s}``."""
    if value is None:
        return None
    if not isinstance(value, dict) or not validate_argv(value.get("test"), "health_check.test"):
        raise InvalidInput("health_check needs test: a non-empty list of strings (argv)")
    clean: dict[str, Any] = {"test": list(value["test"])}
    for key, default, high in (("retries", 3, 100), ("timeout", 5, 300), ("start_period", 0, 3600)):
        number = value.get(key, default)
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= high:
            raise InvalidInput(f"health_check.{key} must be an integer between 0 and {high}")
        clean[key] = number
    return clean


class RegistryNotAllowed(InvalidInput):
    """An image names a registry the operator has not allowed tenants to pull from."""

    code = "registry_not_allowed"


def validate_image_registry(image: str) -> str:
    """``image`` unless it names a registry other than the platform's own
    (``BERTH_REGISTRY_HOST``) and the operator's ``BERTH_ALLOWED_REGISTRIES``: the node
    would pull from that host, so a tenant could aim it at anything the node reaches
    (its own or the control plane's ports). The rule is the agent's own
    (``runtime_agent.netpolicy``), which the node applies again before it pulls."""
    allowed = [settings.BERTH_REGISTRY_HOST, *settings.BERTH_ALLOWED_REGISTRIES]
    reason = netpolicy.registry_refusal(image, allowed)
    if reason is not None:
        raise RegistryNotAllowed(
            reason,
            details={
                "field": "image",
                "registry": netpolicy.registry_of(image),
                "allowed_registries": sorted({netpolicy.normalize_registry(r) for r in allowed}),
            },
        )
    return image


def validate_image_access(tenant: Tenant, image: str) -> str:
    """``image`` unless it is another tenant's private repository on the platform's
    registry (``registry.services.image_access_error``): the node pulls with the tenant's
    rights, so such a container could never start; say so now."""
    from registry import services as registry_services

    if problem := registry_services.image_access_error(tenant, image):
        raise PermissionDenied(problem, details={"field": "image", "image": image})
    return image


def service_fields(data: dict[str, Any], tenant: Tenant | None = None) -> dict[str, Any]:
    """Validate the deployable fields of a service; secrets come back encrypted.

    With ``tenant``, the volumes and networks named must exist in it.
    """
    from workloads.services import storage

    fields: dict[str, Any] = {}
    if "volumes" in data:
        fields["volumes"] = storage.validate_service_volumes(tenant, data["volumes"])
    if "networks" in data:
        fields["networks"] = storage.validate_service_networks(tenant, data["networks"])
    if "image" in data:
        image = data["image"]
        if not isinstance(image, str) or not image.strip() or len(image) > 300:
            raise InvalidInput("image must be a non-empty image reference")
        fields["image"] = validate_image_registry(image.strip())
        if tenant is not None:
            validate_image_access(tenant, fields["image"])
    if "command" in data:
        fields["command"] = validate_argv(data["command"], "command")
    if "entrypoint" in data:
        fields["entrypoint"] = validate_argv(data["entrypoint"], "entrypoint")
    if "env" in data:
        fields["env"] = validate_env(data["env"])
    if "secrets" in data:
        secrets = validate_secrets(data["secrets"])
        fields["secrets_encrypted"] = encrypt_secrets(secrets) if secrets else ""
        fields["secret_names"] = sorted(secrets)
    if "ports" in data:
        fields["ports"] = validate_ports(data["ports"])
    if "health_check" in data:
        fields["health_check"] = validate_health_check(data["health_check"])
    for key, low, high in (
        ("cpu_millicores", 10, 256_000),
        ("memory_mib", 6, 1_048_576),
        ("gpus", 0, 64),
    ):
        if key in data:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidInput(f"{key} must be an integer between {low} and {high}")
            fields[key] = value
    if "blkio_bps" in data and data["blkio_bps"] is not None:
        value = data["blkio_bps"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
            raise InvalidInput("blkio_bps must be an integer of at least 1024 (bytes/s)")
        fields["blkio_bps"] = value
    if "restart_policy" in data:
        if data["restart_policy"] not in ("no", "on-failure", "always", "unless-stopped"):
            raise InvalidInput("restart_policy must be no, on-failure, always or unless-stopped")
        fields["restart_policy"] = data["restart_policy"]
    if "constraints" in data:
        fields["constraints"] = validate_env_like_labels(data["constraints"])
    return fields


def validate_env_like_labels(value: Any) -> dict[str, str]:
    """A service's placement constraints: node label → value, never a platform label
    (``berth.*``, e.g. ``berth.node.id``: it would let a tenant pick a victim's node)."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidInput("constraints must be an object of label: value")
    reserved = sorted(k for k in value if is_platform_label(k))
    if reserved:
        raise InvalidInput(
            f"constraints may not name platform labels ({', '.join(reserved)}): labels "
            f"{PLATFORM_LABEL_PREFIX}* are set and used by Berth itself",
            details={"field": "constraints", "labels": reserved},
        )
    return dict(value)


def validate_replicas(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPLICAS:
        raise InvalidInput(f"replicas must be an integer between 0 and {MAX_REPLICAS}")
    return value


def limits(
    tenant: Tenant, cpu_millicores: int, memory_mib: int, blkio_bps: int | None
) -> dict[str, Any]:
    """A container's node limits. What the workload leaves unset is the tenant's plan cap,
    never unlimited: block I/O (``blkio_bps``) and processes (``pids``, which a workload
    cannot ask for at all: a fork bomb stops there instead of at the node's pid_max)."""
    caps = tenant.quota_limits()
    blkio = caps["blkio_bps"] if blkio_bps is None else blkio_bps
    return protocol.to_dict(
        protocol.Limits(
            cpus=cpu_millicores / 1000,
            memory_bytes=memory_mib * 1024 * 1024,
            pids=caps["pids"],
            device_read_bps=blkio,
            device_write_bps=blkio,
        )
    )


def default_network_mode() -> str:
    return getattr(settings, "BERTH_DEFAULT_NETWORK_MODE", "bridge")


def new_service_container(service: Service) -> Container:
    """An unsaved Container for one replica of ``service``'s current generation."""
    uid = uuid.uuid4()
    container = Container(
        id=uid,
        tenant=service.tenant,
        service=service,
        name=service.name,
        generation=service.generation,
        cpu_millicores=service.cpu_millicores,
        memory_mib=service.memory_mib,
        gpus=service.gpus,
    )
    spec = protocol.ContainerSpec(
        tenant=service.tenant.slug,
        image=service.run_image,
        name=container.agent_name,
        command=tuple(service.command) if service.command is not None else None,
        entrypoint=tuple(service.entrypoint) if service.entrypoint is not None else None,
        env=dict(service.env),
        hostname=service.name,
        labels={
            protocol.CONTAINER_UID_LABEL: str(uid),
            "berth.service": service.name,
            "berth.generation": str(service.generation),
        },
        limits=protocol.from_dict(
            protocol.Limits,
            limits(service.tenant, service.cpu_millicores, service.memory_mib, service.blkio_bps),
        ),
        network_mode=default_network_mode(),  # type: ignore[arg-type]
        networks=tuple(
            protocol.NetworkAttachment(network=n, aliases=(service.name,)) for n in service.networks
        ),
        ports=tuple(protocol.PortMapping(**p) for p in service.ports),
        mounts=mounts_for(service.tenant, service.volumes or []),
    )
    container.spec = {
        **protocol.to_dict(spec),
        "secrets_encrypted": service.secrets_encrypted,
        "constraints": service.constraints,
    }
    return container
