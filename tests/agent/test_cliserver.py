"""``berth-agent`` commands served by the resident CLI server (``berth-agent serve``).

The command a user types must behave exactly as it does in-process: same output on the
same streams, same exit codes, stdin and working directory honoured, Ctrl-C handled;
and the client must really hand the command over instead of running it itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime_agent import cliclient, cliserver
from runtime_agent.agent import Agent
from runtime_agent.cli import launcher
from runtime_agent.config import AgentConfig
from tests.agent.test_runtime_fixtures import (
    Cli,
    agent_env,
    cleanup_agent,
    cli_runner,
    needs_runtime,
    until,
)

pytestmark = needs_runtime


@pytest.fixture(scope="module", params=["native", "python"])
def berth_agent(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``berth-agent`` as infra/setup.sh installs it: the native client in front of the
    Python launcher (python -S); and the launcher alone, as without a C compiler. Every
    test using it runs with both."""
    native = request.param == "native"
    path = launcher.install(tmp_path_factory.mktemp("bin"), native=native)
    assert (path.read_bytes()[:4] == b"\x7fELF") == native  # a failed build would hide here
    return str(path)


@pytest.fixture
def env(agent_config: AgentConfig) -> dict[str, str]:
    env = agent_env(agent_config)
    env.pop("BERTH_NO_SERVER", None)
    return env


@pytest.fixture
def server(agent_config: AgentConfig, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "runtime_agent.cli.main", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    sock = Path(cliclient.socket_path(agent_config.run_root))
    try:
        until(lambda: sock.exists() or process.poll() is not None, timeout=30)
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)
        cleanup_agent(Agent(agent_config))


@pytest.fixture
def cli(env: dict[str, str], server: subprocess.Popen[bytes], berth_agent: str) -> Cli:
    run = cli_runner([berth_agent], env)
    assert run("bootstrap").returncode == 0
    return run


