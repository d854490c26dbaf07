"""``berth-agent`` container commands as a user types them: output, JSON, exit codes."""

from __future__ import annotations

import hashlib
import json

from runtime_agent.config import AgentConfig
from tests.agent.test_runtime_fixtures import Cli, needs_runtime, until

pytestmark = needs_runtime


def _nothing_left(cli: Cli, agent_config: AgentConfig, tenant: str = "default") -> None:
    assert cli("ps", "-a", "-q", "--tenant", tenant).stdout == ""
    active = agent_config.snapshots_dir / "active"
    assert not active.exists() or not list(active.iterdir())


def test_bootstrap_then_memory_hog_exits_137(cli: Cli, agent_config: AgentConfig) -> None:
    assert cli("bootstrap").returncode == 0
    result = cli("run", "--rm", "--memory", "32m", "busybox", "tail", "/dev/zero")
    assert result.returncode == 137, result.stderr
    _nothing_left(cli, agent_config)


def test_bad_input_exit_codes_leave_nothing(cli: Cli, agent_config: AgentConfig) -> None:
    assert cli("bootstrap").returncode == 0
    cases = [
        (["run", "--rm", "--memory", "10q", "busybox", "true"], 125, '"10q"'),
        (["run", "--rm", "--cpus", "-1", "busybox", "true"], 125, "--cpus"),
        (["run", "--rm", "--pids-limit", "x", "busybox", "true"], 125, "--pids-limit"),
        (["run", "--rm", "--restart", "sometimes", "busybox", "true"], 125, "restart policy"),
        (["run", "--rm", "nosuchimage", "true"], 125, "nosuchimage"),
        (["run", "--rm", "--bogus-flag", "busybox", "true"], 125, "--bogus-flag"),
        (["run", "--rm", "busybox", "nosuchcommand"], 127, "not found"),
        (["run", "--rm", "busybox", "/etc/passwd"], 126, "permission denied"),
        (["run", "--rm", "-u", "ghost", "busybox", "true"], 125, "unable to find user"),
    ]
    for args, code, reason in cases:
        result = cli(*args)
        assert result.returncode == code, (args, result.stderr)
        assert reason in result.stderr, (args, result.stderr)
    _nothing_left(cli, agent_config)


def test_foreground_run_streams_output_and_passes_the_exit_code(cli: Cli) -> None:
    assert cli("bootstrap").returncode == 0
    result = cli(
        "run", "--rm", "--network", "none", "-e", "WHO=world", "-w", "/tmp", "busybox",
        "sh", "-c", "echo hello $WHO; pwd; echo oops >&2; exit 42",
    )  # fmt: skip
    assert result.returncode == 42
    assert result.stdout == "hello world\n/tmp\n"
    assert result.stderr == "oops\n"


def test_output_without_a_final_newline_is_printed_as_is(cli: Cli) -> None:
    """`printf abc`: conmon logs it as a partial entry; docker prints "abc", so do we
    (it used to be dropped), in run and in logs."""
    assert cli("bootstrap").returncode == 0
    result = cli("run", "--rm", "--network", "none", "busybox", "sh", "-c", "echo one; printf two")
    assert (result.returncode, result.stdout) == (0, "one\ntwo")
    created = cli("run", "-d", "--network", "none", "busybox", "printf", "abc")
    container = created.stdout.strip()
    assert cli("wait", container).stdout.strip() == "0"
    assert cli("logs", container).stdout == "abc"
    assert cli("rm", container).returncode == 0


def test_run_interactive_feeds_stdin_like_docker_run_i(cli: Cli, agent_config: AgentConfig) -> None:
    assert cli("bootstrap").returncode == 0
    quick = ["run", "--rm", "--network", "none"]
    upper = cli(*quick, "-i", "busybox", "tr", "a-z", "A-Z", input="piped in\nsecond line\n")
    assert (upper.returncode, upper.stdout, upper.stderr) == (0, "PIPED IN\nSECOND LINE\n", "")
    # Megabytes arrive whole and in order (conmon takes 8 KiB messages).
    payload = "".join(f"{n:07d} {'x' * 56}\n" for n in range(40_000))  # 2.6 MB
    digest = hashlib.sha256(payload.encode()).hexdigest()
    summed = cli(*quick, "-i", "busybox", "sha256sum", input=payload)
    assert summed.stdout.split()[0] == digest, summed.stderr
    # Without -i the container's stdin is empty, as with docker.
    assert cli(*quick, "busybox", "cat", input="not forwarded\n").stdout == ""
    # A container that stops reading (and ends) first: no error, its own exit code.
    early = cli(*quick, "-i", "busybox", "sh", "-c", "head -1; exit 5", input=payload)
    assert (early.returncode, early.stdout, early.stderr) == (5, "0000000 " + "x" * 56 + "\n", "")
    # -d -i: stdin stays open with nobody attached; docker's inspect field says so.
    detached = cli("run", "-d", "-i", "--name", "reader", "--network", "none", "busybox", "cat")
    assert detached.returncode == 0, detached.stderr
    shown = json.loads(cli("inspect", "reader").stdout)[0]
    assert shown["Config"]["OpenStdin"] is True and shown["State"]["Running"] is True
    assert cli("rm", "-f", "reader").returncode == 0
    _nothing_left(cli, agent_config)


