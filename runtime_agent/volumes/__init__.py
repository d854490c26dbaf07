"""Per-tenant named volumes with optional hard size limits (see ``manager``)."""

from __future__ import annotations

from runtime_agent.volumes.manager import Volume, VolumeManager, VolumeMountError

__all__ = ["Volume", "VolumeManager", "VolumeMountError"]
