"""Devices handed to containers through CDI specs (see ``cdi``)."""

from __future__ import annotations

from runtime_agent.devices.cdi import (
    CDIRegistry,
    ContainerEdits,
    InvalidCDISpec,
    UnknownDevice,
    apply_edits,
    list_devices,
    parse_qualified_name,
    resolve,
)

__all__ = [
    "CDIRegistry",
    "ContainerEdits",
    "InvalidCDISpec",
    "UnknownDevice",
    "apply_edits",
    "list_devices",
    "parse_qualified_name",
    "resolve",
]