def test_detached_container_commands(cli: Cli, agent_config: AgentConfig) -> None:
    assert cli("bootstrap").returncode == 0
    started = cli("run", "-d", "--name", "web", "--network", "none", "busybox", "sh", "-c",
                  "echo one; sleep 0.3; echo two; sleep 300")  # fmt: skip
    assert started.returncode == 0, started.stderr
    container_id = started.stdout.strip()
    assert len(container_id) == 64
    until(lambda: cli("logs", "web").stdout == "one\ntwo\n")
    ps = cli("ps").stdout.splitlines()
    assert ps[0].split()[:2] == ["CONTAINER", "ID"]
    assert container_id[:12] in ps[1] and ps[1].endswith("web") and "Up " in ps[1]
    assert cli("run", "-d", "--name", "web", "busybox", "true").returncode == 125
    assert cli("logs", "--tail", "1", "web").stdout == "two\n"
    stamped = cli("logs", "-t", "web").stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in stamped] == ["one", "two"]
    assert cli("logs", "--since", stamped[1].split(" ", 1)[0], "web").stdout == "two\n"
    assert cli("logs", "--since", "2999-01-01T00:00:00Z", "web").stdout == ""
    assert cli("exec", "web", "sh", "-c", "exit 3").returncode == 3
    assert cli("exec", "web", "nosuch").returncode == 127
    [data] = json.loads(cli("inspect", "web").stdout)
    assert data["Id"] == container_id
    assert data["Name"] == "/web"
    assert data["State"]["Status"] == "running" and data["State"]["Pid"] > 0
    assert data["Config"]["Cmd"][:2] == ["sh", "-c"]
    stats = cli("stats", "--no-stream", "web")
    assert stats.returncode == 0 and "web" in stats.stdout
    other = cli("ps", "-a", "--tenant", "other")
    assert other.stdout.splitlines()[1:] == []
    assert cli("inspect", "--tenant", "other", "web").returncode == 125
    assert cli("rm", "web").returncode == 125  # running: needs -f
    assert cli("pause", "web").returncode == 0
    assert "(Paused)" in cli("ps").stdout
    assert cli("unpause", "web").returncode == 0
    assert cli("stop", "-t", "1", "web").returncode == 0
    assert "Exited (137)" in cli("ps", "-a").stdout
    assert cli("wait", "web").stdout == "137\n"
    assert cli("rm", "web").returncode == 0
    assert cli("inspect", "web").returncode == 125
    _nothing_left(cli, agent_config)


def test_run_flags_become_the_container_spec() -> None:
    from runtime_agent.cli.containers import spec_from_args
    from runtime_agent.cli.main import build_parser

    argv = [
        "run", "--tenant", "acme", "--name", "db", "-e", "A=1", "-w", "/srv", "-u", "app",
        "--entrypoint", "", "-m", "1.5g", "--cpus", "0.25", "-c", "512", "--pids-limit", "99",
        "--device-read-bps", "/dev/sda:1mb", "--device-write-bps", "512k",
        "--device-write-iops", "/dev/sda:300", "--read-only", "--restart", "on-failure:4",
        "--tmpfs", "/run:size=8m", "--network", "none", "--stop-signal", "SIGINT",
        "busybox", "ls", "-l",
    ]  # fmt: skip
    args = build_parser(argv).parse_args(argv)
    spec = spec_from_args(args)
    assert (spec.tenant, spec.name, spec.image) == ("acme", "db", "busybox")
    assert spec.command == ("ls", "-l") and spec.entrypoint == ()
    assert (spec.env, spec.workdir, spec.user) == ({"A": "1"}, "/srv", "app")
    limits = spec.limits
    assert limits.memory_bytes == 1536 * 1024 * 1024
    assert (limits.cpus, limits.cpu_shares, limits.pids) == (0.25, 512, 99)
    assert (limits.device_read_bps, limits.device_write_bps) == (1 << 20, 512 << 10)
    assert limits.device_write_iops == 300
    assert spec.read_only_rootfs and spec.network_mode == "none"
    assert (spec.restart.name, spec.restart.max_retries) == ("on-failure", 4)
    assert spec.mounts[0].kind == "tmpfs" and spec.mounts[0].target == "/run"
    assert spec.stop_signal == "SIGINT"
    publish = ["run", "-p", "127.0.0.1:8080:80", "--network", "web", "--network-alias", "api",
               "busybox"]  # fmt: skip
    spec = spec_from_args(build_parser(publish).parse_args(publish))
    assert spec.network_mode == "bridge"
    assert [(n.network, n.aliases) for n in spec.networks] == [("web", ("api",))]
    assert [(p.host_ip, p.host_port, p.container_port) for p in spec.ports] == [
        ("127.0.0.1", 8080, 80)
    ]
