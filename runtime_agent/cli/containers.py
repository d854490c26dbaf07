"""``berth-agent run|create|start|ps|logs|exec|stop|kill|pause|unpause|rm|inspect|stats|wait``.

Flags and output mirror docker's for the subset Berth supports, so anyone who knows
docker knows these. Exit codes: 125 for errors of the CLI or the agent (bad flag values
included — nothing is created then), 126 when the command can't be invoked, 127 when it
isn't in the image, otherwise the container's own status (137 after an OOM kill).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from runtime_agent.cli.main import add_tenant_argument
from runtime_agent.cli.template import (
    Template,
    add_format_argument,
    go_time,
    print_inspected,
    print_rows,
)
from runtime_agent.errors import AgentError, InvalidArgument

if TYPE_CHECKING:
    from runtime_agent.agent import Agent
    from runtime_agent.config import AgentConfig
    from runtime_agent.protocol import ContainerSpec

_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([bkmgt]?)(b|ib)?$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
EXIT_AGENT_ERROR = 125


def parse_bytes(text: str, flag: str) -> int:
    """docker's RAMInBytes: 512, 100k, 32m, 1.5g, 1gb (binary units)."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise InvalidArgument(f'invalid argument "{text}" for "{flag}" flag: invalid size')
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise InvalidArgument(f'invalid argument "{text}" for "{flag}" flag: must be positive')
    return value


def parse_cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidArgument(
            f'invalid argument "{text}" for "--cpus" flag: not a number'
        ) from None
    if not value > 0:
        raise InvalidArgument(f'invalid argument "{text}" for "--cpus" flag: must be positive')
    return value


