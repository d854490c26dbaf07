"""``berth-agent network create|ls|inspect|rm|connect|disconnect``, shaped like docker's.

Networks belong to the ``--tenant``; a container given to connect/disconnect is named by
its name or an id prefix, among the tenant's containers that have networking here.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from runtime_agent.agent import Agent
from runtime_agent.cli.template import Template, add_format_argument, print_inspected
from runtime_agent.config import AgentConfig
from runtime_agent.errors import AgentError, InvalidArgument, NotFound
from runtime_agent.network.manager import NetworkManager


def _labels(items: list[str] | None) -> dict[str, str]:
    labels = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not key:
            raise InvalidArgument(f"invalid label {item!r}: expected KEY=VALUE")
        labels[key] = value if sep else ""
    return labels


def resolve_container(manager: NetworkManager, tenant: str, ref: str) -> str:
    """Full container id for a name or id prefix among the tenant's attached containers."""
    endpoints = manager.endpoints(tenant)
    for endpoint in endpoints:
        if ref in (endpoint.name, endpoint.container_id):
            return endpoint.container_id
    matches = [e.container_id for e in endpoints if e.container_id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InvalidArgument(f"container id prefix {ref!r} is ambiguous")
    raise NotFound(f"no container {ref!r} with networking for tenant {tenant!r}")


def _create(args: argparse.Namespace, config: AgentConfig) -> int:
    network = Agent(config).networks.create(
        args.tenant,
        args.name,
        subnet=args.subnet,
        mtu=args.mtu,
        internal=args.internal,
        labels=_labels(args.label),
    )
    print(network.id)
    return 0


def _ls(args: argparse.Namespace, config: AgentConfig) -> int:
    networks = Agent(config).networks.list(args.tenant)
    if args.quiet:
        for network in networks:
            print(network.id[:12])
        return 0
    print(f"{'NETWORK ID':<14}{'NAME':<24}{'SUBNET':<20}{'GATEWAY':<17}CONTAINERS")
    for n in networks:
        print(f"{n.id[:12]:<14}{n.name:<24}{n.subnet:<20}{n.gateway:<17}{len(n.containers)}")
    return 0


def _inspect(args: argparse.Namespace, config: AgentConfig) -> int:
    template = Template.parse(args.format) if args.format else None
    manager = Agent(config).networks
    found, status = [], 0
    for name in args.names:
        try:
            network = manager.inspect(args.tenant, name)
        except AgentError as exc:
            sys.stderr.write(f"berth-agent: {exc}\n")
            status = 1
            continue
        data = asdict(network)
        containers = {}
        for c in network.containers:
            endpoint = manager.endpoint(args.tenant, c.container_id)
            containers[c.container_id] = {
                "Name": c.name,
                "IPv4Address": c.address,
                "Aliases": list(c.aliases),
                "Ports": [str(p) for p in endpoint.ports] if endpoint else [],
            }
        found.append(
            {
                "Name": data["name"],
                "Id": data["id"],
                "Tenant": data["tenant"],
                "Created": data["created"],
                "Driver": "bridge",
                "Internal": data["internal"],
                "IPAM": {"Config": [{"Subnet": data["subnet"], "Gateway": data["gateway"]}]},
                "Options": {"bridge": data["bridge"], "mtu": str(data["mtu"])},
                "Labels": data["labels"],
                "Containers": containers,
            }
        )
    print_inspected(found, template)
    return status


def _rm(args: argparse.Namespace, config: AgentConfig) -> int:
    manager = Agent(config).networks
    status = 0
    for name in args.names:
        try:
            manager.remove(args.tenant, name)
            print(name)
        except AgentError as exc:
            sys.stderr.write(f"berth-agent: {exc}\n")
            status = 1
    return status


def _connect(args: argparse.Namespace, config: AgentConfig) -> int:
    manager = Agent(config).networks
    container_id = resolve_container(manager, args.tenant, args.container)
    manager.connect(
        args.tenant,
        args.network,
        container_id,
        aliases=tuple(args.alias or ()),
        ipv4_address=args.ip,
    )
    return 0


def _disconnect(args: argparse.Namespace, config: AgentConfig) -> int:
    manager = Agent(config).networks
    container_id = resolve_container(manager, args.tenant, args.container)
    manager.disconnect(args.tenant, args.network, container_id)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from runtime_agent.cli.main import add_tenant_argument

    network = subparsers.add_parser("network", help="manage the tenant's networks")
    commands = network.add_subparsers(dest="network_command", metavar="COMMAND")
    commands.required = True

    create = commands.add_parser("create", help="create a network")
    create.add_argument("name", metavar="NETWORK")
    create.add_argument("--subnet", help="CIDR, e.g. 10.200.7.0/24 (default: next free)")
    create.add_argument("--mtu", type=int, help="MTU of the bridge and its veths")
    create.add_argument("--internal", action="store_true", help="no traffic to the outside")
    create.add_argument("--label", "-l", action="append", help="set metadata KEY=VALUE")
    create.set_defaults(func=_create)

    ls = commands.add_parser("ls", aliases=["list"], help="list networks")
    ls.add_argument("--quiet", "-q", action="store_true", help="only display ids")
    ls.set_defaults(func=_ls)

    inspect = commands.add_parser("inspect", help="show networks as JSON")
    inspect.add_argument("names", nargs="+", metavar="NETWORK")
    add_format_argument(inspect, "{{range .IPAM.Config}}{{.Subnet}}{{end}}")
    inspect.set_defaults(func=_inspect)

    rm = commands.add_parser("rm", aliases=["remove"], help="remove networks")
    rm.add_argument("names", nargs="+", metavar="NETWORK")
    rm.set_defaults(func=_rm)

    connect = commands.add_parser("connect", help="connect a running container to a network")
    connect.add_argument("network", metavar="NETWORK")
    connect.add_argument("container", metavar="CONTAINER")
    connect.add_argument("--alias", action="append", help="extra DNS name on this network")
    connect.add_argument("--ip", help="IPv4 address to use")
    connect.set_defaults(func=_connect)

    disconnect = commands.add_parser("disconnect", help="disconnect a container from a network")
    disconnect.add_argument("network", metavar="NETWORK")
    disconnect.add_argument("container", metavar="CONTAINER")
    disconnect.set_defaults(func=_disconnect)

    for sub in (create, ls, inspect, rm, connect, disconnect):
        add_tenant_argument(sub)
