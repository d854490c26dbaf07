"""The network helper daemon: DNS responders and loopback port proxies, one per agent.

Containers need two things that must outlive any single ``berth-agent`` command or
Celery task: a DNS server on each network (at the network's gateway address, port 53)
and, for published ports, a listener on the host port that serves connections made to
127.0.0.1 (nftables DNAT handles every real address; DNAT from loopback would need
route_localnet, which exposes 127.0.0.1-only services to the network). The listener
also holds the port, so a host service can't take a published port from under us.

So each agent runs one detached daemon (``python -m runtime_agent.network.daemon``). It
only reads the network state file; the manager asks it to re-read over a unix socket
(``{"op": "sync"}``) and gets back the bind errors, which is how a published port that
is already taken by some host process is refused. With no networks left the daemon
exits, so removing everything leaves no process behind. ``recover()`` restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime_agent.network.dns import (
    RCODE_SERVFAIL,
    Records,
    error_response,
    host_upstreams,
)
from runtime_agent.network.state import StateStore

log = logging.getLogger("berth.netd")

UPSTREAM_TIMEOUT = 2.0
UDP_PROXY_IDLE = 60.0
WATCH_INTERVAL = 2.0


# ---- client side (used by the manager) -------------------------------------------------


class DaemonError(Exception):
    pass


def request(sock_path: Path, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(json.dumps(payload).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise DaemonError("network daemon closed the connection without answering")
    result: dict[str, Any] = json.loads(buf)
    return result


def is_running(sock_path: Path) -> bool:
    try:
        return bool(request(sock_path, {"op": "ping"}, timeout=2.0).get("ok"))
    except (OSError, DaemonError, ValueError):
        return False


def start(state_dir: Path, run_dir: Path, upstreams: list[str] | None, agent_name: str) -> None:
    """Spawn the daemon detached (own session) and wait until it answers."""
    run_dir.mkdir(parents=True, exist_ok=True)
    sock_path = run_dir / "netd.sock"
    argv = [
        sys.executable,
        "-m",
        "runtime_agent.network.daemon",
        "--state-dir",
        str(state_dir),
        "--run-dir",
        str(run_dir),
        "--agent-name",
        agent_name,
    ]
    if upstreams is not None:
        argv += ["--upstreams", ",".join(upstreams)]
    with open(run_dir / "netd.log", "ab") as logf:
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            close_fds=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if is_running(sock_path):
            return
        time.sleep(0.02)
    raise DaemonError(f"network daemon did not start; see {run_dir / 'netd.log'}")


# ---- daemon side -----------------------------------------------------------------------


@dataclass
class DNSServer:
    gateway: str
    records: Records
    udp: asyncio.DatagramTransport | None = None
    tcp: asyncio.AbstractServer | None = None

    def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()


@dataclass
class Proxy:
    key: tuple[str, str, int, str, int]
    server: asyncio.AbstractServer | None = None
    udp: asyncio.DatagramTransport | None = None
    clients: dict[Any, Any] = field(default_factory=dict)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.udp is not None:
            self.udp.close()
        for transport in self.clients.values():
            transport.close()


class _Reply(asyncio.DatagramProtocol):
    def __init__(self, future: asyncio.Future[bytes]) -> None:
        self.future = future

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.future.done():
            self.future.set_result(data)


_tasks: set[asyncio.Task[None]] = set()


def _spawn(coro: Any) -> None:
    """Run a coroutine in the background, keeping a reference until it finishes."""
    task = asyncio.get_running_loop().create_task(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def relay_upstream(packet: bytes, upstreams: list[str]) -> bytes | None:
    loop = asyncio.get_running_loop()
    for server in upstreams:
        future: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda f=future: _Reply(f),  # type: ignore[misc]
            remote_addr=(server, 53),
        )
        try:
            transport.sendto(packet)
            return await asyncio.wait_for(future, UPSTREAM_TIMEOUT)
        except (TimeoutError, OSError):
            continue
        finally:
            transport.close()
    return None


class Daemon:
    def __init__(
        self,
        state_dir: Path,
        run_dir: Path,
        upstreams: list[str] | None,
        agent_name: str | None = None,
    ) -> None:
        self.agent_name = agent_name
        self.store = StateStore(state_dir)
        self.run_dir = run_dir
        self.upstreams = upstreams if upstreams is not None else host_upstreams()
        self.dns: dict[str, DNSServer] = {}  # network id -> server
        self.proxies: dict[tuple[str, str, int, str, int], Proxy] = {}
        self.views: dict[str, Records] = {}  # client address -> merged records
        self.stop = asyncio.Event()

    async def resolve(self, records: Records, packet: bytes, client: str) -> bytes | None:
        reply = self.views.get(client, records).answer(packet)
        if reply is not None:
            return reply
        if not self.upstreams:
            return error_response(packet, RCODE_SERVFAIL)
        relayed = await relay_upstream(packet, self.upstreams)
        return relayed if relayed is not None else error_response(packet, RCODE_SERVFAIL)

    async def start_dns(self, network_id: str, gateway: str, records: Records) -> DNSServer:
        loop = asyncio.get_running_loop()
        server = DNSServer(gateway=gateway, records=records)
        daemon = self

        class UDP(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                async def reply() -> None:
                    answer = await daemon.resolve(server.records, data, addr[0])
                    if answer is not None:
                        self.transport.sendto(answer, addr)  # type: ignore[attr-defined]

                _spawn(reply())

        async def tcp_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    packet = await reader.readexactly(length)
                    client = writer.get_extra_info("peername")[0]
                    answer = await daemon.resolve(server.records, packet, client)
                    if answer is None:
                        break
                    writer.write(struct.pack("!H", len(answer)) + answer)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        transport, _ = await loop.create_datagram_endpoint(UDP, local_addr=(gateway, 53))
        server.udp = transport
        try:
            server.tcp = await asyncio.start_server(tcp_client, gateway, 53, reuse_address=True)
        except OSError:
            transport.close()
            raise
        return server

    async def start_proxy(self, key: tuple[str, str, int, str, int]) -> Proxy:
        protocol, host_ip, host_port, target, target_port = key
        bind_ip = host_ip or "0.0.0.0"  # noqa: S104 - publishing on every address is the point
        proxy = Proxy(key=key)
        loop = asyncio.get_running_loop()
        if protocol == "tcp":

            async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    while data := await reader.read(65536):
                        writer.write(data)
                        await writer.drain()
                except ConnectionError:
                    pass
                finally:
                    with contextlib.suppress(Exception):
                        writer.write_eof()

            async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    up_reader, up_writer = await asyncio.open_connection(target, target_port)
                except OSError:
                    writer.close()
                    return
                try:
                    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
                finally:
                    writer.close()
                    up_writer.close()

            proxy.server = await asyncio.start_server(
                client, bind_ip, host_port, reuse_address=True
            )
        else:

            class Front(asyncio.DatagramProtocol):
                def connection_made(self, transport: asyncio.BaseTransport) -> None:
                    self.transport = transport

                def datagram_received(self, data: bytes, addr: Any) -> None:
                    back = proxy.clients.get(addr)
                    if back is not None:
                        back.sendto(data)
                        return
                    front = self.transport

                    class Back(asyncio.DatagramProtocol):
                        def datagram_received(self, reply: bytes, _a: Any) -> None:
                            front.sendto(reply, addr)  # type: ignore[attr-defined]

                    async def open_back() -> None:
                        transport, _ = await loop.create_datagram_endpoint(
                            Back, remote_addr=(target, target_port)
                        )
                        proxy.clients[addr] = transport
                        transport.sendto(data)
                        loop.call_later(UDP_PROXY_IDLE, expire, addr)

                    _spawn(open_back())

            def expire(addr: Any) -> None:
                transport = proxy.clients.pop(addr, None)
                if transport is not None:
                    transport.close()

            proxy.udp, _ = await loop.create_datagram_endpoint(
                Front, local_addr=(bind_ip, host_port)
            )
        return proxy

    async def sync(self) -> dict[str, Any]:
        """Make listeners match the state file; report what could not be bound."""
        state = self.store.load()
        errors: dict[str, str] = {}
        wanted_dns: dict[str, tuple[str, Records]] = {}
        for network in state.networks.values():
            wanted_dns[network.id] = (network.gateway, Records())
        wanted_proxies: set[tuple[str, str, int, str, int]] = set()
        for endpoint in state.endpoints.values():
            for iface in endpoint.interfaces:
                entry = wanted_dns.get(iface.network)
                if entry is None:
                    continue
                records = entry[1]
                for name in [endpoint.name, endpoint.hostname, endpoint.container_id[:12]]:
                    records.add(name, iface.address)
                for alias in iface.aliases:
                    records.add(alias, iface.address)
        # A container on several networks resolves the names of all of them, whichever
        # network's server it asks: its view is keyed by its own (unique) addresses.
        views: dict[str, Records] = {}
        for endpoint in state.endpoints.values():
            nets = [
                wanted_dns[i.network][1] for i in endpoint.interfaces if i.network in wanted_dns
            ]
            if len(nets) < 2:
                continue
            merged = Records()
            for records in nets:
                for name, addresses in records.names.items():
                    for address in addresses:
                        merged.add(name, address)
            for iface in endpoint.interfaces:
                views[iface.address] = merged
        self.views = views
        for endpoint in state.endpoints.values():
            for port in endpoint.ports:
                if port.host_ip in ("", "0.0.0.0", "127.0.0.1"):  # noqa: S104
                    wanted_proxies.add(
                        (
                            port.protocol,
                            port.host_ip,
                            port.host_port,
                            port.target,
                            port.container_port,
                        )
                    )
        for network_id in list(self.dns):
            current = self.dns[network_id]
            wanted = wanted_dns.get(network_id)
            if wanted is None or wanted[0] != current.gateway:
                current.close()
                del self.dns[network_id]
        for network_id, (gateway, records) in wanted_dns.items():
            if network_id in self.dns:
                self.dns[network_id].records = records
                continue
            try:
                self.dns[network_id] = await self.start_dns(network_id, gateway, records)
            except OSError as exc:
                errors[f"dns:{network_id}"] = f"DNS on {gateway}:53: {exc.strerror or exc}"
        for key in list(self.proxies):
            if key not in wanted_proxies:
                self.proxies.pop(key).close()
        for key in wanted_proxies - set(self.proxies):
            try:
                self.proxies[key] = await self.start_proxy(key)
            except OSError as exc:
                reason = (
                    "address already in use"
                    if exc.errno == errno.EADDRINUSE
                    else (exc.strerror or str(exc))
                )
                errors[f"port:{key[0]}:{key[1]}:{key[2]}"] = reason
        if not state.networks and not wanted_proxies:
            self.stop.set()
        return {"ok": True, "errors": errors}

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            request = json.loads(line or b"{}")
            op = request.get("op")
            if op == "ping":
                reply: dict[str, Any] = {"ok": True, "pid": os.getpid()}
            elif op == "sync":
                reply = await self.sync()
            elif op == "stop":
                reply = {"ok": True}
                self.stop.set()
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as exc:
            log.exception("control request failed")
            reply = {"ok": False, "error": str(exc)}
        writer.write(json.dumps(reply).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def watch_state(self) -> None:
        """Exit, and remove the agent's network objects, once its state is deleted.

        Deleting an agent's whole state directory (a decommissioned node, a finished test
        that removed its roots) would otherwise leave this daemon, the bridges and the
        nft table behind for good: nothing else knows about them any more.
        """
        while not self.stop.is_set():
            await asyncio.sleep(WATCH_INTERVAL)
            if self.store.path.exists() or self.agent_name is None:
                continue
            log.warning("state %s is gone: removing this agent's network objects", self.store.path)
            from runtime_agent.network.manager import sweep_kernel_objects

            # the manager's netns directory: <run_root>/netns next to <run_root>/network
            netns_dir = self.run_dir.parent / "netns"
            await asyncio.to_thread(sweep_kernel_objects, self.agent_name, netns_dir)
            self.stop.set()

    async def run(self) -> None:
        sock_path = self.run_dir / "netd.sock"
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        server = await asyncio.start_unix_server(self.control, str(sock_path))
        os.chmod(sock_path, 0o600)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        result = await self.sync()
        if result["errors"]:
            log.warning("initial sync: %s", result["errors"])
        watchdog = loop.create_task(self.watch_state())
        await self.stop.wait()
        watchdog.cancel()
        await asyncio.sleep(0.05)  # let the last control reply go out
        server.close()
        for dns in self.dns.values():
            dns.close()
        for proxy in self.proxies.values():
            proxy.close()
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="berth-netd")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--upstreams", default=None)
    parser.add_argument("--agent-name", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s netd %(levelname)s %(message)s")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    # One daemon per agent: the pid file's lock is held for the daemon's lifetime.
    pid_fd = os.open(args.run_dir / "netd.pid", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(pid_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("another network daemon already runs for %s", args.run_dir)
        return 0
    os.ftruncate(pid_fd, 0)
    os.write(pid_fd, f"{os.getpid()}\n".encode())
    upstreams = None
    if args.upstreams is not None:
        upstreams = [u for u in args.upstreams.split(",") if u]
    daemon = Daemon(args.state_dir, args.run_dir, upstreams, args.agent_name)
    asyncio.run(daemon.run())
    with contextlib.suppress(FileNotFoundError):
        (args.run_dir / "netd.pid").unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
