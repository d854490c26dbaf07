"""The agent's CLI server: ``berth-agent`` commands run in a warm, resident process.

A ``berth-agent`` command spends most of its life starting Python and importing the
agent (pyroute2 alone costs over 100 ms), not running the container. docker solves this
with a thin client and a daemon; Berth does the same without a second API: the resident
server has every module imported and, for each command, a child forked from it becomes
the command. The child is forked *before* the command arrives (a "spare", waiting on a
socket pair for the accepted connection), so the ~2 ms fork of a large process is off the
command's path; the server forks the next spare when that command ends (or has run 50
ms), so that the fork and the spare's warm-up overlap the next client's start-up, not a
container's. The client (``berth-agent`` itself: ``runtime_agent/cli/client.c`` compiled,
or :func:`runtime_agent.cliclient.forward`) connects to the server's unix socket and
hands over

* its stdin, stdout and stderr as file descriptors (``SCM_RIGHTS``): the child writes
  straight to the user's terminal or pipe and reads its stdin (``build -``, ``load``,
  ``exec -i``), with no copying and with ``isatty`` telling the truth;
* its argv, working directory, umask and environment: the child applies them before it
  runs ``main(argv)``, so a command behaves exactly as it would have in the client
  (relative paths, ``BERTH_*`` settings, ``--tenant``), exit codes included.

The child sends its pid first, so the client forwards SIGINT/SIGTERM/SIGHUP to it, and
its exit status last. The server itself holds no state and no threads: it only imports
modules before it forks (which keeps the fork safe) and never opens netlink sockets,
locks or files the children could share. Kernel objects and state are the children's,
through the same code and locks as a command run in-process.

With no server listening (``berth-agent serve`` not running, or a different
``BERTH_RUN_ROOT``) the client runs the command in its own process, as before. Only root
(the server's own uid) may connect: the socket is mode 0600 and the peer's credentials
are checked. After upgrading the agent, restart the server (as with any daemon): it runs
the code it imported.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from runtime_agent.cliclient import PROTOCOL, SOCKET_NAME

if TYPE_CHECKING:
    import socket
    from pathlib import Path

# What a command may import; importing all of it up front is the point of the server.
PRELOAD = (
    "runtime_agent.cli.main",
    "runtime_agent.cli.containers",
    "runtime_agent.cli.images",
    "runtime_agent.cli.volumes",
    "runtime_agent.cli.networks",
    "runtime_agent.cli.build",
    "runtime_agent.cli.registry",
    "runtime_agent.agent",
    "runtime_agent.protocol",
    "runtime_agent.runtime.manager",
    "runtime_agent.runtime.spec",
    "runtime_agent.runtime.security",
    "runtime_agent.runtime.seccomp",
    "runtime_agent.runtime.logs",
    "runtime_agent.runtime.monitor",
    "runtime_agent.cgroups",
    "runtime_agent.cgroups.v1",
    "runtime_agent.cgroups.v2",
    "runtime_agent.images.store",
    "runtime_agent.images.archive",
    "runtime_agent.snapshots.snapshotter",
    "runtime_agent.snapshots.mount",
    "runtime_agent.volumes.manager",
    "runtime_agent.volumes.flags",
    "runtime_agent.network.manager",
    "runtime_agent.network.flags",
    "runtime_agent.devices.cdi",
    "runtime_agent.build.builder",
    "runtime_agent.distribution",
    "pyroute2",
)
MAX_REQUEST = 4 << 20  # argv + environment; far beyond ARG_MAX-sized command lines
# How long the server waits for a command to end before it forks the next spare anyway.
SPARE_DELAY = 0.05


# ---- the request -------------------------------------------------------------------------


def decode_request(body: bytes) -> tuple[list[str], str, int, dict[str, str]]:
    """argv, working directory, umask and environment of ``cliclient.encode_request``."""
    fields = body.split(b"\0")
    if len(fields) < 4 or fields[0] != PROTOCOL:
        raise ValueError("not a berth-cli/1 request")
    cwd, umask, count = os.fsdecode(fields[1]), int(fields[2], 8), int(fields[3])
    if count < 0 or len(fields) < 4 + count:
        raise ValueError("malformed request")
    argv = [os.fsdecode(a) for a in fields[4 : 4 + count]]
    env = {}
    for item in fields[4 + count :]:
        key, sep, value = item.partition(b"=")
        if sep:
            env[os.fsdecode(key)] = os.fsdecode(value)
    return argv, cwd, umask, env


# ---- server -----------------------------------------------------------------------------


def serve(run_root: Path) -> None:
    """Listen on ``run_root/cli.sock`` and run each command in a forked child. Blocks.

    SIGTERM or SIGINT stops listening; commands already running go on to their end.
    """
    import importlib
    import select
    import signal
    import time

    for name in PRELOAD:
        importlib.import_module(name)
    from runtime_agent.cli.main import prepare

    prepare()
    _tune_host()
    # fork() keeps only the calling thread: a preloaded module that started threads (a Go
    # runtime, a pool) would leave its state broken in every child. Refuse to serve.
    threads = _thread_count()
    if threads != 1:
        raise RuntimeError(
            f"the CLI server has {threads} threads after preloading; forking is unsafe"
        )
    import gc

    gc.freeze()  # preloaded objects stay out of the children's collections (fewer COW copies)
    run_root.mkdir(parents=True, exist_ok=True)
    path = run_root / SOCKET_NAME
    listener, inode = _listen(path)
    # Children are reaped by the kernel; each child restores SIGCHLD before running a
    # command (runc and conmon are its own children, waited for by subprocess).
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    listener.setblocking(False)
    spare: _Spare | None = _Spare.fork(listener)
    # The last command's child while it runs: the next spare is forked when it ends (or
    # has run SPARE_DELAY), not while it starts, so the fork and the spare's rehearsal
    # don't take the CPU a starting container needs; they overlap the next client's own
    # start-up instead. A command arriving with no spare ready forks one on the spot.
    busy: _Spare | None = None
    try:
        while not stopping:
            timeout = 0.5  # how soon a stop signal is noticed
            if busy is not None:
                timeout = max(0.0, min(timeout, busy.handed + SPARE_DELAY - time.monotonic()))
            waiting = [listener.fileno()] if busy is None else [listener.fileno(), busy.pidfd]
            readable, _, _ = select.select(waiting, [], [], timeout)
            if busy is not None and (
                busy.pidfd in readable or time.monotonic() >= busy.handed + SPARE_DELAY
            ):
                busy.close()
                busy = None
            if listener.fileno() not in readable:
                if spare is None and busy is None:
                    try:
                        spare = _Spare.fork(listener)
                    except OSError as exc:  # no memory or pids left: try again later
                        sys.stderr.write(f"berth-agent serve: {exc}\n")
                        time.sleep(0.5)
                continue
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            try:
                conn.setblocking(True)
                if busy is not None:
                    busy.close()  # another command takes over: stop watching that one
                    busy = None
                for _attempt in range(2):
                    if spare is None:
                        spare = _Spare.fork(listener)
                    if spare.take(conn):
                        busy, spare = spare, None
                        break
                    spare.close()  # it died (killed?): the next one serves
                    spare = None
                else:
                    sys.stderr.write("berth-agent serve: no child took the command\n")
            except Exception as exc:  # one bad request must not stop the server
                sys.stderr.write(f"berth-agent serve: {exc}\n")
            finally:
                conn.close()
    finally:
        for child in (spare, busy):
            if child is not None:
                child.close()  # a spare sees EOF and exits
        listener.close()
        try:
            if path.stat().st_ino == inode:  # not a newer server's socket
                path.unlink()
        except FileNotFoundError:
            pass


class _Spare:
    """A child forked ahead of time that waits for one connection, then becomes its
    command. The server's end of the socket pair hands the connection over; closing it
    without doing so makes the child exit. ``pidfd`` becomes readable when the child
    has exited."""

    def __init__(self, sock: socket.socket, pidfd: int) -> None:
        self.sock = sock
        self.pidfd = pidfd
        self.handed = 0.0  # when it took a command (time.monotonic())

    @classmethod
    def fork(cls, listener: socket.socket) -> _Spare:
        import socket

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 125
            try:
                listener.close()
                ours.close()
                code = _wait_and_serve(theirs)
            finally:
                os._exit(code)
        theirs.close()
        return cls(ours, os.pidfd_open(pid))  # it waits for a connection: can't be gone

    def take(self, conn: socket.socket) -> bool:
        """Hand ``conn`` over; False when the child is gone."""
        import socket
        import time

        try:
            socket.send_fds(self.sock, [b"c"], [conn.fileno()])
        except OSError:
            return False
        self.handed = time.monotonic()
        return True

    def close(self) -> None:
        self.sock.close()
        os.close(self.pidfd)


def _wait_and_serve(pair: socket.socket) -> int:
    """In a spare: wait for the server to hand over a connection and serve it."""
    import signal
    import socket

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setsid()  # out of the server's session and process group
    try:
        from runtime_agent.cli.main import rehearse

        rehearse()  # copy-on-write faults now, not during the command
    except Exception:  # noqa: S110 - warming up only: the command will report real errors
        pass
    try:
        _data, fds, _flags, _addr = socket.recv_fds(pair, 1, 1)
    except OSError:
        return 0
    finally:
        pair.close()
    if not fds:
        return 0  # the server stopped, or forked a newer spare
    conn = socket.socket(fileno=fds[0])
    code = 125
    try:
        if not _peer_allowed(conn):
            return code  # the client sees EOF and reports the refusal
        body, stdio = _receive(conn)
        code = _child(conn, body, stdio)
    except BaseException as exc:
        try:
            os.write(2, f"berth-agent: {exc}\n".encode())
        except OSError:
            pass
    finally:
        try:
            conn.sendall(b"%d\n" % code)
        except OSError:
            pass
    return code


def _tune_host() -> None:
    """Node-wide cgroup set-up before the first command (children inherit it as done);
    a kernel that refuses it is worth a line in the server's log, not in every command."""
    from runtime_agent.cgroups import tune_host
    from runtime_agent.config import AgentConfig

    refused = tune_host(AgentConfig())
    if refused:
        sys.stderr.write(f"berth-agent serve: cgroup favordynmods not set: {refused}\n")


