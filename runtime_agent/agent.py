"""The agent's Python API: one object wiring the subsystems together.

The CLI, the Celery worker and tests all go through ``Agent``; each subsystem is built
lazily so a command that only lists images never touches cgroups or the network.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from runtime_agent.config import AgentConfig

if TYPE_CHECKING:
    from runtime_agent.build.builder import Builder
    from runtime_agent.content.store import ContentStore
    from runtime_agent.images.store import ImageStore
    from runtime_agent.network.manager import NetworkManager
    from runtime_agent.runtime.manager import ContainerManager
    from runtime_agent.snapshots.snapshotter import Snapshotter
    from runtime_agent.volumes.manager import VolumeManager


class Agent:
    def __init__(self, config: AgentConfig | None = None) -> None:
        self.config = config or AgentConfig()

    @cached_property
    def content(self) -> ContentStore:
        from runtime_agent.content.store import ContentStore

        return ContentStore(self.config.content_dir)

    @cached_property
    def images(self) -> ImageStore:
        from runtime_agent.images.store import ImageStore

        return ImageStore(self.config, self.content)

    @cached_property
    def snapshots(self) -> Snapshotter:
        from runtime_agent.snapshots.snapshotter import Snapshotter

        return Snapshotter(self.config, self.content)

    @cached_property
    def volumes(self) -> VolumeManager:
        from runtime_agent.volumes.manager import VolumeManager

        return VolumeManager(self.config)

    @cached_property
    def builder(self) -> Builder:
        from runtime_agent.build.builder import Builder

        return Builder(self)

    @cached_property
    def networks(self) -> NetworkManager:
        from runtime_agent.network.manager import NetworkManager

        return NetworkManager(self.config)

    @cached_property
    def containers(self) -> ContainerManager:
        from runtime_agent.runtime.manager import ContainerManager

        return ContainerManager(self)
