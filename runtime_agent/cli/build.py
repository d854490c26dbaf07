"""``berth-agent build``: docker build's classic interface on the node agent.

    berth-agent build -t TAG [-f FILE] [--build-arg K=V] [--target T] [--no-cache] CONTEXT|-

CONTEXT is a directory, or ``-`` for a tar stream (optionally compressed) on stdin.
``-f`` names the Dockerfile: relative to the current directory if such a file exists
(as docker does), else inside the context; ``-f -`` reads it from stdin. Step logs stream
to stdout in docker's format; the last line names the image digest and tag. A failed step
exits 1 with its instruction, exit code and output, as ``docker build`` does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from runtime_agent.agent import Agent
from runtime_agent.build.events import BuildFailed
from runtime_agent.build.steps import BuildLimits
from runtime_agent.config import AgentConfig
from runtime_agent.errors import InvalidArgument

EXIT_BUILD_FAILED = 1


def _size(text: str) -> int:
    from runtime_agent.cli.volumes import parse_size

    return parse_size(text)


def _build_args(items: list[str] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not key:
            raise InvalidArgument(f"invalid --build-arg {item!r}: expected KEY=VALUE")
        if sep:
            result[key] = value
        elif key in os.environ:  # docker: a bare KEY takes its value from the environment
            result[key] = os.environ[key]
    return result


def _run(args: argparse.Namespace, config: AgentConfig) -> int:
    agent = Agent(config)
    limits = BuildLimits(
        cpus=args.cpus,
        memory_bytes=_size(args.memory),
        step_timeout=args.timeout,
        build_timeout=args.timeout,
        context_bytes=_size(args.context_limit),
        network=None if args.network == "none" else args.network,
        user_namespace=args.userns,
    )
    dockerfile: str | None = None
    dockerfile_text: str | None = None
    if args.file == "-":
        if args.context == "-":
            raise InvalidArgument("cannot read both the context and the Dockerfile from stdin")
        dockerfile_text = sys.stdin.read()
    elif args.file:
        outside = Path(args.file)
        in_context = args.context != "-" and (Path(args.context) / args.file).is_file()
        if outside.is_file() and not in_context:
            dockerfile_text = outside.read_text()
            dockerfile = outside.name
        else:
            dockerfile = args.file
    context = sys.stdin.buffer if args.context == "-" else Path(args.context)
    out = sys.stdout
    try:
        for event in agent.builder.build(
            args.tenant,
            context,
            dockerfile,
            args.tag,
            _build_args(args.build_arg),
            args.target,
            args.no_cache,
            limits=limits,
            dockerfile_text=dockerfile_text,
        ):
            if event.kind == "error":
                continue
            if args.quiet and event.kind != "done":
                continue
            if args.quiet:
                out.write(f"{event.digest}\n")
            else:
                out.write(event.render())
            out.flush()
    except BuildFailed as exc:
        if exc.output and args.quiet:
            sys.stderr.write(exc.output)
        sys.stderr.write(f"{exc}\n")
        return EXIT_BUILD_FAILED
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    from runtime_agent.cli.main import add_tenant_argument

    parser = subparsers.add_parser(
        "build", help="build an image from a Dockerfile", description=__doc__.split("\n\n")[0]
    )
    add_tenant_argument(parser)
    parser.add_argument("-t", "--tag", help="name:tag of the resulting image")
    parser.add_argument("-f", "--file", help="Dockerfile (default: CONTEXT/Dockerfile)")
    parser.add_argument(
        "--build-arg", action="append", metavar="KEY=VALUE", help="set a build-time variable"
    )
    parser.add_argument("--target", help="build up to this stage")
    parser.add_argument("--no-cache", action="store_true", help="do not use the layer cache")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the image id")
    parser.add_argument("--memory", default="1g", help="memory limit of each RUN (default 1g)")
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs for each RUN (default 1)")
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="wall-time limit in seconds (default 3600)"
    )
    parser.add_argument(
        "--network",
        default="default",
        help="tenant network for RUN steps ('default', a network name, or 'none')",
    )
    parser.add_argument(
        "--context-limit", default="2g", help="largest accepted build context (default 2g)"
    )
    parser.add_argument(
        "--userns",
        action="store_true",
        help="run RUN steps as the tenant's unprivileged host id range (user namespace)",
    )
    parser.add_argument("context", metavar="CONTEXT", help="context directory, or - for a tar")
    parser.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    """``python -m runtime_agent.cli.build ...``: ``berth-agent build ...`` (which loads
    only this subcommand's module, see ``cli.main.FAST_COMMANDS``)."""
    from runtime_agent.cli.main import main as cli_main

    return cli_main(["build", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