def parse_int(text: str, flag: str, minimum: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgument(
            f'invalid argument "{text}" for "{flag}" flag: not an integer'
        ) from None
    if value < minimum:
        raise InvalidArgument(f'invalid argument "{text}" for "{flag}" flag: must be >= {minimum}')
    return value


def parse_device_rate(text: str, flag: str, *, iops: bool = False) -> int:
    """``[DEVICE:]RATE``. The throttle always applies to the device behind the container's
    own storage (a tenant has no business naming host devices), so DEVICE is optional."""
    rate = text.rsplit(":", 1)[-1]
    if iops:
        return parse_int(rate, flag)
    return parse_bytes(rate, flag)


def parse_restart(text: str) -> tuple[str, int]:
    name, _, count = text.partition(":")
    if name not in ("no", "on-failure", "always", "unless-stopped"):
        raise InvalidArgument(
            f"invalid restart policy {text!r}: use no, on-failure[:max-retries], always "
            "or unless-stopped"
        )
    if count and name != "on-failure":
        raise InvalidArgument(f"invalid restart policy {text!r}: only on-failure takes a count")
    return name, parse_int(count, "--restart", 0) if count else 0


def _env(items: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not key:
            raise InvalidArgument(f"invalid environment variable {item!r}")
        if sep:
            env[key] = value
        elif key in os.environ:  # docker: -e NAME passes the caller's value through
            env[key] = os.environ[key]
    return env


def spec_from_args(args: argparse.Namespace) -> ContainerSpec:
    """Build the ContainerSpec from run/create flags; every bad value raises before use."""
    from runtime_agent.protocol import ContainerSpec, Limits, MountSpec, RestartPolicy

    limits = Limits(
        cpus=parse_cpus(args.cpus) if args.cpus is not None else None,
        cpu_shares=parse_int(args.cpu_shares, "--cpu-shares", 2) if args.cpu_shares else None,
        memory_bytes=parse_bytes(args.memory, "-m, --memory") if args.memory else None,
        pids=parse_int(args.pids_limit, "--pids-limit") if args.pids_limit else None,
        device_read_bps=_last_rate(args.device_read_bps, "--device-read-bps"),
        device_write_bps=_last_rate(args.device_write_bps, "--device-write-bps"),
        device_read_iops=_last_rate(args.device_read_iops, "--device-read-iops", iops=True),
        device_write_iops=_last_rate(args.device_write_iops, "--device-write-iops", iops=True),
        network_ingress_bps=parse_bits(args.network_ingress, "--network-ingress")
        if args.network_ingress
        else None,
        network_egress_bps=parse_bits(args.network_egress, "--network-egress")
        if args.network_egress
        else None,
    )
    mounts: list[MountSpec] = []
    if args.volume or args.tmpfs:
        from runtime_agent.volumes.flags import parse_tmpfs_flag, parse_volume_flag

        mounts += [parse_volume_flag(v) for v in args.volume or []]
        mounts += [parse_tmpfs_flag(t) for t in args.tmpfs or []]
    restart_name, retries = parse_restart(args.restart)
    network_mode = args.network or "bridge"
    networks: tuple[Any, ...] = ()
    ports: tuple[Any, ...] = ()
    if args.publish or args.network_alias or network_mode not in ("bridge", "none", "host"):
        # The network package pulls in pyroute2: only for the flags that need it.
        from runtime_agent.network.flags import network_flags, parse_publish_flags

        network_mode, networks = network_flags(args.network, args.network_alias)
        ports = parse_publish_flags(args.publish)
    labels = {}
    for item in args.label or []:
        key, _, value = item.partition("=")
        labels[key] = value
    return ContainerSpec(
        tenant=args.tenant,
        image=args.image,
        name=args.name,
        command=tuple(args.command) if args.command else None,
        entrypoint=None if args.entrypoint is None else _entrypoint(args.entrypoint),
        env=_env(args.env),
        workdir=args.workdir,
        user=args.user,
        hostname=args.hostname,
        labels=labels,
        limits=limits,
        mounts=tuple(mounts),
        read_only_rootfs=args.read_only,
        restart=RestartPolicy(name=restart_name, max_retries=retries),  # type: ignore[arg-type]
        network_mode=network_mode,  # type: ignore[arg-type]
        networks=networks,
        ports=ports,
        auto_remove=args.rm,
        stdin_open=args.interactive,
        user_namespace=args.userns == "private",
        stop_timeout=args.stop_timeout,
        stop_signal=args.stop_signal,
    )


def _entrypoint(text: str) -> tuple[str, ...]:
    """docker: --entrypoint "" clears the image's entrypoint; otherwise one program."""
    return (text,) if text else ()


_BITS_RE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)(?:bit|bps)?$", re.IGNORECASE)


def parse_bits(text: str, flag: str) -> int:
    """A network rate in bits per second: 1000000, 500kbit, 10mbit, 1gbit (decimal, as tc)."""
    match = _BITS_RE.match(text.strip())
    if not match:
        raise InvalidArgument(f'invalid argument "{text}" for "{flag}" flag: use e.g. 10mbit')
    value = int(
        float(match.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    )
    if value < 8000:
        raise InvalidArgument(f'invalid argument "{text}" for "{flag}" flag: at least 8kbit')
    return value


def _last_rate(values: list[str] | None, flag: str, *, iops: bool = False) -> int | None:
    if not values:
        return None
    return parse_device_rate(values[-1], flag, iops=iops)


def _agent(config: AgentConfig) -> Agent:
    from runtime_agent.agent import Agent

    return Agent(config)


# --------------------------------------------------------------------------- handlers


def _run(args: argparse.Namespace, config: AgentConfig) -> int:
    spec = spec_from_args(args)
    agent = _agent(config)
    containers = agent.containers
    if args.detach:
        info = containers.run(spec)
        print(info.id)
        return 0
    info = containers.run(spec, watch_exit=False)
    try:
        if spec.stdin_open:
            _feed_stdin(containers, args.tenant, info.id)
        _stream_logs(agent, args.tenant, info.id, follow=True, tail=None, timestamps=False)
        code = containers.wait(args.tenant, info.id)
    finally:
        if spec.auto_remove:
            try:
                containers.remove(args.tenant, info.id, force=True)
            except AgentError as exc:
                sys.stderr.write(f"berth-agent: removing {info.short_id}: {exc}\n")
    return code


def _feed_stdin(containers: Any, tenant: str, container_id: str) -> None:
    """docker run -i: this process's stdin goes to the container's until EOF (a thread;
    a container that ends first doesn't wait for the rest of stdin)."""
    import threading

    def feed() -> None:
        try:
            containers.attach_stdin(tenant, container_id, sys.stdin.buffer)
        except (AgentError, OSError) as exc:
            sys.stderr.write(f"berth-agent: stdin: {exc}\n")

    threading.Thread(target=feed, name="stdin", daemon=True).start()


def _stream_logs(
    agent: Agent,
    tenant: str,
    ref: str,
    *,
    follow: bool,
    tail: int | None,
    timestamps: bool,
    since: str | None = None,
) -> None:
    out = sys.stdout.buffer
    err = sys.stderr.buffer
    entries = agent.containers.logs(tenant, ref, tail=tail, follow=follow, since=since)
    for entry in entries:
        target = err if entry.stream == "stderr" else out
        if timestamps:
            target.write(entry.time.encode() + b" ")
        target.write(entry.line if entry.partial else entry.line + b"\n")
        if follow:
            target.flush()
    out.flush()
    err.flush()


def _create(args: argparse.Namespace, config: AgentConfig) -> int:
    info = _agent(config).containers.create(spec_from_args(args))
    print(info.id)
    return 0


def _each(args: argparse.Namespace, action: Callable[[str], Any], echo: bool = True) -> int:
    """Apply ``action`` to every named container; report failures like docker, go on."""
    status = 0
    for ref in args.containers:
        try:
            action(ref)
        except AgentError as exc:
            sys.stderr.write(f"berth-agent: {exc}\n")
            status = EXIT_AGENT_ERROR
            continue
        if echo:
            print(ref)
    return status


def _start(args: argparse.Namespace, config: AgentConfig) -> int:
    containers = _agent(config).containers
    return _each(args, lambda ref: containers.start(args.tenant, ref))


def _stop(args: argparse.Namespace, config: AgentConfig) -> int:
    containers = _agent(config).containers
    return _each(args, lambda ref: containers.stop(args.tenant, ref, timeout=args.time))


def _kill(args: argparse.Namespace, config: AgentConfig) -> int:
    containers = _agent(config).containers
    return _each(args, lambda ref: containers.kill(args.tenant, ref, args.signal))


def _pause(args: argparse.Namespace, config: AgentConfig) -> int:
    containers = _agent(config).containers
    return _each(args, lambda ref: containers.pause(args.tenant, ref))


def _unpause(args: argparse.Namespace, config: AgentConfig) -> int:
    containers = _agent(config).containers
    return _each(args, lambda ref: containers.unpause(args.tenant, ref))


def _rm(args: argparse.Namespace, config: AgentConfig) -> int:
    containers = _agent(config).containers
    return _each(args, lambda ref: containers.remove(args.tenant, ref, force=args.force))


def _wait(args: argparse.Namespace, config: AgentConfig) -> int:
    containers = _agent(config).containers
    return _each(args, lambda ref: print(containers.wait(args.tenant, ref)), echo=False)


def _inspect(args: argparse.Namespace, config: AgentConfig) -> int:
    template = Template.parse(args.format) if args.format else None  # bad ones fail first
    containers = _agent(config).containers
    found: list[dict[str, Any]] = []
    status = _each(args, lambda ref: found.append(containers.inspect(args.tenant, ref)), False)
    print_inspected(found, template)
    return status


def _logs(args: argparse.Namespace, config: AgentConfig) -> int:
    tail = None if args.tail in (None, "all") else parse_int(args.tail, "--tail", 0)
    _stream_logs(
        _agent(config), args.tenant, args.container, follow=args.follow, tail=tail,
        timestamps=args.timestamps, since=args.since,
    )  # fmt: skip
    return 0


def _exec(args: argparse.Namespace, config: AgentConfig) -> int:
    return _agent(config).containers.exec(
        args.tenant,
        args.container,
        [args.cmd, *args.args],
        env=_env(args.env),
        workdir=args.workdir,
        user=args.user,
        stdin=sys.stdin.buffer if args.interactive else None,
    )


def _ago(iso: str | None) -> str:
    if not iso:
        return ""
    from datetime import UTC, datetime

    then = datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return _human(time.time() - then.timestamp())


def _human(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 1:
        return "Less than a second"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def _status_text(info: Any) -> str:
    if info.state == "running":
        return f"Up {_ago(info.started_at)}"
    if info.state == "paused":
        return f"Up {_ago(info.started_at)} (Paused)"
    if info.state == "stopped":
        return f"Exited ({info.exit_code}) {_ago(info.finished_at)} ago"
    return info.state.capitalize()


# ps --format: docker's field names for a container row, and their table headers.
PS_FIELDS = {
    "ID": "CONTAINER ID",
    "Image": "IMAGE",
    "Command": "COMMAND",
    "CreatedAt": "CREATED AT",
    "RunningFor": "CREATED",
    "State": "STATE",
    "Status": "STATUS",
    "Names": "NAMES",
    "Labels": "LABELS",
}


def _docker_state(info: Any) -> str:
    """The state as docker names it (Berth's "stopped" is docker's "exited")."""
    return "exited" if info.state == "stopped" else str(info.state)


def _ps_row(info: Any, no_trunc: bool) -> dict[str, str]:
    from datetime import UTC, datetime

    command = info.command if no_trunc else _trunc(info.command, 20)
    created = datetime.strptime(info.created, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return {
        "ID": info.id if no_trunc else info.short_id,
        "Image": info.image,
        "Command": f'"{command}"',
        "CreatedAt": go_time(created),
        "RunningFor": f"{_ago(info.created)} ago",
        "State": _docker_state(info),
        "Status": _status_text(info),
        "Names": info.name,
        "Labels": ",".join(f"{k}={v}" for k, v in sorted(info.labels.items())),
    }


PS_FILTERS = ("id", "name", "label", "status", "exited")
# docker's statuses; Berth's containers are never restarting, removing or dead, so those
# filters match nothing, as they would on docker with no such container.
PS_STATUSES = ("created", "restarting", "running", "removing", "paused", "exited", "dead")


def parse_ps_filters(values: Sequence[str]) -> dict[str, list[str]]:
    """``--filter KEY=VALUE`` flags by key; unknown keys and statuses are refused."""
    filters: dict[str, list[str]] = {}
    for value in values:
        key, sep, wanted = value.partition("=")
        if not sep or key not in PS_FILTERS:
            raise InvalidArgument(
                f"invalid filter {value!r}: use KEY=VALUE, KEY one of {', '.join(PS_FILTERS)}"
            )
        if key == "status" and wanted not in PS_STATUSES:
            raise InvalidArgument(
                f"invalid filter 'status={wanted}': one of {', '.join(PS_STATUSES)}"
            )
        if key == "exited" and not re.fullmatch(r"-?\d+", wanted):
            raise InvalidArgument(f"invalid filter 'exited={wanted}': an exit code")
        if key == "name":
            try:
                re.compile(wanted)
            except re.error as exc:
                raise InvalidArgument(f"invalid filter 'name={wanted}': {exc}") from None
        filters.setdefault(key, []).append(wanted)
    return filters


def ps_matches(info: Any, filters: dict[str, list[str]]) -> bool:
    """docker's rules: values of one key are alternatives, different keys all apply."""
    state = _docker_state(info)

    def label(wanted: str) -> bool:  # KEY=VALUE, or KEY with any value
        key, sep, value = wanted.partition("=")
        return info.labels.get(key) == value if sep else key in info.labels

    tests: dict[str, Callable[[str], bool]] = {
        "id": lambda v: info.id.startswith(v.lower()),
        "name": lambda v: re.search(v, info.name) is not None,
        "label": label,
        "status": lambda v: state == v,
        "exited": lambda v: state == "exited" and info.exit_code == int(v),
    }
    return all(any(tests[key](v) for v in values) for key, values in filters.items())


def _ps(args: argparse.Namespace, config: AgentConfig) -> int:
    template = Template.parse(args.format) if args.format and not args.quiet else None
    filters = parse_ps_filters(args.filter or [])
    # As docker's: a status filter looks at stopped containers without -a (exited doesn't).
    every = args.all or "status" in filters
    infos = _agent(config).containers.list(args.tenant, all=every)
    infos = [info for info in infos if ps_matches(info, filters)]
    if args.quiet:
        for info in infos:
            print(info.id if args.no_trunc else info.short_id)
        return 0
    if template is not None:
        print_rows(template, [_ps_row(info, args.no_trunc) for info in infos], PS_FIELDS)
        return 0
    rows = [("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES")]
    for info in infos:
        command = info.command if args.no_trunc else _trunc(info.command, 20)
        rows.append(
            (
                info.id if args.no_trunc else info.short_id,
                info.image,
                f'"{command}"',
                f"{_ago(info.created)} ago",
                _status_text(info),
                info.name,
            )
        )
    _table(rows)
    return 0


def _trunc(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def _size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.4g}{unit}"
        value /= 1024
    return f"{value}B"


def _stats(args: argparse.Namespace, config: AgentConfig) -> int:
    containers = _agent(config).containers
    refs = args.containers or [i.id for i in containers.list(args.tenant)]
    first = {ref: containers.stats(args.tenant, ref) for ref in refs}
    started = time.monotonic()
    time.sleep(0.5)
    rows = [("CONTAINER ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "BLOCK I/O", "PIDS")]
    elapsed = time.monotonic() - started
    for ref in refs:
        now = containers.stats(args.tenant, ref)
        cpu = (now.cpu_seconds - first[ref].cpu_seconds) / elapsed * 100
        limit = now.memory_limit_bytes
        mem_pct = f"{now.memory_bytes / limit * 100:.2f}%" if limit else "--"
        rows.append(
            (
                now.id[:12],
                now.name,
                f"{cpu:.2f}%",
                f"{_size(now.memory_bytes)} / {_size(limit) if limit else 'unlimited'}",
                mem_pct,
                f"{_size(now.io_read_bytes)} / {_size(now.io_write_bytes)}",
                str(now.pids),
            )
        )
    _table(rows)
    return 0


# --------------------------------------------------------------------------- parsers


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="assign a name to the container (unique within the tenant)")
    p.add_argument("-e", "--env", action="append", help="set environment variables")
    p.add_argument("-w", "--workdir", help="working directory inside the container")
    p.add_argument("-u", "--user", help="username or UID (format: <name|uid>[:<group|gid>])")
    p.add_argument("--entrypoint", help="overwrite the default ENTRYPOINT of the image")
    p.add_argument("-v", "--volume", action="append", help="bind mount a volume (NAME:/path[:ro])")
    p.add_argument("--tmpfs", action="append", help="mount a tmpfs directory (/path[:size=64m])")
    p.add_argument("-m", "--memory", help="memory limit (no swap beyond it)")
    p.add_argument("--cpus", help="number of CPUs (CFS quota)")
    p.add_argument("-c", "--cpu-shares", help="CPU shares (relative weight)")
    p.add_argument("--pids-limit", help="tune container pids limit")
    for flag in ("read-bps", "write-bps", "read-iops", "write-iops"):
        p.add_argument(
            f"--device-{flag}",
            action="append",
            metavar="[DEVICE:]RATE",
            help=f"limit {flag.replace('-', ' ')} on the container's storage device",
        )
    for direction in ("ingress", "egress"):
        p.add_argument(
            f"--network-{direction}",
            metavar="RATE",
            help=f"limit the container's {direction} bandwidth, bits/s (e.g. 10mbit, 500kbit)",
        )
    p.add_argument("--read-only", action="store_true", help="mount the root filesystem read-only")
    p.add_argument("--restart", default="no", help="restart policy (no, on-failure[:N], always, "
                   "unless-stopped)")  # fmt: skip
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="keep STDIN open and feed it to the container",
    )
    p.add_argument("--hostname", help="container host name")
    p.add_argument("-l", "--label", action="append", help="set metadata on a container")
    p.add_argument("--network", help="connect to a network (bridge, none, host or a name)")
    p.add_argument("--network-alias", action="append", help="DNS alias on the network")
    p.add_argument(
        "-p", "--publish", action="append", help="publish a port ([ip:][host:]container[/udp])"
    )
    p.add_argument(
        "--userns",
        choices=("host", "private"),
        default="host",
        help="private: container root is an unprivileged host uid range of the tenant",
    )
    p.add_argument("--stop-signal", help="signal to stop the container")
    p.add_argument("--stop-timeout", type=int, default=10, help="seconds before SIGKILL on stop")
    p.add_argument("image")
    p.add_argument("command", nargs=argparse.REMAINDER)


def register(subparsers: argparse._SubParsersAction) -> None:
    def add(name: str, handler: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = subparsers.add_parser(name, help=help_text)
        add_tenant_argument(p)
        p.set_defaults(func=handler)
        return p

    p = add("run", _run, "create and start a container")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background")
    _add_run_flags(p)

    p = add("create", _create, "create a container")
    _add_run_flags(p)

    for name, handler, text in (
        ("start", _start, "start stopped containers"),
        ("pause", _pause, "pause all processes within containers"),
        ("unpause", _unpause, "unpause containers"),
        ("wait", _wait, "block until containers stop, then print their exit codes"),
        ("inspect", _inspect, "show containers as JSON (docker inspect's shape)"),
    ):
        p = add(name, handler, text)
        p.add_argument("containers", nargs="+", metavar="CONTAINER")
        if name == "inspect":
            add_format_argument(p, "{{.State.ExitCode}}")

    p = add("stop", _stop, "stop running containers (stop signal, then SIGKILL)")
    p.add_argument("-t", "--time", type=int, help="seconds to wait before killing")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")

    p = add("kill", _kill, "kill running containers")
    p.add_argument("-s", "--signal", default="KILL", help="signal to send (default KILL)")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")

    p = add("rm", _rm, "remove containers")
    p.add_argument("-f", "--force", action="store_true", help="kill and remove running ones")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")

    p = add("ps", _ps, "list containers")
    p.add_argument("-a", "--all", action="store_true", help="show all containers")
    p.add_argument("-q", "--quiet", action="store_true", help="only display container ids")
    p.add_argument("--no-trunc", action="store_true", help="don't truncate output")
    p.add_argument(
        "-f",
        "--filter",
        action="append",
        help="only containers matching KEY=VALUE: id (prefix), name (regex), label (KEY or "
        "KEY=VALUE), status (created, running, paused, exited), exited (exit code); repeat "
        "a key for alternatives",
    )
    p.add_argument(
        "--format",
        help="a Go template per container ('table' first for a header), fields: "
        + ", ".join(f".{name}" for name in PS_FIELDS),
    )

    p = add("logs", _logs, "fetch the logs of a container")
    p.add_argument("-f", "--follow", action="store_true", help="follow log output")
    p.add_argument("-n", "--tail", help="number of lines to show from the end (or all)")
    p.add_argument("-t", "--timestamps", action="store_true", help="show timestamps")
    p.add_argument("--since", help="only lines at or after this RFC 3339 time")
    p.add_argument("container")

    p = add("exec", _exec, "run a command in a running container")
    p.add_argument("-e", "--env", action="append", help="set environment variables")
    p.add_argument("-w", "--workdir", help="working directory inside the container")
    p.add_argument("-u", "--user", help="username or UID")
    p.add_argument("-i", "--interactive", action="store_true", help="keep STDIN open")
    p.add_argument("container")
    p.add_argument("cmd")
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = add("stats", _stats, "display containers' resource usage")
    p.add_argument("--no-stream", action="store_true", help="print one sample and exit")
    p.add_argument("containers", nargs="*", metavar="CONTAINER")
