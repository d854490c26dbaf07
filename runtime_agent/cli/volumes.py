"""``berth-agent volume create|ls|inspect|rm|prune``, shaped like ``docker volume``.

Size limits are given as docker's local driver takes them (``--opt size=100m``) or with
the shorter ``--size 100m``; both mean a hard cap enforced by the volume's own filesystem.
"""

from __future__ import annotations

import argparse
import re
import sys

from runtime_agent.agent import Agent
from runtime_agent.cli.template import Template, add_format_argument, print_inspected
from runtime_agent.config import AgentConfig
from runtime_agent.errors import AgentError, InvalidArgument

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([bkmgt]?)(?:i?b)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """docker-style sizes: 512, 100k, 64m, 1.5g (binary units)."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise InvalidArgument(f"invalid size {text!r}: use a number with an optional k, m, g, t")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human_size(n: int) -> str:
    """64MiB, 1.5GiB: the size limit as a person would write it."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.4g}{unit}"
        value /= 1024
    return f"{value:.4g}TiB"


def _key_values(items: list[str] | None, what: str) -> dict[str, str]:
    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not key:
            raise InvalidArgument(f"invalid {what} {item!r}: expected key=value")
        result[key] = value if sep else ""
    return result


def _create(args: argparse.Namespace, config: AgentConfig) -> int:
    options = _key_values(args.opt, "option")
    size_text = args.size or options.pop("size", None)
    if options:
        raise InvalidArgument(f"unsupported volume options: {', '.join(sorted(options))}")
    size = parse_size(size_text) if size_text else None
    volume = Agent(config).volumes.create(
        args.tenant, args.name, size_bytes=size, labels=_key_values(args.label, "label")
    )
    print(volume.name)
    return 0


def _label_filters(filters: list[str] | None) -> dict[str, str]:
    labels = {}
    for item in filters or []:
        key, _, value = item.partition("=")
        if key != "label":
            raise InvalidArgument(f"unsupported filter {item!r}: only label=KEY[=VALUE]")
        lkey, _, lvalue = value.partition("=")
        labels[lkey] = lvalue
    return labels


def _ls(args: argparse.Namespace, config: AgentConfig) -> int:
    volumes = Agent(config).volumes.list(args.tenant, _label_filters(args.filter) or None)
    if args.quiet:
        for volume in volumes:
            print(volume.name)
        return 0
    print(f"{'DRIVER':<10}{'SIZE':<12}VOLUME NAME")
    for volume in volumes:
        size = human_size(volume.size_bytes) if volume.size_bytes else "-"
        print(f"{'local':<10}{size:<12}{volume.name}")
    return 0


def _inspect(args: argparse.Namespace, config: AgentConfig) -> int:
    template = Template.parse(args.format) if args.format else None
    manager = Agent(config).volumes
    found, status = [], 0
    for name in args.names:
        try:
            found.append(manager.get(args.tenant, name).docker_inspect())
        except AgentError as exc:
            sys.stderr.write(f"berth-agent: {exc}\n")
            status = 1
    print_inspected(found, template)
    return status


def _rm(args: argparse.Namespace, config: AgentConfig) -> int:
    manager = Agent(config).volumes
    status = 0
    for name in args.names:
        try:
            manager.remove(args.tenant, name, force=args.force)
            print(name)
        except AgentError as exc:
            sys.stderr.write(f"berth-agent: {exc}\n")
            status = 1
    return status


def _prune(args: argparse.Namespace, config: AgentConfig) -> int:
    removed = Agent(config).volumes.prune(
        args.tenant, _label_filters(args.filter) or None, all=args.all
    )
    if removed:
        print("Deleted Volumes:")
        for name in removed:
            print(name)
    print(f"Total reclaimed volumes: {len(removed)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from runtime_agent.cli.main import add_tenant_argument

    volume = subparsers.add_parser("volume", help="manage the tenant's named volumes")
    commands = volume.add_subparsers(dest="volume_command", metavar="COMMAND")
    commands.required = True

    create = commands.add_parser("create", help="create a volume")
    create.add_argument("name", nargs="?", help="volume name (random when omitted)")
    create.add_argument("--label", "-l", action="append", help="set metadata KEY=VALUE")
    create.add_argument("--opt", "-o", action="append", help="driver option, e.g. size=100m")
    create.add_argument("--size", help="hard size limit, e.g. 100m (same as --opt size=)")
    create.set_defaults(func=_create)

    ls = commands.add_parser("ls", aliases=["list"], help="list volumes")
    ls.add_argument("--quiet", "-q", action="store_true", help="only display names")
    ls.add_argument("--filter", "-f", action="append", help="label=KEY[=VALUE]")
    ls.set_defaults(func=_ls)

    inspect = commands.add_parser("inspect", help="show volumes as JSON")
    inspect.add_argument("names", nargs="+", metavar="VOLUME")
    add_format_argument(inspect, "{{.Mountpoint}}")
    inspect.set_defaults(func=_inspect)

    rm = commands.add_parser("rm", aliases=["remove"], help="remove volumes")
    rm.add_argument("--force", "-f", action="store_true", help="remove even if in use")
    rm.add_argument("names", nargs="+", metavar="VOLUME")
    rm.set_defaults(func=_rm)

    prune = commands.add_parser("prune", help="remove volumes no container uses")
    prune.add_argument("--force", "-f", action="store_true", help="do not prompt (no-op)")
    prune.add_argument("--all", "-a", action="store_true", help="also remove unused named volumes")
    prune.add_argument("--filter", action="append", help="label=KEY[=VALUE]")
    prune.set_defaults(func=_prune)

    for sub in (create, ls, inspect, rm, prune):
        add_tenant_argument(sub)
