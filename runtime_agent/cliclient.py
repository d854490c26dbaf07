"""The client half of ``berth-agent``: hand a command to the agent's CLI server.

Every command starts here (see :mod:`runtime_agent.cliserver` for the server and the
protocol). It runs before anything else of the agent is imported, and often as the whole
client process, so it imports only modules built into the interpreter (``posix``, not
``os``: ``os`` and what it imports cost ~1.5 ms of every command) and no ``typing``.
Started by the launcher that ``infra/setup.sh`` writes (``python -S``, see
:mod:`runtime_agent.cli.launcher`), a served command costs the client little more than
the interpreter's own start-up. ``runtime_agent/cli/client.c`` is the same client
compiled (the usual ``berth-agent`` when a C compiler is there); a change to the
protocol changes both.
"""

import _signal
import _socket
import posix
import sys

TYPE_CHECKING = False  # typing itself costs ~3 ms, paid by every command
if TYPE_CHECKING:
    from os import PathLike

SOCKET_NAME = "cli.sock"
DEFAULT_RUN_ROOT = "/run/berth"  # AgentConfig's default, repeated: the config is too heavy
PROTOCOL = b"berth-cli/1"
# Commands that must not run inside the server: the server itself and long-lived
# processes with their own lifecycle (a Celery worker; join gains nothing there).
NOT_FORWARDED = frozenset({"serve", "worker", "join"})
RELAYED_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)


def _fsencode(text: "str | bytes") -> bytes:
    if isinstance(text, bytes):
        return text
    return text.encode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def _fsdecode(data: bytes) -> str:
    return data.decode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def _environ() -> "dict[bytes, bytes]":
    """This process's environment: ``os.environb`` once ``os`` is imported (it tracks
    changes made through ``os.environ``), else the interpreter's start-up copy."""
    os = sys.modules.get("os")
    return dict(os.environb) if os is not None else dict(posix.environ)


def socket_path(run_root: "str | PathLike[str] | None" = None) -> str:
    """Where the server for this run root (default: ``BERTH_RUN_ROOT``'s) listens."""
    if run_root is None:
        return _socket_path_in(_environ())
    text = posix.fspath(run_root)
    return text + SOCKET_NAME if text.endswith("/") else text + "/" + SOCKET_NAME


def _socket_path_in(env: "dict[bytes, bytes]") -> str:
    root = env.get(b"BERTH_RUN_ROOT")
    return socket_path(_fsdecode(root) if root else DEFAULT_RUN_ROOT)


def encode_request(
    argv: "list[str]",
    cwd: "str | bytes",
    umask: int,
    env: "dict[str, str] | dict[bytes, bytes]",
) -> bytes:
    """NUL-separated fields (argv and the environment never contain NUL), after the
    body's length on a line of its own."""
    fields = [PROTOCOL, _fsencode(cwd), b"%o" % umask, b"%d" % len(argv)]
    fields += [_fsencode(a) for a in argv]
    fields += [_fsencode(k) + b"=" + _fsencode(v) for k, v in env.items()]
    body = b"\0".join(fields)
    return b"%d\n" % len(body) + body


def _first_command(argv: "list[str]") -> "str | None":
    return next((a for a in argv if a[:1] != "-"), None)


def forward(argv: "list[str]") -> "int | None":
    """Run ``berth-agent argv`` in the resident server; None when there is none.

    Returns the command's exit status. Signals the user sends to this process go to the
    command (a Ctrl-C stops ``run`` or ``logs -f`` as it would in-process).
    """
    env = _environ()
    if env.get(b"BERTH_NO_SERVER") or _first_command(argv) in NOT_FORWARDED:
        return None
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        conn.connect(_socket_path_in(env))
    except OSError:
        conn.close()
        return None
    try:
        umask = posix.umask(0)
        posix.umask(umask)
        try:
            cwd = posix.getcwdb()
        except OSError:
            cwd = b"/"
        request = encode_request(argv, cwd, umask, env)
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
        try:
            sent = conn.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
            if sent < len(request):
                conn.sendall(request[sent:])
        except OSError:
            return None  # the server went away between connect and send: run in-process
        return _await_child(conn)
    finally:
        conn.close()


def _read_line(conn: "_socket.socket", pending: bytearray) -> "bytes | None":
    while b"\n" not in pending:
        chunk = conn.recv(64)
        if not chunk:
            return None
        pending += chunk
    line, _, rest = bytes(pending).partition(b"\n")
    pending[:] = rest
    return line


def _await_child(conn: "_socket.socket") -> int:
    pending = bytearray()
    first = _read_line(conn, pending)
    if not first:
        sys.stderr.write("berth-agent: the agent's CLI server refused the command\n")
        return 125
    pid = int(first)

    def relay(signum: int, _frame: object) -> None:
        try:
            posix.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in RELAYED_SIGNALS:
        _signal.signal(signum, relay)
    last = _read_line(conn, pending)
    if not last:
        sys.stderr.write("berth-agent: the command ended without an exit status (killed?)\n")
        return 125
    return int(last)
