"""The one HTTP client for fetches a tenant causes (``ADD http(s)://…`` in a build).

Each hop of :func:`fetch` parses the URL, resolves its host once, judges every address it
resolves to with the node's :class:`~runtime_agent.netpolicy.FetchPolicy` and connects to
the checked address itself (TLS still verifies the certificate for the host name), so a
DNS answer that changes between check and connect (rebinding) has nothing to change.
Redirects are followed by hand, each one judged like the first URL. The body is streamed
into a spooled temporary file under a size cap and the whole fetch — every hop, every read
— under one deadline. Proxy variables in the environment are ignored: the connection goes
where the policy said it may.

:func:`policy_for_node` builds the policy from the node: its own addresses (every
interface of the agent's network namespace), the control plane's and the platform
registries' addresses, and the operator's ``BERTH_FETCH_ALLOW``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from email.message import Message
from typing import IO

from runtime_agent.config import AgentConfig
from runtime_agent.distribution.auth import CredentialStore
from runtime_agent.errors import AgentError, InvalidArgument, ResourceExhausted
from runtime_agent.netpolicy import (
    FetchPolicy,
    IPAddress,
    check_registry,
    parse_ip,
    split_host_port,
)
from runtime_agent.node import load_identity

USER_AGENT = "berth-agent/0.1"
MAX_REDIRECTS = 10
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024


@dataclass
class Fetched:
    """A downloaded body: ``file`` is rewound, ``digest`` is ``sha256:<hex>``."""

    url: str
    file: IO[bytes]
    size: int
    digest: str
    headers: Message


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to ``host`` (Host header) over a connection to the already checked address."""

    def __init__(self, host: str, port: int, address: IPAddress, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((str(self.address), self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to ``host`` (SNI and certificate name) over a connection to the checked address."""

    def __init__(self, host: str, port: int, address: IPAddress, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((str(self.address), self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def resolve_checked(host: str, port: int, policy: FetchPolicy) -> IPAddress:
    """The address to connect to for ``host``: the literal itself in whatever notation, or
    the first address DNS gives; every address DNS gives must pass ``policy`` (a name that
    also resolves to a refused address is refused: it is aimed at the node)."""
    literal = parse_ip(host)
    if literal is not None:
        policy.check(host, literal)
        return literal
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidArgument(f"cannot resolve {host}: {exc}", host=host) from exc
    addresses: list[IPAddress] = []
    for info in infos:
        address = parse_ip(str(info[4][0]))
        if address is not None and address not in addresses:
            addresses.append(address)
    if not addresses:
        raise InvalidArgument(f"cannot resolve {host}: no addresses", host=host)
    for address in addresses:
        policy.check(host, address)
    return addresses[0]


def fetch(
    url: str,
    policy: FetchPolicy,
    *,
    max_bytes: int,
    timeout: float,
    max_redirects: int = MAX_REDIRECTS,
) -> Fetched:
    """GET ``url`` for a tenant: only http/https, every hop judged by ``policy``, at most
    ``max_bytes`` of body, everything done within ``timeout`` seconds.

    Raises :class:`FetchRefused` for a refused address, ``ResourceExhausted`` when a cap is
    hit, ``InvalidArgument`` for a bad URL, an HTTP error or a connection failure.
    """
    deadline = time.monotonic() + timeout
    current = url
    origin = None
    auth = None
    for _ in range(max_redirects + 1):
        parts = urllib.parse.urlsplit(current)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgument(f"{current}: only http:// and https:// URLs can be fetched")
        host, port = _host_port(parts)
        if origin is None:
            origin = (parts.scheme, host, port)
            if parts.username is not None:
                user = urllib.parse.unquote(parts.username)
                secret = urllib.parse.unquote(parts.password or "")
                auth = "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()
        address = resolve_checked(host, port, policy)
        connection_type = (
            _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        )
        connection = connection_type(host, port, address, _remaining(deadline, timeout, url))
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if auth is not None and (parts.scheme, host, port) == origin:
            headers["Authorization"] = auth  # credentials never follow a redirect elsewhere
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        # The deadline holds however the server paces its bytes (a header or a chunk a
        # byte at a time): at the deadline the connection is shut, any read returns.
        watchdog = threading.Timer(_remaining(deadline, timeout, url), _cut, (connection,))
        watchdog.start()
        try:
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
            if response.status in _REDIRECTS and response.getheader("Location"):
                current = urllib.parse.urljoin(current, response.getheader("Location", ""))
                continue
            if response.status != 200:
                raise InvalidArgument(
                    f"{current}: HTTP {response.status} {response.reason}", status=response.status
                )
            return _read_body(current, response, connection, max_bytes, deadline, timeout)
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= deadline:
                raise _too_slow(url, timeout) from exc
            raise InvalidArgument(f"{current}: download failed: {exc}") from exc
        finally:
            watchdog.cancel()
            connection.close()
    raise InvalidArgument(f"{url}: more than {max_redirects} redirects")


def _host_port(parts: urllib.parse.SplitResult) -> tuple[str, int]:
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidArgument(f"{parts.geturl()}: invalid port") from exc
    host = urllib.parse.unquote(parts.hostname or "")
    return host, port or (443 if parts.scheme == "https" else 80)


def _cut(connection: http.client.HTTPConnection) -> None:
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _remaining(deadline: float, timeout: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _too_slow(url, timeout)
    return left


def _too_slow(url: str, timeout: float) -> ResourceExhausted:
    return ResourceExhausted(
        f"{url}: download took longer than the {timeout:g} s limit (BERTH_FETCH_TIMEOUT_SECONDS)",
        limit_seconds=timeout,
    )


def _read_body(
    url: str,
    response: http.client.HTTPResponse,
    connection: http.client.HTTPConnection,
    max_bytes: int,
    deadline: float,
    timeout: float,
) -> Fetched:
    too_big = ResourceExhausted(
        f"{url}: download is larger than the {max_bytes} byte limit (BERTH_FETCH_MAX_BYTES)",
        limit_bytes=max_bytes,
    )
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=8 << 20)
    digest = hashlib.sha256()
    size = 0
    try:
        while True:
            if connection.sock is not None:
                connection.sock.settimeout(_remaining(deadline, timeout, url))
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise too_big
            digest.update(chunk)
            spool.write(chunk)
        _remaining(deadline, timeout, url)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return Fetched(url, spool, size, "sha256:" + digest.hexdigest(), response.headers)


# ---------------------------------------------------------------------- the node's policy


def policy_for_node(config: AgentConfig) -> FetchPolicy:
    """The fetch policy of this node: the operator's allow list, and as platform addresses
    (refused) the node's own and those of the control plane and the registries it logs in to."""
    platform = set(node_addresses())
    for host in _platform_hosts(config):
        platform.update(_lookup(host))
    try:
        return FetchPolicy.from_config(config.fetch_allow, platform)
    except ValueError as exc:
        raise InvalidArgument(f"BERTH_FETCH_ALLOW: {exc}") from exc


def node_addresses() -> list[IPAddress]:
    """Every address configured on an interface of the agent's network namespace."""
    from pyroute2 import IPRoute

    found: list[IPAddress] = []
    with IPRoute() as ipr:
        for message in ipr.get_addr():
            value = message.get_attr("IFA_ADDRESS") or message.get_attr("IFA_LOCAL")
            address = parse_ip(str(value)) if value else None
            if address is not None:
                found.append(address)
    return found


def _logins(config: AgentConfig) -> list[str]:
    return CredentialStore(config.root / "registry-auth.json").registries()


def _platform_hosts(config: AgentConfig) -> list[str]:
    hosts = [split_host_port(registry)[0] for registry in _logins(config)]
    try:
        control = urllib.parse.urlsplit(load_identity(config).control_url).hostname
    except AgentError:
        control = None
    if control:
        hosts.append(control)
    return hosts


def _lookup(host: str) -> list[IPAddress]:
    literal = parse_ip(host)
    if literal is not None:
        return [literal]
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return [a for a in (parse_ip(str(i[4][0])) for i in infos) if a is not None]


def check_pull_allowed(config: AgentConfig, image: str, **details: object) -> None:
    """Refuse (``FetchRefused``) a tenant's image naming a registry the node may not pull
    from for tenants: allowed are the operator's ``BERTH_ALLOWED_REGISTRIES`` and the
    registries this node holds a login for (the platform's, stored at join)."""
    allowed = set(config.allowed_registries) | set(_logins(config))
    check_registry(image, allowed, **details)
