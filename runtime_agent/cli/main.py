"""berth-agent: a docker-like command line for the node agent.

Each group of subcommands lives in its own module in this package and exposes
``register(subparsers)``; every subcommand gets ``--tenant`` and a handler
``func(args, agent_config) -> int`` returning the process exit code.

Exit codes follow docker's: 125 for errors of the CLI or the agent itself, 126 when the
container command cannot be invoked, 127 when it cannot be found, otherwise the
container's own exit status (137 after SIGKILL, e.g. an OOM kill).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from runtime_agent.config import AgentConfig
from runtime_agent.errors import AgentError, CommandNotFound, CommandNotRunnable

# Modules that register subcommands; each is optional so the CLI grows with the agent.
COMMAND_MODULES = (
    "runtime_agent.cli.images",
    "runtime_agent.cli.containers",
    "runtime_agent.cli.volumes",
    "runtime_agent.cli.networks",
    "runtime_agent.cli.build",
    "runtime_agent.cli.registry",
    "runtime_agent.cli.node",
)

# Each command loads only the module that defines it: `berth-agent run` and `build` are on
# hot paths (benchmarked against docker), and the other modules import heavy libraries.
# tests/agent/test_cli_main.py checks this table against what the modules register.
FAST_COMMANDS: dict[str, str] = {
    **dict.fromkeys(
        ("run", "create", "start", "ps", "logs", "exec", "stop", "kill", "pause", "unpause",
         "rm", "inspect", "stats", "wait"),
        "runtime_agent.cli.containers",
    ),
    **dict.fromkeys(
        ("images", "import", "load", "save", "rmi", "tag", "bootstrap", "image", "system"),
        "runtime_agent.cli.images",
    ),
    "volume": "runtime_agent.cli.volumes",
    "network": "runtime_agent.cli.networks",
    "build": "runtime_agent.cli.build",
    **dict.fromkeys(("pull", "push", "login", "logout"), "runtime_agent.cli.registry"),
    **dict.fromkeys(("join", "worker", "serve"), "runtime_agent.cli.node"),
}  # fmt: skip

EXIT_AGENT_ERROR = 125
EXIT_NOT_RUNNABLE = 126
EXIT_NOT_FOUND = 127


class TenantParser(argparse.ArgumentParser):
    """Exits with 125 on usage errors, as docker does, instead of argparse's 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"berth-agent: {message}\n")
        raise SystemExit(EXIT_AGENT_ERROR)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    first = next((a for a in (sys.argv[1:] if argv is None else argv) if a[:1] != "-"), None)
    modules = (FAST_COMMANDS[first],) if first in FAST_COMMANDS else COMMAND_MODULES
    parser = TenantParser(
        prog="berth-agent",
        description="Berth node agent: run and manage tenants' containers on this node.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=TenantParser)
    subparsers.required = True
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


_prepared: argparse.ArgumentParser | None = None


def prepare() -> None:
    """Build the whole parser now: the CLI server does, once, before it forks commands.

    Building it costs ~20 ms (argparse formats 70 subcommands), more than some commands.
    """
    global _prepared
    _prepared = build_parser([])
    # The seccomp profile leaves out other ABIs' calls, found with libseccomp (~3 ms once
    # per process): look them up here, not in every command.
    from runtime_agent.runtime.seccomp import default_profile
    from runtime_agent.runtime.security import DEFAULT_CAPABILITIES

    default_profile(DEFAULT_CAPABILITIES)


def rehearse() -> None:
    """Walk the common command path (``run --rm busybox true`` up to the point where it
    would touch the node) without side effects.

    The CLI server's spare child does this while it waits for a command: a freshly
    forked process pays a copy-on-write page fault (~2 us here) for every page it
    writes, and Python writes to every object it touches (reference counts). A ``run``
    took ~1,300 such faults; rehearsed, the spare has already copied most of the pages
    that the command will write.
    """
    import json
    from pathlib import Path

    from runtime_agent import protocol
    from runtime_agent.agent import Agent
    from runtime_agent.cli.containers import spec_from_args
    from runtime_agent.runtime import spec as oci
    from runtime_agent.runtime import state
    from runtime_agent.runtime.manager import warm_background
    from runtime_agent.runtime.security import apply_security_defaults

    parser = _prepared or build_parser([])
    spec = spec_from_args(parser.parse_args(["run", "--rm", "busybox", "true"]))
    record = state.ContainerRecord(
        id="0" * 64,
        tenant=spec.tenant,
        name="rehearsal",
        runc_id="rehearsal",
        image=spec.image,
        image_id="",
        manifest_digest="",
        snapshot_key="",
        created=state.now_iso(),
        status="creating",
        spec=protocol.to_dict(spec),
    )
    json.loads(json.dumps({name: getattr(record, name) for name in state.FIELD_NAMES}))
    agent = Agent(AgentConfig())
    _ = agent.containers, agent.networks, agent.snapshots, agent.volumes
    image_config: dict[str, object] = {}
    try:
        image_config = agent.images.resolve(spec.tenant, spec.image).container_config  # reads
        agent.networks.list(spec.tenant)  # reads the state file only
    except Exception:  # noqa: S110 - no image yet, or no state: nothing to warm
        pass
    process = oci.merge_image_config(spec, image_config, "rehearsal")
    config = oci.build_config(
        rootfs=Path("/nonexistent"),
        process=process,
        user=oci.ResolvedUser(0, 0, (), "/"),
        hostname="rehearsal",
        cgroups_path="/rehearsal",
        resources=oci.linux_resources(spec.limits, None),
        netns_path=None,
        network_mode=spec.network_mode,
        extra_mounts=[],
        cgroup_namespace=False,
    )
    json.dumps(apply_security_defaults(config))
    warm_background()  # the thread network work runs on


def add_tenant_argument(parser: argparse.ArgumentParser) -> None:
    """Every subcommand acts within one tenant's namespace."""
    parser.add_argument(
        "--tenant", default="default", help="tenant whose objects to act on (default: default)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _prepared or build_parser(argv)
    args = parser.parse_args(argv)
    config = AgentConfig()
    try:
        return int(args.func(args, config))
    except CommandNotFound as exc:
        sys.stderr.write(f"berth-agent: {exc}\n")
        return EXIT_NOT_FOUND
    except CommandNotRunnable as exc:
        sys.stderr.write(f"berth-agent: {exc}\n")
        return EXIT_NOT_RUNNABLE
    except AgentError as exc:
        sys.stderr.write(f"berth-agent: {exc}\n")
        return EXIT_AGENT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
