"""Manifest media types and platform matching."""

from __future__ import annotations

import platform as _platform
from dataclasses import dataclass

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

IMAGE_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

_ARCH = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform must be os/arch[/variant], got {text!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    def matches(self, descriptor_platform: dict[str, object]) -> bool:
        if descriptor_platform.get("os") != self.os:
            return False
        if descriptor_platform.get("architecture") != self.architecture:
            return False
        variant = str(descriptor_platform.get("variant") or "")
        # arm64 images often omit the (only) v8 variant.
        return not variant or not self.variant or variant == self.variant


def node_platform() -> Platform:
    """The platform containers on this node run as (linux/<arch>[/variant])."""
    arch, variant = _ARCH.get(_platform.machine().lower(), (_platform.machine().lower(), ""))
    return Platform("linux", arch, variant)
