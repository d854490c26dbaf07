"""Image references: ``[host[:port]/]path[:tag][@sha256:<hex>]``, normalised like docker.

``busybox``, ``library/busybox``, ``docker.io/library/busybox`` and ``busybox:latest``
all name the same image; we store the short form (``busybox:latest``) so a tenant's
references read the way they typed them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from runtime_agent.content.store import parse_digest
from runtime_agent.errors import InvalidArgument
from runtime_agent.names import SHARED_NAMESPACE

__all__ = [
    "SHARED_NAMESPACE",
    "Reference",
    "is_registry_host",
    "parse_reference",
    "validate_tenant",
]

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_HOST_RE = re.compile(r"^(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

DEFAULT_TAG = "latest"
_DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")


def is_registry_host(component: str) -> bool:
    """Docker's rule for the first path component of a reference: one with a '.' or a
    ':', or ``localhost``, is a registry host (``127.0.0.1:5000/acme/app``); ``team`` in
    ``team/app`` is not."""
    return "." in component or ":" in component or component == "localhost"


def validate_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not _TENANT_RE.match(tenant):
        raise InvalidArgument(
            f"invalid tenant {tenant!r}: expected [a-z0-9][a-z0-9-]{{0,62}}", tenant=tenant
        )
    return tenant


@dataclass(frozen=True)
class Reference:
    """A parsed reference; ``name`` excludes the tag and digest."""

    name: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def tagged(self) -> str:
        """``name:tag`` (the key under which a tenant's tag is stored)."""
        return f"{self.name}:{self.tag or DEFAULT_TAG}"


def parse_reference(text: str, *, default_tag: bool = True) -> Reference:
    """Parse and normalise; a missing tag becomes ``latest`` unless a digest is given."""
    if not isinstance(text, str) or not text or len(text) > 512:
        raise InvalidArgument(f"invalid reference format: {text!r}")
    rest = text
    digest: str | None = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        parse_digest(digest)
    tag: str | None = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise InvalidArgument(f"invalid reference format: bad tag in {text!r}")
    parts = rest.split("/")
    host: str | None = None
    if len(parts) > 1 and (is_registry_host(parts[0]) or parts[0] != parts[0].lower()):
        host = parts[0]
        if not _HOST_RE.match(host):
            raise InvalidArgument(f"invalid reference format: bad registry host in {text!r}")
        parts = parts[1:]
    if host in _DOCKER_HUB_HOSTS:
        host = None
    if host is None and len(parts) > 1 and parts[0] == SHARED_NAMESPACE:
        parts = parts[1:]
    path = "/".join(parts)
    if not _NAME_RE.match(path):
        raise InvalidArgument(
            f"invalid reference format: {text!r} (repository names are lowercase "
            "letters, digits and separators)"
        )
    name = f"{host}/{path}" if host else path
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(name=name, tag=tag, digest=digest)
