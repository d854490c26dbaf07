"""ContainerManager (``agent.containers``): containers' lifecycle through runc and conmon.

One container = a directory ``containers/<tenant>/<id>/`` holding its record, its OCI
bundle (``config.json``; the rootfs is the snapshot mounted by the Snapshotter), its log
(``ctr.log``) and its monitor's files (``monitor/``). State transitions follow the table
in ``runtime.state``; the true state of a running container is re-read from what its
conmon wrote (exit file, oom file), so any agent process — or one started after a crash —
reports the same thing.

Restart policies: conmon runs ``python -m runtime_agent.runtime.exithook`` when a
container with a restart policy (or ``--rm`` while detached) exits; the hook waits out the
back-off (100 ms doubling to 1 min, reset after 10 s of running) and starts it again.
``recover()`` at agent start catches up with anything a hook couldn't do (node reboot).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import os
import re
import secrets
import select
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO

from runtime_agent import protocol
from runtime_agent.errors import (
    AgentError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from runtime_agent.runtime import state as st
from runtime_agent.runtime.logs import LogEntry, follow_logs, read_logs
from runtime_agent.runtime.monitor import (
    MonitorPaths,
    MonitorStart,
    Runc,
    RuntimeFailure,
    exit_hook_command,
    process_start_time,
    read_exit,
)
from runtime_agent.runtime.state import ContainerRecord, RecordStore

if TYPE_CHECKING:
    from pathlib import Path

    from runtime_agent.agent import Agent
    from runtime_agent.cgroups import CgroupDriver, CgroupStats
    from runtime_agent.network import NetworkSetup

_background_pool: ThreadPoolExecutor | None = None


def _background() -> ThreadPoolExecutor:
    """Threads for the network work that overlaps the rest of create and rm.

    Made on first use, so a process that only imports this module (the CLI server,
    which must fork from a single thread) has none. The threads live as long as the
    process: NetworkManager keeps a netlink socket per thread.
    """
    global _background_pool
    if _background_pool is None:
        _background_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="berth-net")
    return _background_pool


def warm_background() -> None:
    """Start the background thread now (the CLI server's spare, before its command)."""
    _background().submit(int).result()


TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
EXIT_UNKNOWN = 255  # the monitor vanished (node reboot): docker reports 255 too
BACKOFF_START = 0.1
BACKOFF_MAX = 60.0
BACKOFF_RESET_AFTER = 10.0


def validate_tenant(tenant: str) -> None:
    if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
        raise InvalidArgument(f"invalid tenant name {tenant!r}: use [a-z0-9][a-z0-9-]{{0,62}}")


@dataclass(frozen=True)
class ContainerInfo:
    """One container as ``ps`` shows it (``inspect`` gives docker's full shape)."""

    id: str
    tenant: str
    name: str
    image: str
    image_id: str
    manifest_digest: str
    snapshot_key: str
    command: str
    state: str
    created: str
    started_at: str | None
    finished_at: str | None
    exit_code: int | None
    oom_killed: bool
    restart_count: int
    pid: int
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def short_id(self) -> str:
        return self.id[:12]


@dataclass(frozen=True)
class ContainerStats:
    id: str
    name: str
    cpu_seconds: float
    memory_bytes: int
    memory_limit_bytes: int | None
    io_read_bytes: int
    io_write_bytes: int
    pids: int
    pids_limit: int | None
    oom_kills: int


ATTACH_CHUNK = 8192  # conmon reads an attach socket message into an 8 KiB buffer


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_iso(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


class ContainerManager:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.config = agent.config
        self.store = RecordStore(self.config.containers_dir)
        self._runc: Runc | None = None
        self._cgroups: CgroupDriver | None = None

    # ------------------------------------------------------------------ plumbing

    @property
    def runc(self) -> Runc:
        if self._runc is None:
            self._runc = Runc(self.config)
        return self._runc

    @property
    def cgroups(self) -> CgroupDriver:
        if self._cgroups is None:
            from runtime_agent.cgroups import driver, tune_host

            tune_host(self.config)
            self._cgroups = driver(self.config)
        return self._cgroups

    def _paths(self, record: ContainerRecord) -> MonitorPaths:
        return MonitorPaths(self.store.dir(record.tenant, record.id))

    def _find(self, tenant: str, ref: str) -> ContainerRecord:
        """A container of ``tenant`` by full id, name or unique id prefix."""
        validate_tenant(tenant)
        if not ref or "/" in ref or ref.startswith("."):
            raise NotFound(f"No such container: {ref}")
        record = self.store.load(tenant, ref) if len(ref) == 64 else None
        if record is not None:
            return record
        records = self.store.all(tenant)
        for candidate in records:
            if candidate.name == ref:
                return candidate
        matches = [r for r in records if r.id.startswith(ref.lower())]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InvalidArgument(f"multiple containers match the id prefix {ref!r}")
        raise NotFound(f"No such container: {ref}", tenant=tenant)

    def _observe(self, record: ContainerRecord, *, persist: bool = True) -> ContainerRecord:
        """Fold in what the monitor recorded: a running container may have exited.

        ``persist=False`` only reads: the caller gets the exit (code, OOM flag, time)
        folded into a copy of ``record`` and the record file stays as it was, for the
        next observer to update. ``wait`` and ``rm`` read this way: the one returns the
        exit code, the other deletes the record, and on ext4 replacing the record file
        costs 0.3-0.8 ms (the rename flushes the new file first, see auto_da_alloc in
        ext4(5)) on the path from the container's exit to the caller's answer.
        """
        if record.status not in (st.RUNNING, st.PAUSED):
            return record
        paths = self._paths(record)
        status = read_exit(paths)
        if status is None:
            if process_start_time(record.pid) == record.pid_start or self._monitor_alive(paths):
                return record
            status = read_exit(paths)  # the monitor may have finished in between
        if status is None:
            # Neither the container nor its monitor exists (node reboot, monitor killed).
            status_code, oom, finished = EXIT_UNKNOWN, False, time.time()
        else:
            status_code, oom, finished = status.exit_code, status.oom_killed, status.finished_at
        if not persist:
            return dataclasses.replace(
                record,
                status=st.transition(record.status, "exit", name=record.name),
                exit_code=status_code,
                oom_killed=oom,
                finished_at=_iso(finished),
                pid=0,
            )
        with self.store.lock(record.tenant, record.id):
            fresh = self.store.load(record.tenant, record.id)
            if fresh is None:
                return record
            if fresh.status in (st.RUNNING, st.PAUSED):
                if not oom and status is not None and status_code == 137:
                    # conmon watches for OOM kills only once runc returned; one that came
                    # sooner is still counted by the memory cgroup (until runc delete).
                    with contextlib.suppress(OSError):
                        oom = self.cgroups.stats(fresh.tenant, fresh.id).oom_kills > 0
                fresh.status = st.transition(fresh.status, "exit", name=fresh.name)
                fresh.exit_code = status_code
                fresh.oom_killed = oom
                fresh.finished_at = _iso(finished)
                fresh.pid = 0
                self.store.save(fresh)  # runc's state goes at the next start or at rm
            return fresh

    @staticmethod
    def _monitor_alive(paths: MonitorPaths) -> bool:
        try:
            pid = int(paths.conmon_pid_file.read_text().strip())
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return False
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        state = stat[stat.rfind(")") + 2 :].split(" ", 1)[0]
        return name == "conmon" and state not in ("Z", "X")  # a zombie monitors nothing

    def _info(self, record: ContainerRecord) -> ContainerInfo:
        return ContainerInfo(
            id=record.id,
            tenant=record.tenant,
            name=record.name,
            image=record.image,
            image_id=record.image_id,
            manifest_digest=record.manifest_digest,
            snapshot_key=record.snapshot_key,
            command=_command_line(record.args),
            state=record.status,
            created=record.created,
            started_at=record.started_at,
            finished_at=record.finished_at,
            exit_code=record.exit_code,
            oom_killed=record.oom_killed,
            restart_count=record.restart_count,
            pid=record.pid,
            labels=dict(record.labels),
        )

    # ------------------------------------------------------------------ create

    def create(self, spec: protocol.ContainerSpec) -> ContainerInfo:
        """Prepare everything a container needs to start; nothing is left if this fails."""
        record, image = self._new_record(spec)
        try:
            self._build_bundle(record, spec, image)
        except BaseException:
            self._cleanup(record)
            raise
        record.status = st.CREATED
        self.store.save(record)
        return self._info(record)

    def _new_record(self, spec: protocol.ContainerSpec) -> tuple[ContainerRecord, Any]:
        """Validate ``spec``, resolve its image and claim its name: the record (status
        "creating") and its directory exist when this returns."""
        from runtime_agent.runtime.spec import validate_limits

        validate_tenant(spec.tenant)
        if spec.name is not None and not NAME_RE.match(spec.name):
            raise InvalidArgument(
                f"invalid container name {spec.name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
            )
        validate_limits(spec.limits)
        if spec.restart.name not in ("no", "on-failure", "always", "unless-stopped"):
            raise InvalidArgument(f"invalid restart policy {spec.restart.name!r}")
        if spec.restart.name != "no" and spec.auto_remove:
            raise InvalidArgument("conflicting options: --restart and --rm")
        if spec.network_mode == "host" and not spec.privileged_caller:
            raise InvalidArgument("host networking is only for privileged callers")
        image = self.agent.images.resolve(spec.tenant, spec.image)
        container_id = secrets.token_hex(32)
        with self.store.tenant_lock(spec.tenant):
            if spec.name is not None:
                for other in self.store.all(spec.tenant):
                    if other.name == spec.name:
                        raise AlreadyExists(
                            f'the container name "{spec.name}" is already in use by container '
                            f'"{other.id}". You have to remove (or rename) that container to be '
                            "able to reuse that name.",
                            name=spec.name,
                        )
            name = spec.name or _random_name(container_id)
            directory = self.store.dir(spec.tenant, container_id)
            directory.mkdir(parents=True)
            record = ContainerRecord(
                id=container_id,
                tenant=spec.tenant,
                name=name,
                runc_id=f"{self.config.name}-{container_id[:32]}",
                image=spec.image,
                image_id=image.config_digest,
                manifest_digest=image.manifest_digest,
                snapshot_key=container_id,
                created=st.now_iso(),
                status="creating",
                spec=protocol.to_dict(spec),
                labels=dict(spec.labels),
                creator=_this_process(),
            )
            self.store.save(record)
        return record, image

    def _build_bundle(
        self, record: ContainerRecord, spec: protocol.ContainerSpec, image: Any
    ) -> None:
        import json

        from runtime_agent.runtime import spec as oci
        from runtime_agent.runtime.security import apply_security_defaults, tenant_userns

        directory = self.store.dir(record.tenant, record.id)
        hostname = spec.hostname or record.id[:12]
        # The network (netns, veth, addresses, DNS) is set up meanwhile, in a thread: it
        # needs nothing from the rootfs, and the two together take longer than either.
        attaching = None
        if spec.network_mode != "none":  # "none": runc makes a netns with only loopback
            attaching = _background().submit(self._attach_network, record, spec, hostname)
        try:
            rootfs, ids, process, user, resources, mounts = self._prepare_rootfs(
                record, spec, image, hostname
            )
        except BaseException:
            if attaching is not None:
                with contextlib.suppress(Exception):
                    self._settle_network(record, attaching)  # so that _cleanup detaches it
            raise
        netns_path: str | None = None
        resolv = hosts = None
        if attaching is not None:
            setup = self._settle_network(record, attaching)
            netns_path = setup.netns_path
            resolv, hosts = setup.resolv_conf, setup.hosts
        etc_files = {
            "hostname": hostname + "\n",
            "hosts": hosts or "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n",
            "resolv.conf": resolv or "",
        }
        for file_name, text in etc_files.items():
            (directory / file_name).write_text(text)
            mounts.append(
                {
                    "destination": f"/etc/{file_name}",
                    "type": "bind",
                    "source": str(directory / file_name),
                    "options": ["rbind", "rprivate", "nosuid", "nodev", "noexec"],
                }
            )
        config = oci.build_config(
            rootfs=rootfs,
            process=process,
            user=user,
            hostname=hostname,
            cgroups_path=self.cgroups.cgroups_path(record.tenant, record.id),
            resources=resources,
            netns_path=netns_path,
            network_mode=spec.network_mode,
            extra_mounts=mounts,
            cgroup_namespace=self.cgroups.version == 2,
        )
        if spec.devices:
            from runtime_agent.devices.cdi import CDIRegistry

            CDIRegistry().apply(config, list(spec.devices))
        apply_security_defaults(
            config,
            read_only_rootfs=spec.read_only_rootfs,
            user_namespace=ids,
            userns_path=tenant_userns(self.config, record.tenant) if ids is not None else None,
            image_arch=image.config.get("architecture"),
        )
        (directory / "config.json").write_text(json.dumps(config))
        record.args = process.args
        record.env = process.env
        record.workdir = process.cwd
        record.user = process.user
        record.hostname = hostname
        record.stop_signal = process.stop_signal
        record.cgroups_path = config["linux"]["cgroupsPath"]

    def _prepare_rootfs(
        self, record: ContainerRecord, spec: protocol.ContainerSpec, image: Any, hostname: str
    ) -> tuple[Path, Any, Any, Any, dict[str, Any], list[dict[str, Any]]]:
        """The container's root filesystem mounted, and what the OCI config needs from it
        and from the spec: (rootfs, user-namespace ids, process, user, resources, mounts).
        """
        from runtime_agent.runtime import spec as oci

        directory = self.store.dir(record.tenant, record.id)
        # --rm: a disposable rootfs, mounted volatile so removing it needn't sync the disk.
        # With a user namespace the plain mount is always volatile (idmap_snapshot
        # replaces it at once; unmounting a non-volatile one would sync the disk) and the
        # idmapped one only for --rm.
        volatile = spec.auto_remove or spec.user_namespace
        rootfs = self.agent.snapshots.prepare(
            record.snapshot_key, image, volatile=volatile, tenant=record.tenant
        )
        ids = None
        if spec.user_namespace:
            from runtime_agent.runtime.security import ensure_traversable, user_namespace_for

            ids = user_namespace_for(
                self.agent, record.tenant, record.snapshot_key, volatile=spec.auto_remove
            )
            ensure_traversable(directory)
        process = oci.merge_image_config(spec, image.container_config, hostname)
        user = oci.lookup_user(rootfs, process.user)
        oci.find_command(rootfs, process.args[0], process.env, process.cwd)
        limits = spec.limits
        if limits.pids is None:
            # Never unlimited: a fork bomb stops at its container's cap (and at its tenant's
            # parent cgroup), not at the node's pid_max.
            limits = dataclasses.replace(limits, pids=self.config.container_pids_max)
        needs_device = any(
            getattr(limits, f) is not None
            for f in (
                "device_read_bps",
                "device_write_bps",
                "device_read_iops",
                "device_write_iops",
            )
        )
        devices = self.agent.snapshots.devices(record.snapshot_key) if needs_device else None
        resources = oci.linux_resources(limits, devices)
        mounts: list[dict[str, Any]] = []
        if spec.mounts:
            mounts += self.agent.volumes.oci_mounts(
                record.tenant,
                spec.mounts,
                privileged_caller=spec.privileged_caller,
                container_id=record.id,
                user_namespace=ids,
                idmap_dir=directory / "idmap" if ids is not None else None,
            )
            record.volumes = [m.source for m in spec.mounts if m.kind == "volume"]
        self.cgroups.ensure_tenant(record.tenant)
        self._check_tenant_caps(record.tenant, spec.limits)  # what was asked, not the default
        return rootfs, ids, process, user, resources, mounts

    def _attach_network(
        self, record: ContainerRecord, spec: protocol.ContainerSpec, hostname: str
    ) -> NetworkSetup:
        try:
            return self.agent.networks.attach(
                record.tenant,
                record.id,
                hostname,
                spec.networks,
                spec.ports,
                name=record.name,
                mode=spec.network_mode,
                privileged_caller=spec.privileged_caller,
                ingress_bps=spec.limits.network_ingress_bps,
                egress_bps=spec.limits.network_egress_bps,
            )
        except OSError as exc:  # netlink/kernel failures below the network manager
            raise RuntimeFailure(f"attaching the container's network failed: {exc}") from exc

    def _settle_network(
        self, record: ContainerRecord, attaching: Future[NetworkSetup]
    ) -> NetworkSetup:
        """Wait for the attach; once it succeeded the record says so (rm detaches it)."""
        setup = attaching.result()
        record.network = {
            "mode": record.spec.get("network_mode"),
            "addresses": dict(setup.addresses),
        }
        self.store.save(record)
        return setup

    # ------------------------------------------------------------------ lifecycle

    def start(self, tenant: str, ref: str, *, watch_exit: bool = True) -> ContainerInfo:
        """Start a created or stopped container (a new monitor each time).

        ``watch_exit=False`` is for a caller that waits for the exit itself (foreground
        ``run --rm``): no exit hook process is spawned for it.
        """
        record = self._observe(self._find(tenant, ref))
        with self.store.lock(record.tenant, record.id):
            record = self._reload(record)
            st.transition(record.status, "start", name=record.name)
            self._start_locked(record, watch_exit=watch_exit)
        return self._info(record)

    def _reload(self, record: ContainerRecord) -> ContainerRecord:
        fresh = self.store.load(record.tenant, record.id)
        if fresh is None:
            raise NotFound(f"No such container: {record.name}")
        return fresh

    def _start_locked(self, record: ContainerRecord, *, watch_exit: bool) -> None:
        if record.status == "creating":
            raise FailedPrecondition(f"container {record.name} is still being created")
        if record.status == st.STOPPED:
            self._forget_runc_state(record)
        rootfs = self.agent.snapshots.active_dir / record.snapshot_key / "merged"
        from runtime_agent.snapshots.mount import is_mounted

        if not is_mounted(rootfs):  # after a reboot: mount the snapshot again
            self.agent.snapshots.ensure_mounted(record.snapshot_key)  # image may be untagged
            if record.spec.get("user_namespace"):
                from runtime_agent.runtime.security import user_namespace_for

                user_namespace_for(
                    self.agent, record.tenant, record.snapshot_key, volatile=record.auto_remove
                )
        if record.spec.get("user_namespace"):
            from runtime_agent.runtime.security import tenant_userns

            tenant_userns(self.config, record.tenant)  # config.json joins it (by path)
            if record.volumes:
                self._restore_volume_views(record)
        self._started(record, self._launch(record, watch_exit=watch_exit))

    def _restore_volume_views(self, record: ContainerRecord) -> None:
        """Make a user-namespaced container's idmapped volume views again where they are
        gone (a node reboot drops every mount): its config.json binds the views, and an
        empty directory in their place would hide the volume's data. The tenant's id range
        is read back from the agent's state, so the files map as before the reboot."""
        from runtime_agent.runtime.security import tenant_id_range
        from runtime_agent.snapshots.mount import is_mounted

        idmap_dir = self.store.dir(record.tenant, record.id) / "idmap"
        spec = protocol.from_dict(protocol.ContainerSpec, record.spec)
        volumes = [m for m in spec.mounts if m.kind == "volume"]
        if all(is_mounted(idmap_dir / m.source) for m in volumes):
            return
        self.agent.volumes.oci_mounts(
            record.tenant,
            volumes,
            container_id=record.id,
            auto_create=False,
            user_namespace=tenant_id_range(self.config, record.tenant),
            idmap_dir=idmap_dir,
        )

    def _launch(
        self, record: ContainerRecord, *, watch_exit: bool, gated: bool = False
    ) -> MonitorStart:
        """conmon for this start of ``record`` (see ``MonitorStart`` for ``gated``)."""
        policy, _ = record.restart_policy
        hook = None
        if policy != "no" or (record.auto_remove and watch_exit):
            hook = exit_hook_command(self.config, record.tenant, record.id)
        return MonitorStart(
            self.config,
            self.runc,
            runc_id=record.runc_id,
            name=record.name,
            paths=self._paths(record),
            exit_command=hook,
            stdin=bool(record.spec.get("stdin_open")),
            gated=gated,
        )

    def _started(self, record: ContainerRecord, starting: MonitorStart) -> None:
        """Let ``starting`` run the container and record it running (the caller holds
        the container's lock)."""
        started_at = st.now_iso()
        try:
            pid = starting.started()
        except BaseException:
            self.runc.delete(record.runc_id)
            raise
        record.status = st.RUNNING
        record.pid = pid
        record.pid_start = process_start_time(pid) or 0
        record.started_at = started_at
        record.finished_at = None
        record.exit_code = None
        record.oom_killed = False
        record.manually_stopped = False
        self.store.save(record)

    def run(self, spec: protocol.ContainerSpec, *, watch_exit: bool = True) -> ContainerInfo:
        """create + start; a container that fails to start is removed if it was ``--rm``.

        conmon is launched as soon as the container has its directory, gated: it starts
        up while the rootfs, network and config are made, and runs runc once they are.
        """
        record, image = self._new_record(spec)
        starting = None
        try:
            starting = self._launch(record, watch_exit=watch_exit, gated=True)
            self._build_bundle(record, spec, image)
        except BaseException:
            if starting is not None:
                starting.cancel()  # conmon exits without running runc
                _await_monitor_exit(self._paths(record), timeout=5.0)
            self._cleanup(record)
            raise
        try:
            with self.store.lock(record.tenant, record.id):
                record.status = st.CREATED
                st.transition(record.status, "start", name=record.name)
                try:
                    self._started(record, starting)  # saves it running
                except BaseException:
                    # Created, not started: `ps -a` shows it, as docker's after a failed
                    # start. Until this save or _started's it is "creating" on disk, so
                    # a crash in between leaves it for recover() to clean up.
                    self.store.save(record)
                    raise
        except BaseException:
            if spec.auto_remove:
                with contextlib.suppress(AgentError):
                    self.remove(spec.tenant, record.id, force=True)
            raise
        return self._info(record)

    def wait(self, tenant: str, ref: str, timeout: float | None = None) -> int:
        """Block until the container stops; its exit code."""
        record = self._find(tenant, ref)
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        monitor = _MonitorExit(self._paths(record))
        try:
            while True:
                record = self._observe(record, persist=False)
                if record.status in (st.STOPPED, st.CREATED):
                    return record.exit_code if record.exit_code is not None else 0
                if deadline is not None and time.monotonic() >= deadline:
                    raise FailedPrecondition(
                        f"container {record.name} still running after {timeout}s"
                    )
                monitor.pause(delay)
                delay = min(delay * 2, 0.05)
                fresh = self.store.load(record.tenant, record.id)
                if fresh is None:
                    raise NotFound(f"No such container: {ref}")
                record = fresh
        finally:
            monitor.close()

    def _wait_exit(self, record: ContainerRecord, timeout: float) -> bool:
        paths = self._paths(record)
        deadline = time.monotonic() + timeout
        delay = 0.001
        while time.monotonic() < deadline:
            if read_exit(paths) is not None:
                return True
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return read_exit(paths) is not None

    def stop(self, tenant: str, ref: str, timeout: int | None = None) -> ContainerInfo:
        """The stop signal, then SIGKILL after ``timeout`` seconds (spec's stop_timeout)."""
        record = self._observe(self._find(tenant, ref))
        with self.store.lock(record.tenant, record.id):
            record = self._reload(record)
            record.manually_stopped = True
            self.store.save(record)
        if record.status not in (st.RUNNING, st.PAUSED):
            return self._info(record)
        grace = record.spec.get("stop_timeout", 10) if timeout is None else timeout
        self.runc.kill(record.runc_id, record.stop_signal)
        if record.status == st.PAUSED:
            self.runc.kill(record.runc_id, 9, all_processes=True)
            with contextlib.suppress(AgentError):
                self.runc.resume(record.runc_id)
        if not self._wait_exit(record, float(grace)):
            self.runc.kill(record.runc_id, 9, all_processes=True)
            self._wait_exit(record, 10.0)
        return self._info(self._observe(record))

    def kill(self, tenant: str, ref: str, signal: str | int = "KILL") -> ContainerInfo:
        from runtime_agent.runtime.spec import parse_signal

        number = parse_signal(signal, default=9)
        record = self._observe(self._find(tenant, ref))
        with self.store.lock(record.tenant, record.id):
            record = self._reload(record)
            st.transition(record.status, "kill", name=record.name)
            if number == 9:
                record.manually_stopped = True
                self.store.save(record)
            self.runc.kill(record.runc_id, number, all_processes=number == 9)
            if record.status == st.PAUSED and number == 9:
                with contextlib.suppress(AgentError):
                    self.runc.resume(record.runc_id)
        if number == 9:
            self._wait_exit(record, 10.0)
        return self._info(self._observe(record))

    def pause(self, tenant: str, ref: str) -> ContainerInfo:
        return self._freeze(tenant, ref, "pause")

    def unpause(self, tenant: str, ref: str) -> ContainerInfo:
        return self._freeze(tenant, ref, "unpause")

    def _freeze(self, tenant: str, ref: str, action: str) -> ContainerInfo:
        record = self._observe(self._find(tenant, ref))
        with self.store.lock(record.tenant, record.id):
            record = self._reload(record)
            new_status = st.transition(record.status, action, name=record.name)
            if action == "pause":
                self.runc.pause(record.runc_id)
            else:
                self.runc.resume(record.runc_id)
            record.status = new_status
            self.store.save(record)
        return self._info(record)

    def remove(self, tenant: str, ref: str, force: bool = False) -> None:
        """Delete the container and everything it holds; safe to repeat after failures."""
        record = self._observe(self._find(tenant, ref), persist=False)  # it goes anyway
        if record.status in (st.RUNNING, st.PAUSED):
            st.transition(record.status, "force_remove" if force else "remove", name=record.name)
            with self.store.lock(record.tenant, record.id):
                record = self._reload(record)
                record.manually_stopped = True
                self.store.save(record)
            self.runc.kill(record.runc_id, 9, all_processes=True)
            with contextlib.suppress(AgentError):
                self.runc.resume(record.runc_id)
            self._wait_exit(record, 10.0)
        # conmon writes the exit file, then runs its exit command (if any: it takes this
        # container's lock, so wait before taking it), removes its attach socket and fifos
        # from the container's directory and exits: let it finish first.
        _await_monitor_exit(self._paths(record), timeout=5.0)
        with self.store.lock(record.tenant, record.id):  # an exit hook must not write meanwhile
            self._cleanup(record)

    def _cleanup(self, record: ContainerRecord) -> None:
        """Undo everything create/start made, each step on its own so one failure
        doesn't strand the rest; the first error is raised at the end."""
        import shutil

        errors: list[BaseException] = []

        def attempt(step: Any, *args: Any) -> None:
            try:
                step(*args)
            except Exception as exc:
                errors.append(exc)

        # The network goes meanwhile, in a thread (it needs nothing of the rest).
        detaching = None
        if record.network is not None:
            detaching = _background().submit(self._detach_network, record)
        attempt(self._forget_runc_state, record)
        if record.volumes or record.spec.get("mounts"):
            idmap_dir = self.store.dir(record.tenant, record.id) / "idmap"
            if idmap_dir.exists():  # user-namespaced volume views, kept until rm
                attempt(self.agent.volumes.release_idmapped_views, idmap_dir)
            attempt(self.agent.volumes.release, record.tenant, record.id)
        attempt(self.agent.snapshots.remove, record.snapshot_key)
        socket_dir = self.config.run_root / "conmon" / record.runc_id
        attempt(shutil.rmtree, socket_dir, True)
        if detaching is not None:
            attempt(detaching.result)
        if not errors:  # entries conmon removes meanwhile are fine (see remove())
            attempt(_remove_dir, self.store.dir(record.tenant, record.id))
        if errors:
            raise errors[0]

    def _forget_runc_state(self, record: ContainerRecord) -> None:
        """Drop runc's state and the container's cgroups (idempotent).

        Once conmon wrote the exit file the container's init is gone, and with it (pid
        namespace) every process of the container; what ``runc delete`` would do is then
        only removing two directory trees, done here without another runc process. Any
        doubt (no exit file, a cgroup still busy) goes through ``runc delete --force``.
        """
        import shutil

        state_dir = self.config.runc_root / record.runc_id
        if state_dir.exists():
            if read_exit(self._paths(record)) is None:
                self.runc.delete(record.runc_id)
            else:
                try:
                    self.cgroups.remove(record.tenant, record.id)
                except OSError:
                    self.runc.delete(record.runc_id)
                else:
                    shutil.rmtree(state_dir, ignore_errors=True)
                    return  # the cgroups are gone already
                shutil.rmtree(state_dir, ignore_errors=True)
        self.cgroups.remove(record.tenant, record.id)  # idempotent; the hierarchies are cached

    def _detach_network(self, record: ContainerRecord) -> None:
        self.agent.networks.detach(record.tenant, record.id)

    # ------------------------------------------------------------------ tenant caps

    def set_tenant_limits(self, tenant: str, limits: protocol.Limits) -> None:
        """Caps for all of a tenant's containers together (its parent cgroup)."""
        from runtime_agent.runtime.spec import validate_limits

        validate_tenant(tenant)
        validate_limits(limits)
        self.cgroups.ensure_tenant(tenant, limits)

    def _check_tenant_caps(self, tenant: str, limits: protocol.Limits) -> None:
        """A container may not ask for more than its whole tenant is allowed."""
        if limits.memory_bytes is None and limits.pids is None:
            return  # nothing asked: the tenant's cgroup caps it anyway (no stats to read)
        caps = self.cgroups.stats(tenant)
        for what, asked, cap in (
            ("memory", limits.memory_bytes, caps.memory_limit_bytes),
            ("pids", limits.pids, caps.pids_limit),
        ):
            if asked is not None and cap is not None and asked > cap:
                raise ResourceExhausted(
                    f"{what} limit {asked} is above tenant {tenant!r}'s cap of {cap}",
                    quota=what,
                    limit=cap,
                    requested=asked,
                )

    # ------------------------------------------------------------------ queries

    def list(self, tenant: str, all: bool = False) -> builtins.list[ContainerInfo]:
        validate_tenant(tenant)
        infos = []
        for record in self.store.all(tenant):
            if record.status == "creating":
                continue
            record = self._observe(record)
            if all or record.status in (st.RUNNING, st.PAUSED):
                infos.append(self._info(record))
        infos.sort(key=lambda i: i.created, reverse=True)
        return infos

    def list_all(self) -> builtins.list[ContainerInfo]:
        """Every container on the node, of every tenant (node reports, image GC)."""
        result = []
        for tenant in self.store.tenants():
            result += self.list(tenant, all=True)
        return result

    def all_records(self) -> builtins.list[ContainerRecord]:
        return [r for t in self.store.tenants() for r in self.store.all(t)]

    def inspect(self, tenant: str, ref: str) -> dict[str, Any]:
        """docker inspect's shape (the fields that make sense here)."""
        record = self._observe(self._find(tenant, ref))
        spec = record.spec
        limits = spec.get("limits") or {}
        cpus = limits.get("cpus")
        return {
            "Id": record.id,
            "Created": record.created,
            "Path": record.args[0] if record.args else "",
            "Args": record.args[1:],
            "State": {
                "Status": "exited" if record.status == st.STOPPED else record.status,
                "Running": record.status in (st.RUNNING, st.PAUSED),
                "Paused": record.status == st.PAUSED,
                "Restarting": False,
                "OOMKilled": record.oom_killed,
                "Dead": False,
                "Pid": record.pid if record.status in (st.RUNNING, st.PAUSED) else 0,
                "ExitCode": record.exit_code or 0,
                "Error": record.error,
                "StartedAt": record.started_at or "0001-01-01T00:00:00Z",
                "FinishedAt": record.finished_at or "0001-01-01T00:00:00Z",
            },
            "Image": record.image_id,
            "Name": "/" + record.name,
            "RestartCount": record.restart_count,
            "Driver": "overlay",
            "HostConfig": {
                "AutoRemove": record.auto_remove,
                "RestartPolicy": {
                    "Name": record.restart_policy[0],
                    "MaximumRetryCount": record.restart_policy[1],
                },
                "Memory": limits.get("memory_bytes") or 0,
                "MemorySwap": limits.get("memory_bytes") or 0,
                "NanoCpus": round(cpus * 1e9) if cpus else 0,
                "CpuShares": limits.get("cpu_shares") or 0,
                "PidsLimit": limits.get("pids"),
                "ReadonlyRootfs": bool(spec.get("read_only_rootfs")),
                "NetworkMode": spec.get("network_mode", "bridge"),
                "CgroupParent": record.cgroups_path.rsplit("/", 1)[0],
            },
            "Mounts": [
                {
                    "Type": m.get("kind"),
                    "Name": m.get("source") if m.get("kind") == "volume" else "",
                    "Source": m.get("source", ""),
                    "Destination": m.get("target"),
                    "RW": not m.get("read_only"),
                }
                for m in spec.get("mounts") or []
            ],
            "Config": {
                "Hostname": record.hostname,
                "User": record.user,
                "Env": record.env,
                "Cmd": record.args,
                "Image": record.image,
                "WorkingDir": record.workdir,
                "Labels": record.labels,
                "StopSignal": str(record.stop_signal),
                "OpenStdin": bool(record.spec.get("stdin_open")),
            },
            "NetworkSettings": {"Networks": (record.network or {}).get("addresses", {})},
            "LogPath": str(self._paths(record).log),
            "Tenant": record.tenant,
        }

    def logs(
        self,
        tenant: str,
        ref: str,
        *,
        tail: int | None = None,
        since: str | None = None,
        follow: bool = False,
    ) -> Iterator[LogEntry]:
        record = self._find(tenant, ref)
        path = self._paths(record).log
        if not follow:
            return iter(read_logs(path, tail=tail, since=since))

        def done() -> bool:
            fresh = self.store.load(record.tenant, record.id)
            return fresh is None or self._observe(fresh).status not in (st.RUNNING, st.PAUSED)

        def following(monitor: _MonitorExit) -> Iterator[LogEntry]:
            try:
                yield from follow_logs(path, tail=tail, done=done, pause=monitor.pause)
            finally:
                monitor.close()

        entries = following(_MonitorExit(self._paths(record)))
        if since:
            return (e for e in entries if e.time >= since)
        return entries

    def stats(self, tenant: str, ref: str) -> ContainerStats:
        record = self._observe(self._find(tenant, ref))
        if record.status not in (st.RUNNING, st.PAUSED):
            return ContainerStats(record.id, record.name, 0.0, 0, None, 0, 0, 0, None, 0)
        raw: CgroupStats = self.cgroups.stats(record.tenant, record.id)
        return ContainerStats(
            id=record.id,
            name=record.name,
            cpu_seconds=raw.cpu_seconds,
            memory_bytes=raw.memory_bytes,
            memory_limit_bytes=raw.memory_limit_bytes,
            io_read_bytes=raw.io_read_bytes,
            io_write_bytes=raw.io_write_bytes,
            pids=raw.pids,
            pids_limit=raw.pids_limit,
            oom_kills=raw.oom_kills,
        )

    # ------------------------------------------------------------------ exec

    def attach_stdin(self, tenant: str, ref: str, source: BinaryIO) -> int:
        """Feed ``source`` to the stdin of a container created with ``stdin_open`` until
        EOF, then close the container's stdin (docker run -i). Returns the bytes sent.

        Goes through conmon's attach socket (``<container dir>/attach``, SOCK_SEQPACKET:
        one message per write, at most conmon's 8 KiB buffer). conmon also sends the
        container's output to attached clients; it is drained and dropped here (the log
        file has it), so a chatty container never stalls on a full socket.
        """
        import socket
        import threading

        record = self._observe(self._find(tenant, ref))
        if not record.spec.get("stdin_open"):
            raise FailedPrecondition(
                f"container {record.name} was not created with stdin open (-i)"
            )
        if record.status not in (st.RUNNING, st.PAUSED):
            raise FailedPrecondition(f"container {record.name} is not running")
        path = self.store.dir(record.tenant, record.id) / "attach"
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # By /proc/self/fd: a socket path may not exceed 108 bytes; state roots can be deep.
        handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            conn.connect(f"/proc/self/fd/{handle}")
        except OSError as exc:
            conn.close()
            raise FailedPrecondition(f"cannot attach to container {record.name}: {exc}") from exc
        finally:
            os.close(handle)

        def drain() -> None:
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass

        threading.Thread(target=drain, name="attach-drain", daemon=True).start()
        sent = 0
        read = getattr(source, "read1", source.read)
        try:
            while chunk := read(ATTACH_CHUNK):
                conn.sendall(chunk)  # one message, at most ATTACH_CHUNK bytes
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the container has gone; the rest of stdin has nowhere to go
        finally:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)  # conmon closes the container's stdin
            conn.close()
        return sent

    def _exec_argv(
        self,
        record: ContainerRecord,
        argv: builtins.list[str],
        env: dict[str, str] | None,
        workdir: str | None,
        user: str | None,
    ) -> builtins.list[str]:
        from runtime_agent.runtime import spec as oci

        if record.status != st.RUNNING:
            raise FailedPrecondition(f"container {record.name} is not running")
        if not argv:
            raise InvalidArgument("exec needs a command")
        rootfs = self.agent.snapshots.active_dir / record.snapshot_key / "merged"
        merged_env = dict(e.split("=", 1) for e in record.env if "=" in e)
        merged_env.update(env or {})
        env_list = [f"{k}={v}" for k, v in merged_env.items()]
        cwd = workdir or record.workdir
        oci.find_command(rootfs, argv[0], env_list, cwd)
        resolved = oci.lookup_user(rootfs, user if user is not None else record.user)
        return self.runc.exec_command(
            record.runc_id,
            argv,
            env=env_list,
            cwd=cwd,
            uid=resolved.uid,
            gid=resolved.gid,
            additional_gids=resolved.additional_gids,
        )

    def exec(
        self,
        tenant: str,
        ref: str,
        argv: builtins.list[str],
        *,
        env: dict[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        stdin: BinaryIO | int | None = None,
        stdout: BinaryIO | int | None = None,
        stderr: BinaryIO | int | None = None,
    ) -> int:
        """Run ``argv`` in the running container; its exit code (docker's 126/127 rules)."""
        record = self._observe(self._find(tenant, ref))
        command = self._exec_argv(record, argv, env, workdir, user)
        result = subprocess.run(
            command,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            check=False,
        )
        return result.returncode

    def exec_capture(
        self,
        tenant: str,
        ref: str,
        argv: builtins.list[str],
        *,
        timeout: float = 30,
        limit: int = 1 << 20,
    ) -> tuple[int, bytes]:
        """exec with stdout+stderr captured (at most ``limit`` bytes kept)."""
        record = self._observe(self._find(tenant, ref))
        command = self._exec_argv(record, argv, None, None, None)
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            output = exc.output or b""
            return 124, output[:limit]
        return result.returncode, result.stdout[:limit]

    # ------------------------------------------------------------------ restarts

    def on_exit(self, tenant: str, container_id: str) -> None:
        """conmon's exit hook: --rm for detached containers, restart policies."""
        record = self.store.load(tenant, container_id)
        if record is None:
            return
        record = self._observe(record)
        if record.status != st.STOPPED:
            return
        if record.auto_remove:
            with self.store.lock(tenant, container_id):
                if self.store.load(tenant, container_id) is not None:
                    self._cleanup(record)
            return
        if not self._should_restart(record, daemon_start=False):
            return
        ran_for = (_parse_iso(record.finished_at) or 0) - (_parse_iso(record.started_at) or 0)
        attempt = 0 if ran_for >= BACKOFF_RESET_AFTER else record.restart_count
        time.sleep(min(BACKOFF_START * 2**attempt, BACKOFF_MAX))
        with self.store.lock(tenant, container_id):
            fresh = self.store.load(tenant, container_id)
            if (
                fresh is None
                or fresh.status != st.STOPPED
                or fresh.restart_count != record.restart_count
                or not self._should_restart(fresh, daemon_start=False)
            ):
                return
            fresh.restart_count += 1
            self._start_locked(fresh, watch_exit=True)

    @staticmethod
    def _should_restart(record: ContainerRecord, *, daemon_start: bool) -> bool:
        policy, max_retries = record.restart_policy
        if policy == "always":
            return daemon_start or not record.manually_stopped
        if policy == "unless-stopped":
            return not record.manually_stopped
        if policy == "on-failure":
            return (
                not record.manually_stopped
                and (record.exit_code or 0) != 0
                and (max_retries == 0 or record.restart_count < max_retries)
            )
        return False

    def recover(self) -> None:
        """At agent start: fold in exits that happened while no agent ran, finish --rm
        removals, and start containers whose restart policy says so (after a reboot the
        exit hooks never ran)."""
        for record in self.all_records():
            try:
                if record.status == "creating":
                    if not _process_alive(record.creator):  # else: a create in progress
                        self._cleanup(record)
                    continue
                was_live = record.status in (st.RUNNING, st.PAUSED)
                record = self._observe(record)
                if record.status != st.STOPPED:
                    continue
                if record.auto_remove:
                    self._cleanup(record)
                elif self._should_restart(record, daemon_start=True) and (
                    was_live or not self._monitor_alive(self._paths(record))
                ):
                    with self.store.lock(record.tenant, record.id):
                        fresh = self._reload(record)
                        if fresh.status == st.STOPPED:
                            fresh.restart_count += 1
                            self._start_locked(fresh, watch_exit=True)
            except AgentError:
                continue


@functools.cache
def _boot_id() -> str:
    """This boot's id (read once per process: it is the same until the node reboots)."""
    with open("/proc/sys/kernel/random/boot_id") as fh:
        return fh.read().strip()


def _this_process() -> str:
    """This process, as ``ContainerRecord.creator`` records it."""
    pid = os.getpid()
    return f"{_boot_id()} {pid} {process_start_time(pid) or 0}"


def _process_alive(token: str) -> bool:
    """Whether the process a ``_this_process()`` token names still runs (same boot, same
    pid and start time: a reused pid is not it)."""
    try:
        boot, pid, start = token.split()
        return boot == _boot_id() and process_start_time(int(pid)) == int(start)
    except ValueError:  # no token (a record from before it was kept)
        return False


def _await_monitor_exit(paths: MonitorPaths, timeout: float) -> None:
    """Wait (up to ``timeout``) for the container's conmon to exit, if it still runs.

    Not when we are conmon's exit command (detached ``--rm``, restart policies): conmon
    waits for that before exiting.
    """
    try:
        if int(paths.conmon_pid_file.read_text().strip()) == os.getppid():
            return
    except (OSError, ValueError):
        return
    fd = _monitor_pidfd(paths)
    if fd < 0:
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


def _remove_dir(path: Path) -> None:
    """rmtree that tolerates entries vanishing meanwhile (a monitor cleaning up late)."""
    import shutil

    def onerror(_func: Any, _path: str, exc_info: Any) -> None:
        if not issubclass(exc_info[0], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(path, onerror=onerror)


class _MonitorExit:
    """Back-off sleeps that end as soon as the container's conmon exits.

    conmon writes the exit file and the last output, then exits: waiting on a pidfd of it
    wakes ``wait`` and ``logs -f`` at once instead of at the next poll (which backs off to
    50 ms). Once that conmon is gone (killed, or replaced by a restart policy's new one)
    its pidfd stays readable, so from then on a pause is a plain sleep, never a busy loop.
    """

    def __init__(self, paths: MonitorPaths) -> None:
        self._paths = paths
        self._fd: int | None = None  # opened on the first pause; -1: none or gone

    def pause(self, seconds: float) -> None:
        if self._fd is None:
            self._fd = _monitor_pidfd(self._paths)
        if self._fd < 0:
            time.sleep(seconds)
        elif select.select([self._fd], [], [], seconds)[0]:
            self.close()

    def close(self) -> None:
        if self._fd is not None and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


def _monitor_pidfd(paths: MonitorPaths) -> int:
    """A pidfd for the container's conmon, or -1 (no pid file, gone, not conmon)."""
    try:
        pid = int(paths.conmon_pid_file.read_text().strip())
        fd = os.pidfd_open(pid)
    except (OSError, ValueError, AttributeError):
        return -1
    # The pid may have been reused since conmon wrote its file: keep the fd only if the
    # process behind it (checked after opening, so it can't change any more) is conmon.
    try:
        with open(f"/proc/{pid}/comm") as fh:
            if fh.read().strip() == "conmon":
                return fd
    except OSError:
        pass
    os.close(fd)
    return -1


def _command_line(args: builtins.list[str]) -> str:
    """The command as ``docker ps`` shows it: arguments with a space in single quotes
    (``sh -c 'exit 3'``), the program as it is."""
    if not args:
        return ""
    return " ".join([args[0], *(f"'{a}'" if " " in a else a for a in args[1:])])


def _random_name(container_id: str) -> str:
    """docker-style adjective_noun names, derived from the id so they're reproducible."""
    adjectives = "brave calm eager fancy gentle happy jolly keen lucid merry nifty proud quiet"
    adjectives += " sharp tender vivid"
    nouns = "albatross beacon capstan dinghy ensign frigate galley harbor jetty keel lantern"
    nouns += " mooring navigator pier rudder schooner"
    value = int(container_id[:8], 16)
    return (
        f"{adjectives.split()[value % 16]}_{nouns.split()[(value >> 4) % 16]}_{container_id[8:12]}"
    )


def monitor_rss_pids(manager: ContainerManager) -> builtins.list[int]:
    """conmon pids of this agent's running containers (benchmarks measure their PSS)."""
    pids = []
    for record in manager.all_records():
        try:
            pids.append(
                int(
                    MonitorPaths(manager.store.dir(record.tenant, record.id))
                    .conmon_pid_file.read_text()
                    .strip()
                )
            )
        except (FileNotFoundError, ValueError):
            continue
    return pids
