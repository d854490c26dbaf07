"""``berth-agent pull|push|login|logout``: the node's side of Berth's image registry.

Shaped like docker's commands: ``login HOST -u USER --password-stdin`` stores a login
for the registry host on this node (``<root>/registry-auth.json``, mode 0600), which
``pull`` and ``push`` use when no ``--username``/``--password`` are given. Nodes log in
with their node credential (``node-<name>`` and a ``brn_`` secret); operators may use a
tenant API token.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from runtime_agent.agent import Agent
from runtime_agent.cli.main import add_tenant_argument
from runtime_agent.config import AgentConfig
from runtime_agent.distribution import Credentials, CredentialStore, pull, push
from runtime_agent.distribution.client import RegistryClient
from runtime_agent.distribution.media import Platform
from runtime_agent.errors import InvalidArgument


def _store(config: AgentConfig) -> CredentialStore:
    return CredentialStore(config.root / "registry-auth.json")


def _credentials(args: argparse.Namespace) -> Credentials | None:
    if args.username is None:
        return None
    password = args.password
    if password is None:
        password = getpass.getpass("Password: ")
    return Credentials(args.username, password)


def _pull(args: argparse.Namespace, config: AgentConfig) -> int:
    agent = Agent(config)
    platform = None
    if args.platform:
        try:
            platform = Platform.parse(args.platform)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
    result = pull(agent, args.tenant, args.reference, _credentials(args), platform=platform)
    if not args.quiet:
        for digest in result.skipped:
            print(f"{digest.split(':', 1)[1][:12]}: Already exists")
        for digest in result.fetched:
            print(f"{digest.split(':', 1)[1][:12]}: Pull complete")
        print(f"Digest: {result.index_digest or result.digest}")
        print(f"Status: Downloaded newer image for {result.local_reference}")
    print(result.local_reference)
    return 0


def _push(args: argparse.Namespace, config: AgentConfig) -> int:
    agent = Agent(config)
    result = push(agent, args.tenant, args.reference, _credentials(args), source=args.source)
    if not args.quiet:
        for digest in result.existing:
            print(f"{digest.split(':', 1)[1][:12]}: Layer already exists")
        for digest in result.mounted:
            print(f"{digest.split(':', 1)[1][:12]}: Mounted")
        for digest in result.uploaded:
            print(f"{digest.split(':', 1)[1][:12]}: Pushed")
    print(f"{result.reference}: digest: {result.digest} size: {result.size}")
    return 0


def _login(args: argparse.Namespace, config: AgentConfig) -> int:
    username = args.username or input("Username: ")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = args.password if args.password is not None else getpass.getpass("Password: ")
    if not password:
        raise InvalidArgument("a password (API token or node secret) is required")
    credentials = Credentials(username, password)
    # Check the login the way docker does: /v2/ with the token dance, no scope.
    RegistryClient(args.server, credentials).request(
        "GET", "/v2/", scope="", what=f"login to {args.server}", timeout=30
    ).close()
    _store(config).set(args.server, credentials)
    print("Login Succeeded")
    return 0


def _logout(args: argparse.Namespace, config: AgentConfig) -> int:
    if _store(config).remove(args.server):
        print(f"Removing login credentials for {args.server}")
    else:
        print(f"Not logged in to {args.server}")
    return 0


def _auth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-u", "--username", help="registry user (default: the stored login)")
    parser.add_argument("-p", "--password", help="API token or node secret")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pull", help="pull an image from a registry")
    add_tenant_argument(p)
    p.add_argument("reference", help="HOST/REPOSITORY[:TAG|@DIGEST]")
    p.add_argument("--platform", help="os/arch[/variant] (default: this node's)")
    p.add_argument("-q", "--quiet", action="store_true", help="only print the image name")
    _auth_arguments(p)
    p.set_defaults(func=_pull)

    p = subparsers.add_parser("push", help="push an image to a registry")
    add_tenant_argument(p)
    p.add_argument("reference", help="HOST/REPOSITORY[:TAG]")
    p.add_argument("--source", help="local image to push (default: REFERENCE itself)")
    p.add_argument("-q", "--quiet", action="store_true", help="only print the result")
    _auth_arguments(p)
    p.set_defaults(func=_push)

    p = subparsers.add_parser("login", help="log in to a registry")
    p.add_argument("server", help="registry host, e.g. 127.0.0.1:5000")
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=_login, tenant=None)

    p = subparsers.add_parser("logout", help="log out from a registry")
    p.add_argument("server")
    p.set_defaults(func=_logout, tenant=None)
