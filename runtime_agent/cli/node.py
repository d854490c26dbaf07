"""``berth-agent join`` and ``berth-agent worker``: this node in a Berth fleet."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from runtime_agent.config import AgentConfig
from runtime_agent.errors import InvalidArgument


def register(subparsers: argparse._SubParsersAction) -> None:
    join = subparsers.add_parser(
        "join",
        help="join a Berth control plane with a one-time join token",
        description="Exchange a join token (from `manage.py create_join_token`) for this "
        "node's identity; it is saved in the agent's state root (node.json, mode 0600).",
    )
    join.add_argument("url", help="control plane URL, e.g. http://127.0.0.1:8000")
    join.add_argument("token", help="one-time join token")
    join.add_argument("--name", help="node name (default: the host name)")
    join.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="node label (repeatable)"
    )
    join.set_defaults(func=_join)

    worker = subparsers.add_parser(
        "worker",
        help="run the agent's Celery worker on this node's queue",
        description="Consume operations from queue node.<id> and report this node's "
        "containers to the control plane. Needs `berth-agent join` first.",
    )
    worker.add_argument("--concurrency", type=int, default=4, help="parallel operations (4)")
    worker.add_argument(
        "--report-interval", type=float, default=5.0, help="seconds between heartbeats (5)"
    )
    worker.add_argument(
        "--no-cli-server",
        action="store_true",
        help="don't run the CLI server (berth-agent serve) beside the worker",
    )
    worker.set_defaults(func=_worker)

    serve = subparsers.add_parser(
        "serve",
        help="serve berth-agent commands from a warm resident process",
        description="Listen on <run root>/cli.sock (BERTH_RUN_ROOT, default /run/berth; "
        "root only) and run each berth-agent command there, in a forked process that has "
        "the agent imported already: the same command, output and exit status, without "
        "Python's start-up and import time. `berth-agent worker` runs one too. Stop with "
        "SIGTERM; restart after upgrading the agent.",
    )
    serve.set_defaults(func=_serve)


def _labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--label must be KEY=VALUE, got {item!r}")
        labels[key] = value
    return labels


def _join(args: argparse.Namespace, config: AgentConfig) -> int:
    from runtime_agent.node import join

    identity = join(config, args.url, args.token, name=args.name, labels=_labels(args.label))
    sys.stdout.write(f"joined as node {identity.node_id} (queue {identity.queue})\n")
    return 0


def _worker(args: argparse.Namespace, config: AgentConfig) -> int:
    from runtime_agent.agent import Agent
    from runtime_agent.node import load_identity
    from runtime_agent.worker import NodeWorker

    if args.concurrency < 1:
        raise InvalidArgument("--concurrency must be at least 1")
    if args.report_interval <= 0:
        raise InvalidArgument("--report-interval must be positive")
    identity = load_identity(config)
    server = None if args.no_cli_server else _start_cli_server(config)
    try:
        NodeWorker(Agent(config), identity, report_interval=args.report_interval).run(
            concurrency=args.concurrency
        )
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    return 0


def _serve(args: argparse.Namespace, config: AgentConfig) -> int:
    from runtime_agent.cliserver import serve

    serve(config.run_root)
    return 0


def _start_cli_server(config: AgentConfig) -> subprocess.Popen[bytes]:
    """``berth-agent serve`` as a child that dies with the worker (PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    def die_with_parent() -> None:
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)

    return subprocess.Popen(
        [sys.executable, "-m", "runtime_agent.cli.main", "serve"],
        env={**os.environ, "BERTH_RUN_ROOT": str(config.run_root)},
        preexec_fn=die_with_parent,
        stdin=subprocess.DEVNULL,
    )
