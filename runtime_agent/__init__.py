"""Berth node agent: images, snapshots, builds, runc containers, cgroups, networks, volumes.

Plain Python, runs as root on a Linux node, and never imports Django: it talks to the
control plane only through the Celery payloads in ``runtime_agent.protocol``.
"""

__version__ = "0.1.0"
