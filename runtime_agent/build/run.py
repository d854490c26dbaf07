"""RUN steps in runc containers on overlay snapshots of the parent layers.

Each step gets: a snapshot of the parent image (``Snapshotter.prepare``), an OCI bundle
with Docker's security defaults (``runtime/security.py``), cgroup limits from the build
(memory with swap capped to the same value, CPU quota, pids), a network namespace
(loopback only, or a tenant network through ``NetworkManager.attach``), and a wall-time
limit enforced with ``runc kill``. Afterwards the snapshot's upper dir becomes the step's
layer (``Snapshotter.diff``: deletions become whiteouts, owners and modes are kept) and
everything made for the step is removed, on every path.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime_agent.build.layers import FsIndex, index_for, lookup_ids, supplementary_gids
from runtime_agent.build.steps import RunRequest, RunResult
from runtime_agent.errors import AgentError
from runtime_agent.images import media

if TYPE_CHECKING:
    from runtime_agent.agent import Agent
    from runtime_agent.cgroups import CgroupDriver
    from runtime_agent.images.store import Image
    from runtime_agent.runtime.security import IdRange

EXIT_SIGKILL = 137
HOSTNAME = "buildkitsandbox"


def _mounts(resolv: Path | None, hosts: Path | None) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",  # noqa: S108
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
    ]
    for target, source in (("/etc/resolv.conf", resolv), ("/etc/hosts", hosts)):
        if source is not None:
            mounts.append(
                {
                    "destination": target,
                    "type": "bind",
                    "source": str(source),
                    "options": ["rbind", "ro"],
                }
            )
    return mounts


class ContainerStepRunner:
    """``StepRunner`` on runc + the agent's snapshotter, security defaults and networks."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.config = agent.config
        self._cgroup_driver: CgroupDriver | None = None
        self._indexes: dict[tuple[str, ...], FsIndex] = {}

    def _image(self, request: RunRequest) -> Image:
        """The parent layers as an (uncommitted) Image the snapshotter can mount."""
        from runtime_agent.images.store import Image

        layers = request.layers
        diff_ids = [self.agent.images.diff_id(layer) for layer in layers]
        chains = media.chain_ids(diff_ids)
        ident = "sha256:" + (chains[-1].split(":", 1)[1] if chains else "0" * 64)
        return Image(
            tenant=request.tenant,
            reference=None,
            manifest_digest=ident,
            config_digest=ident,
            manifest={},
            config={},
            layers=layers,
            diff_ids=diff_ids,
            chain_ids=chains,
            size=sum(int(layer.get("size", 0)) for layer in layers),
        )

    def _user(self, request: RunRequest) -> tuple[int, int, list[int]]:
        """USER resolved against the image's passwd/group (as docker does at run time)."""
        key = tuple(layer["digest"] for layer in request.layers)
        index = self._indexes.get(key)
        if index is None:
            index = index_for(self.agent.content, request.layers)
            if len(self._indexes) >= 16:
                self._indexes.pop(next(iter(self._indexes)))
            self._indexes[key] = index
        spec = request.user or "0"
        uid, gid = lookup_ids(index, self.agent.content, spec, where="USER")
        return uid, gid, supplementary_gids(index, self.agent.content, spec, uid, gid)

    def _spec(
        self,
        request: RunRequest,
        rootfs: Path,
        netns: str | None,
        resolv: Path | None,
        hosts: Path | None,
        ids: IdRange | None = None,
    ) -> dict[str, Any]:
        from runtime_agent.runtime.security import apply_security_defaults, tenant_userns

        uid, gid, extra = self._user(request)
        limits = request.limits
        namespaces: list[dict[str, str]] = [
            {"type": "pid"},
            {"type": "ipc"},
            {"type": "uts"},
            {"type": "mount"},
        ]
        namespaces.append({"type": "network", "path": netns} if netns else {"type": "network"})
        spec: dict[str, Any] = {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": uid, "gid": gid, "additionalGids": extra},
                "args": request.argv,
                "env": request.env,
                "cwd": request.workdir or "/",
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
            },
            "root": {"path": str(rootfs), "readonly": False},
            "hostname": HOSTNAME,
            "mounts": _mounts(resolv, hosts),
            "linux": {
                "namespaces": namespaces,
                "cgroupsPath": self._cgroups().cgroups_path(request.tenant, request.key),
                "resources": {
                    "memory": {"limit": limits.memory_bytes, "swap": limits.memory_bytes},
                    "cpu": {"quota": int(limits.cpus * 100_000), "period": 100_000},
                    "pids": {"limit": limits.pids},
                },
            },
        }
        userns = tenant_userns(self.config, request.tenant) if ids is not None else None
        return apply_security_defaults(spec, user_namespace=ids, userns_path=userns)

    def run_step(self, request: RunRequest) -> RunResult:
        runc_id = f"{self.config.name}-{request.key}"[:64]
        bundle = self.config.run_root / "build" / request.key
        container_id = secrets.token_hex(32)
        snapshots = self.agent.snapshots
        attached = False
        runc = [self.config.runc, "--root", str(self.config.runc_root)]
        try:
            rootfs = snapshots.prepare(request.key, self._image(request), tenant=request.tenant)
            ids = None
            if request.limits.user_namespace:
                from runtime_agent.runtime.security import user_namespace_for

                # Container root becomes the tenant's unprivileged id range; the layers
                # are idmapped, so the step's diff still records container-view owners.
                ids = user_namespace_for(self.agent, request.tenant, request.key)
            # Docker creates the working directory of a step if the image lacks it.
            workdir = rootfs / (request.workdir or "/").lstrip("/")
            if not os.path.lexists(workdir):
                workdir.mkdir(parents=True, mode=0o755)
            bundle.mkdir(parents=True, exist_ok=True)
            if ids is not None:
                from runtime_agent.runtime.security import ensure_traversable

                ensure_traversable(bundle)
            netns, resolv, hosts = None, None, None
            if request.limits.network is not None:
                from runtime_agent.protocol import NetworkAttachment

                attachments = (
                    []
                    if request.limits.network == "default"
                    else [NetworkAttachment(network=request.limits.network)]
                )
                setup = self._networks().attach(
                    request.tenant, container_id, HOSTNAME, attachments, name=request.key
                )
                attached = True
                netns = setup.netns_path
                resolv, hosts = bundle / "resolv.conf", bundle / "hosts"
                resolv.write_text(setup.resolv_conf)
                hosts.write_text(setup.hosts)
            spec = self._spec(request, rootfs, netns, resolv, hosts, ids)
            # Mount points runc has to create (/proc, /dev, /sys, ...) are not part of the
            # step's change: docker keeps them in an init layer that never gets committed.
            mountpoints = [
                m["destination"]
                for m in spec["mounts"]
                if not os.path.lexists(rootfs / m["destination"].lstrip("/"))
            ]
            (bundle / "config.json").write_text(json.dumps(spec))
            exit_code, timed_out = self._run(runc, runc_id, bundle, request)
            oom = exit_code == EXIT_SIGKILL and not timed_out and self._was_oom(request)
            layer = None
            if exit_code == 0:
                _drop_mountpoints(snapshots.upper_dir(request.key), mountpoints)
                layer = snapshots.diff(request.key)
                if _is_empty_layer(self.agent, layer):
                    layer = None
            return RunResult(exit_code, layer, timed_out=timed_out, oom_killed=oom)
        finally:
            subprocess.run([*runc, "delete", "--force", runc_id], capture_output=True, check=False)
            if attached:
                with contextlib.suppress(AgentError):
                    self._networks().detach(request.tenant, container_id)
            snapshots.remove(request.key)
            shutil.rmtree(bundle, ignore_errors=True)
            with contextlib.suppress(OSError):
                self._cgroups().remove(request.tenant, request.key)

    def _cgroups(self) -> CgroupDriver:
        """The host's cgroup driver: the step's cgroup sits under the tenant's parent, so
        tenant-wide caps apply to builds too."""
        if self._cgroup_driver is None:
            from runtime_agent.cgroups import driver

            self._cgroup_driver = driver(self.config)
        return self._cgroup_driver

    def _networks(self) -> Any:
        networks = getattr(self.agent, "networks", None)
        if networks is None:
            from runtime_agent.network.manager import NetworkManager

            networks = NetworkManager(self.config)
        return networks

    def _was_oom(self, request: RunRequest) -> bool:
        """A SIGKILL we did not send, under a memory limit, is the OOM killer's."""
        return request.limits.memory_bytes > 0

    def _run(
        self, runc: list[str], runc_id: str, bundle: Path, request: RunRequest
    ) -> tuple[int, bool]:
        proc = subprocess.Popen(
            [*runc, "run", "--bundle", str(bundle), runc_id],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        timed_out = threading.Event()

        def kill_at_deadline() -> None:
            if proc.poll() is None:
                timed_out.set()
                subprocess.run([*runc, "kill", runc_id, "KILL"], capture_output=True, check=False)

        timer = threading.Timer(request.limits.step_timeout, kill_at_deadline)
        timer.daemon = True
        timer.start()
        try:
            stdout = proc.stdout
            assert stdout is not None
            while chunk := os.read(stdout.fileno(), 65536):
                request.on_output(chunk)
            code = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                subprocess.run([*runc, "kill", runc_id, "KILL"], capture_output=True, check=False)
                proc.wait(timeout=30)
        if code < 0:
            code = 128 - code
        return code, timed_out.is_set()


def _drop_mountpoints(upper: Path, mountpoints: list[str]) -> None:
    """Remove the empty mount points runc created from the step's upper dir."""
    for destination in sorted(mountpoints, key=len, reverse=True):
        path = upper / destination.lstrip("/")
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()  # only if still empty
            elif path.is_file() and path.stat().st_size == 0:
                path.unlink()


def _is_empty_layer(agent: Agent, layer: dict[str, Any]) -> bool:
    """A step that changed nothing produces a tar with no entries: docker's empty layer."""
    import tarfile

    with agent.content.open(layer["digest"]) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        return next(iter(tar), None) is None
