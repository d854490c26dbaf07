"""``python -m runtime_agent.runtime.exithook``: what conmon runs when a container exits.

It applies ``--rm`` for detached containers and the restart policy (with back-off), using
the same ``ContainerManager`` as the agent, configured from the arguments conmon passes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="berth-exithook")
    parser.add_argument("--root", required=True)
    parser.add_argument("--run-root", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--runc", default="runc")
    parser.add_argument("--conmon", default="conmon")
    parser.add_argument("tenant")
    parser.add_argument("container_id")
    args = parser.parse_args(argv)

    from runtime_agent.agent import Agent
    from runtime_agent.config import AgentConfig
    from runtime_agent.errors import AgentError

    config = AgentConfig(
        root=Path(args.root),
        run_root=Path(args.run_root),
        name=args.name,
        runc=args.runc,
        conmon=args.conmon,
    )
    try:
        Agent(config).containers.on_exit(args.tenant, args.container_id)
    except AgentError as exc:
        sys.stderr.write(f"berth exit hook: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