def test_the_client_hands_the_command_over(env: dict[str, str], cli: Cli) -> None:
    # A served command ends the client with posix._exit (no interpreter teardown): report
    # from there as well as after a normal return. The probe runs as the launcher does:
    # python -S, the project on sys.path, no site (and so no os) until it is needed.
    probe = (
        "import posix, sys; sys.path.append(sys.argv.pop(1))\n"
        "import runtime_agent.cli as c; sys.argv = ['berth-agent', 'images']\n"
        "def report(code):\n"
        "    sys.stdout.flush()\n"
        "    where = 'in-process' if 'runtime_agent.cli.main' in sys.modules else 'served'\n"
        "    site = 'site' if 'site' in sys.modules else 'no site'\n"
        "    print(where, code, site, flush=True)\n"
        "real_exit = posix._exit\n"
        "posix._exit = lambda code: (report(code), real_exit(code))\n"
        "report(c.entry_point())\n"
    )
    root = str(Path(cliclient.__file__).parent.parent)
    probe_argv = [sys.executable, "-S", "-c", probe, root]
    result = subprocess.run(probe_argv, env=env, capture_output=True, text=True, check=False)
    assert result.stdout.splitlines()[-1] == "served 0 no site", result.stderr
    assert "busybox" in result.stdout  # the listing the server's command wrote to our stdout
    fallback = subprocess.run(
        probe_argv,
        env={**env, "BERTH_NO_SERVER": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    # In-process, the command needs site-packages (pyroute2): entry_point loaded site.
    assert fallback.stdout.splitlines()[-1] == "in-process 0 site", fallback.stderr


def test_streams_and_exit_codes_are_the_commands(cli: Cli) -> None:
    result = cli("run", "--rm", "busybox", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    cases = [
        (["run", "--rm", "--memory", "32m", "busybox", "tail", "/dev/zero"], 137, ""),
        (["run", "--rm", "--memory", "10q", "busybox", "true"], 125, '"10q"'),
        (["run", "--rm", "busybox", "nosuchcommand"], 127, "not found"),
        (["run", "--rm", "busybox", "/etc/passwd"], 126, "permission denied"),
        (["nosuchcommand"], 125, "invalid choice"),
    ]
    for args, code, reason in cases:
        result = cli(*args)
        assert result.returncode == code, (args, result.stderr)
        assert reason in result.stderr, (args, result.stderr)
    assert cli("ps", "-a", "-q").stdout == ""
    helped = cli("run", "--help")
    assert helped.returncode == 0 and "--memory" in helped.stdout


def test_stdin_and_working_directory_are_the_clients(cli: Cli, tmp_path: Path) -> None:
    piped = cli("run", "-i", "--rm", "busybox", "tr", "a-z", "A-Z", input="to run -i\n")
    assert (piped.returncode, piped.stdout) == (0, "TO RUN -I\n"), piped.stderr
    assert cli("run", "-d", "--name", "box", "busybox", "sleep", "60").returncode == 0
    result = cli("exec", "-i", "box", "sh", "-c", "tr a-z A-Z", input="piped through\n")
    assert (result.returncode, result.stdout) == (0, "PIPED THROUGH\n"), result.stderr
    # A relative build context is resolved in the client's working directory.
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text("FROM busybox\nCOPY hello /hello\n")
    (tmp_path / "ctx" / "hello").write_text("from the context\n")
    built = cli("build", "-t", "hello:1", "ctx", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    shown = cli("run", "--rm", "hello:1", "cat", "/hello")
    assert shown.stdout == "from the context\n"


def test_build_context_on_stdin(
    env: dict[str, str], cli: Cli, tmp_path: Path, berth_agent: str
) -> None:
    archive = tmp_path / "ctx.tar"
    with tarfile.open(archive, "w") as tar:
        data = tmp_path / "Dockerfile"
        data.write_text("FROM busybox\nRUN echo built > /marker\n")
        tar.add(data, arcname="Dockerfile")
    with archive.open("rb") as stdin:
        piped = subprocess.run(
            [berth_agent, "build", "-t", "piped:1", "-"],
            env=env,
            stdin=stdin,
            capture_output=True,
            check=False,
        )
    assert piped.returncode == 0, piped.stderr
    assert cli("run", "--rm", "piped:1", "cat", "/marker").stdout == "built\n"


def test_ctrl_c_reaches_the_command(env: dict[str, str], cli: Cli, berth_agent: str) -> None:
    client = subprocess.Popen(
        [berth_agent, "run", "--rm", "--name", "sleeper", "busybox", "sleep", "9"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    until(lambda: "sleeper" in cli("ps").stdout, timeout=30)
    started = time.monotonic()
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=30) == 130
    assert time.monotonic() - started < 20
    assert cli("ps", "-a", "-q").stdout == ""  # --rm still removed it


def test_a_killed_command_is_reported_not_hung(
    env: dict[str, str], server: subprocess.Popen[bytes], cli: Cli, berth_agent: str
) -> None:
    client = subprocess.Popen(
        [berth_agent, "run", "--rm", "--name", "victim", "busybox", "sleep", "9"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    until(lambda: "victim" in cli("ps").stdout, timeout=30)
    # The command runs in a child the server forked (not in the client): the one writing
    # to the client's stdout (the other child is the spare waiting for the next command).
    assert client.stdout is not None
    pipe = f"pipe:[{os.fstat(client.stdout.fileno()).st_ino}]"

    def stdout_of(pid: int) -> str:
        try:
            return os.readlink(f"/proc/{pid}/fd/1")
        except OSError:  # gone meanwhile (the command of `ps` above, exiting)
            return ""

    (command,) = [pid for pid in _children(server.pid) if stdout_of(pid) == pipe]
    os.kill(command, signal.SIGKILL)
    assert client.wait(timeout=30) == 125
    assert "without an exit status" in (client.stderr.read() if client.stderr else "")
    assert cli("rm", "-f", "victim").returncode == 0


def test_the_server_forks_from_a_single_thread(
    server: subprocess.Popen[bytes], cli: Cli, tmp_path: Path
) -> None:
    # fork() keeps only the calling thread; BuildKit's parser (a Go runtime) must load in
    # the child, after a build has run too.
    dockerfile = "FROM busybox\nENV A=1\n"
    built = cli("build", "-t", "x:1", "-f", "-", str(tmp_path), input=dockerfile)
    assert built.returncode == 0, built.stderr
    status = Path(f"/proc/{server.pid}/status").read_text()
    assert "\nThreads:\t1\n" in status


def test_only_the_servers_uid_may_connect(agent_config: AgentConfig, cli: Cli) -> None:
    path = cliclient.socket_path(agent_config.run_root)
    assert os.stat(path).st_mode & 0o777 == 0o600
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            code = 0
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1


def test_stopping_the_server_falls_back_in_process(
    agent_config: AgentConfig, server: subprocess.Popen[bytes], cli: Cli
) -> None:
    server.terminate()
    assert server.wait(timeout=10) == 0
    assert not Path(cliclient.socket_path(agent_config.run_root)).exists()
    result = cli("run", "--rm", "busybox", "echo", "still works")
    assert (result.returncode, result.stdout) == (0, "still works\n")


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == pid]


def _only_child(server: subprocess.Popen[bytes], other_than: int = 0) -> int:
    """The server's one child (its spare), once there is exactly one and it is new."""

    def single() -> int:
        children = _children(server.pid)
        return children[0] if len(children) == 1 and children[0] != other_than else 0

    return int(until(single))  # type: ignore[call-overload]


def test_a_spare_child_is_forked_ahead_and_replaced(
    server: subprocess.Popen[bytes], cli: Cli
) -> None:
    """The server keeps one child forked ahead of the next command; a command takes it
    and a new one is forked. A spare that died is replaced, and stopping the server
    ends the spare too (nothing is left running)."""
    spare = _only_child(server)
    assert cli("ps").returncode == 0
    second = _only_child(server, other_than=spare)
    os.kill(second, signal.SIGKILL)
    until(lambda: not Path(f"/proc/{second}").exists())  # reaped by the kernel (SIGCHLD ignored)
    result = cli("run", "--rm", "busybox", "echo", "served")
    assert (result.returncode, result.stdout) == (0, "served\n")
    third = _only_child(server, other_than=second)
    server.terminate()
    assert server.wait(timeout=10) == 0
    until(lambda: not Path(f"/proc/{third}").exists())
    assert server.stderr is not None
    assert b"no child took" not in server.stderr.read()


def test_request_encoding_round_trips_odd_text() -> None:
    argv = ["run", "-e", "A=b=c", "--", "sh", "-c", "echo 'x y'\n", "\udcff", ""]
    env = {"K": "v=w", "EMPTY": "", "NON_UTF8": "\udcfe"}
    raw = cliclient.encode_request(argv, "/tmp/a b", 0o027, env)
    header, _, body = raw.partition(b"\n")
    assert int(header) == len(body)
    assert cliserver.decode_request(body) == (argv, "/tmp/a b", 0o027, env)
    with pytest.raises(ValueError):
        cliserver.decode_request(b"other/1\0/\0022\0" + b"0")
    # What the client sends from its process: bytes from posix, as is.
    environb = {b"K": b"v=w", b"NON_UTF8": b"\xfe"}
    raw = cliclient.encode_request(argv, b"/tmp/\xff", 0o022, environb)
    assert cliserver.decode_request(raw.partition(b"\n")[2]) == (
        argv,
        "/tmp/\udcff",
        0o022,
        {"K": "v=w", "NON_UTF8": "\udcfe"},
    )


def test_the_native_client_hands_over_or_execs_the_python_launcher(
    agent_config: AgentConfig, env: dict[str, str], server: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    """Built with a stand-in for ``berth-agent-py`` that reports its arguments: a served
    command never reaches it; one that can't be served reaches it with the same argv."""
    fallback = tmp_path / "fallback"
    fallback.write_text('#!/bin/sh\necho "in-process: $*"\nexit 42\n')
    fallback.chmod(0o755)
    client = tmp_path / "berth-agent"
    assert launcher.compile_client(fallback, client)

    def run(*args: str, **extra: str) -> tuple[int, str]:
        result = subprocess.run(
            [str(client), *args], env={**env, **extra}, capture_output=True, text=True
        )
        return result.returncode, result.stdout + result.stderr

    assert run("bootstrap")[0] == 0
    code, output = run("run", "--rm", "busybox", "sh", "-c", "echo $0; exit 7", "a b")
    assert (code, output) == (7, "a b\n")
    assert run("run", "--rm", "busybox", "true", BERTH_NO_SERVER="1") == (
        42,
        "in-process: run --rm busybox true\n",
    )
    assert run("serve") == (42, "in-process: serve\n")
    assert run("join", "u", "x") == (42, "in-process: join u x\n")
    assert run("ps", BERTH_RUN_ROOT=str(tmp_path / "nothing")) == (42, "in-process: ps\n")
    server.terminate()
    assert server.wait(timeout=10) == 0
    assert run("ps") == (42, "in-process: ps\n")


def test_the_launcher_starts_python_without_site(tmp_path: Path) -> None:
    path = launcher.install(tmp_path, native=False)
    assert path.read_text() == (tmp_path / "berth-agent-py").read_text()
    text = path.read_text()
    assert text.startswith(f"#!{sys.executable} -S\n")
    assert path.stat().st_mode & 0o777 == 0o755
    # Run in-process (no server at this run root): site is loaded then, and the full
    # agent imports from it.
    probe = subprocess.run(
        [str(path), "--help"],
        env={**os.environ, "BERTH_RUN_ROOT": str(tmp_path / "run")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    assert "docker-like" in probe.stdout or "usage: berth-agent" in probe.stdout
    with pytest.raises(ValueError):
        launcher.render("/opt/my python/bin/python", "/src")


def test_the_socket_path_follows_the_run_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BERTH_RUN_ROOT", "/run/other/")
    assert cliclient.socket_path() == "/run/other/cli.sock"
    monkeypatch.delenv("BERTH_RUN_ROOT")
    assert cliclient.socket_path() == "/run/berth/cli.sock"
    assert cliclient.socket_path(Path("/x")) == "/x/cli.sock"


def _parent(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_the_spares_rehearsal_changes_nothing(tmp_path: Path) -> None:
    """The spare rehearses ``run`` while it waits: it must only read. Against an empty
    root it creates nothing; against a node with containers, images and networks it
    writes no file."""
    root, run_root = tmp_path / "state", tmp_path / "run"
    code = (
        "import os, sys; from runtime_agent.cli.main import rehearse; rehearse();"
        " print(sorted(os.listdir(sys.argv[1])))"
    )
    env = dict(os.environ, BERTH_ROOT=str(root), BERTH_RUN_ROOT=str(run_root))
    tmp_path.joinpath("marker").touch()
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "['marker']"  # no state or run directory made


def test_the_rehearsal_only_reads_a_populated_node(
    agent_config: AgentConfig, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime_agent.cli.main import rehearse
    from runtime_agent.images.bootstrap import bootstrap_busybox

    agent = Agent(agent_config)
    bootstrap_busybox(agent)
    try:
        agent.networks.ensure_default("default")

        daemon_dir = agent_config.run_root / "network"  # the network daemon's own files

        def tree() -> dict[str, tuple[int, int]]:
            return {
                str(p): (p.stat().st_mtime_ns, p.stat().st_size)
                for base in (agent_config.root, agent_config.run_root)
                for p in base.rglob("*")
                if p.is_file() and not p.is_socket() and daemon_dir not in p.parents
            }

        before = tree()
        for key in ("BERTH_ROOT", "BERTH_RUN_ROOT", "BERTH_AGENT_NAME"):
            monkeypatch.setenv(key, env[key])
        rehearse()
        assert tree() == before
    finally:
        cleanup_agent(agent)