def _thread_count() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def _listen(path: Path) -> tuple[socket.socket, int]:
    import errno
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
            raise
    else:
        raise OSError(errno.EADDRINUSE, f"a CLI server already listens on {path}")
    finally:
        probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    old = os.umask(0o177)  # the socket is 0600: only root reaches the server
    try:
        listener.bind(str(tmp))
    finally:
        os.umask(old)
    os.rename(tmp, path)  # replaces a stale socket of a server that died
    listener.listen(64)
    return listener, path.stat().st_ino


def _peer_allowed(conn: socket.socket) -> bool:
    import socket
    import struct

    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The request body and the three descriptors, or ValueError (fds closed)."""
    import socket

    conn.settimeout(5)
    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 3)
    try:
        header, sep, body = data.partition(b"\n")
        if len(fds) != 3 or not sep or not header.isdigit():
            raise ValueError("malformed request (expected a length and 3 descriptors)")
        size = int(header)
        if size > MAX_REQUEST:
            raise ValueError(f"request of {size} bytes is too large")
        buffer = bytearray(body)
        while len(buffer) < size:
            chunk = conn.recv(min(size - len(buffer), 1 << 20))
            if not chunk:
                raise ValueError("client went away mid-request")
            buffer += chunk
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    conn.settimeout(None)
    return bytes(buffer), fds


def _child(conn: socket.socket, body: bytes, fds: list[int]) -> int:
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    argv, cwd, umask, env = decode_request(body)
    os.environ.clear()
    os.environ.update(env)
    os.umask(umask)
    # Fresh stdio objects over the client's descriptors: buffering and isatty are theirs.
    sys.stdin = open(0, closefd=False)  # the process's own stdio, kept open to the end
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    try:
        os.chdir(cwd)
    except OSError as exc:
        sys.stderr.write(f"berth-agent: working directory {cwd}: {exc.strerror}\n")
        return 125
    conn.sendall(b"%d\n" % os.getpid())
    sys.argv = ["berth-agent", *argv]
    from runtime_agent.cli.main import main as run_command

    try:
        code = run_command(argv)
    except SystemExit as exc:  # argparse's --help and usage errors
        if isinstance(exc.code, str):
            sys.stderr.write(exc.code + "\n")
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    return code & 0xFF
