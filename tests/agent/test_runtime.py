"""Containers through runc and conmon: lifecycle, logs, exec, names, clean-up, restarts,
and state that survives the agent process."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.errors import (
    AlreadyExists,
    CommandNotFound,
    CommandNotRunnable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from runtime_agent.protocol import Limits, RestartPolicy, to_dict
from tests.agent.test_runtime_fixtures import leftovers, needs_runtime, rt, spec, until

pytestmark = needs_runtime
__all__ = ["rt"]


def test_run_captures_exit_code_and_both_streams_with_timestamps(rt: Agent) -> None:
    c = rt.containers
    info = c.run(spec("echo out; echo err >&2; echo done; exit 3"))
    assert c.wait("default", info.id, timeout=20) == 3
    entries = list(c.logs("default", info.id))
    assert [(e.stream, e.line) for e in entries if e.stream == "stdout"] == [
        ("stdout", b"out"),
        ("stdout", b"done"),
    ]
    assert [(e.stream, e.line) for e in entries if e.stream == "stderr"] == [("stderr", b"err")]
    assert all(e.time.startswith("20") and "T" in e.time for e in entries)
    assert [e.line for e in c.logs("default", info.id, tail=1)] == [entries[-1].line]
    state = c.inspect("default", info.id)["State"]
    assert state["Status"] == "exited"
    assert state["ExitCode"] == 3
    assert state["OOMKilled"] is False
    assert state["StartedAt"] <= state["FinishedAt"]


def test_image_defaults_and_overrides_reach_the_process(rt: Agent) -> None:
    c = rt.containers
    info = c.run(
        spec(
            "echo $PATH; echo $GREETING; pwd; id -u; id -g; hostname",
            env={"GREETING": "hi there"},
            workdir="/tmp",
            user="nobody",
            hostname="box1",
        )
    )
    assert c.wait("default", info.id, timeout=20) == 0
    lines = [e.line.decode() for e in c.logs("default", info.id)]
    assert lines[0].startswith("/usr/local/sbin")  # the image's Env
    assert lines[1:] == ["hi there", "/tmp", "65534", "65534", "box1"]


def test_unknown_user_and_missing_command_fail_without_leftovers(rt: Agent) -> None:
    c = rt.containers
    with pytest.raises(InvalidArgument, match="unable to find user"):
        c.create(spec("true", user="nosuchuser"))
    with pytest.raises(CommandNotFound):
        c.create(spec(["/no/such/binary"]))
    with pytest.raises(CommandNotFound):
        c.create(spec(["nosuchcommand"]))
    with pytest.raises(CommandNotRunnable):
        c.create(spec(["/etc/passwd"]))
    with pytest.raises(InvalidArgument, match="--cpus"):
        c.create(spec("true", limits=Limits(cpus=-1)))
    with pytest.raises(NotFound):
        c.create(spec("true", image="nosuchimage"))
    assert c.list("default", all=True) == []
    assert not list((rt.config.snapshots_dir / "active").glob("*"))
    assert not (rt.config.containers_dir / "default").exists() or not [
        p for p in (rt.config.containers_dir / "default").iterdir() if not p.name.startswith(".")
    ]


def test_a_create_failing_while_its_network_attaches_leaves_no_endpoint(rt: Agent) -> None:
    """The network is attached in a thread while the rootfs is prepared: when the rootfs
    side fails, the attach is waited for and undone with the rest."""
    c = rt.containers
    bridge = {"network_mode": "bridge"}
    with pytest.raises(CommandNotFound):
        c.create(spec(["nosuchcommand"], **bridge))
    with pytest.raises(InvalidArgument, match="unable to find user"):
        c.create(spec("true", user="nosuchuser", **bridge))
    assert c.list("default", all=True) == []
    assert rt.networks.endpoints("default") == []
    assert rt.networks.inspect("default", "default").containers == ()
    assert not list((rt.config.snapshots_dir / "active").glob("*"))
    # and the network is in order for the next container
    info = c.run(spec("ip -4 -o addr show eth0", **bridge))
    assert c.wait("default", info.id, timeout=20) == 0
    (line,) = [e.line.decode() for e in c.logs("default", info.id)]
    assert "inet 10." in line
    c.remove("default", info.id)
    assert leftovers(rt, "default", info.id) == []
    assert rt.networks.endpoints("default") == []


def _conmons_of(runc_id: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"/usr/bin/conmon") or b"conmon\0" in cmdline[:64]:
                if runc_id.encode() in cmdline:
                    found.append(int(proc.name))
    return found


def test_run_starts_conmon_early_and_a_failed_create_stops_it(rt: Agent) -> None:
    """run() launches conmon before the bundle is finished (it waits at a gate): a
    create that fails then ends it without runc having run, and leaves nothing; a
    started container holds none of the gate's descriptors."""
    c = rt.containers
    seen: list[str] = []
    original = c._build_bundle

    def watching(record: object, *args: object) -> None:
        runc_id = record.runc_id  # type: ignore[attr-defined]
        seen.append(runc_id)
        until(lambda: _conmons_of(runc_id), timeout=10)  # conmon is up before the bundle
        original(record, *args)  # type: ignore[arg-type]

    c._build_bundle = watching  # type: ignore[method-assign,assignment]
    try:
        with pytest.raises(CommandNotFound):
            c.run(spec(["nosuchcommand"]))
        (failed,) = seen
        assert _conmons_of(failed) == []
        assert c.list("default", all=True) == []
        assert not (rt.config.runc_root / failed).exists()
        info = c.run(spec("ls /proc/1/fd; echo ran"))
    finally:
        del c._build_bundle
    assert c.wait("default", info.id, timeout=20) == 0
    assert [e.line for e in c.logs("default", info.id)] == [b"0", b"1", b"2", b"ran"]
    c.remove("default", info.id)
    assert leftovers(rt, "default", info.id) == []


def test_recover_leaves_a_create_in_progress_and_removes_a_crashed_one(rt: Agent) -> None:
    """recover() (another process's worker start) removes half-created containers only
    when the process that was creating them is gone."""
    c = rt.containers
    record, _image = c._new_record(spec("true", name="in-progress"))  # this process creates
    c.recover()
    assert c.inspect("default", "in-progress")["Name"] == "/in-progress"
    boot, _pid, _start = record.creator.split()
    record.creator = f"{boot} {2**22 - 1} 1"  # no such process (pid_max is at most 2**22)
    c.store.save(record)
    c.recover()
    assert c.list("default", all=True) == []
    assert leftovers(rt, "default", record.id) == []


def test_lifecycle_state_machine(rt: Agent) -> None:
    c = rt.containers
    info = c.create(spec("sleep 300", name="life"))
    assert c.inspect("default", "life")["State"]["Status"] == "created"
    with pytest.raises(FailedPrecondition):
        c.pause("default", "life")
    c.start("default", "life")
    assert c.inspect("default", info.id[:8])["State"]["Running"] is True
    with pytest.raises(FailedPrecondition):
        c.start("default", "life")
    c.pause("default", "life")
    assert c.inspect("default", "life")["State"]["Status"] == "paused"
    with pytest.raises(FailedPrecondition):
        c.pause("default", "life")
    with pytest.raises(FailedPrecondition, match="force"):
        c.remove("default", "life")
    c.unpause("default", "life")
    assert c.exec_capture("default", "life", ["sh", "-c", "echo alive; exit 4"]) == (4, b"alive\n")
    started = time.monotonic()
    c.stop("default", "life", timeout=1)  # sleep as pid 1 ignores SIGTERM: SIGKILL after 1 s
    assert 0.9 < time.monotonic() - started < 8
    state = c.inspect("default", "life")["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 137)
    with pytest.raises(FailedPrecondition):
        c.exec_capture("default", "life", ["true"])
    c.start("default", "life")  # a stopped container starts again
    assert c.inspect("default", "life")["State"]["Running"] is True
    c.kill("default", "life", "TERM")  # sh -c as pid 1 with a trap-less TERM: ignored
    c.kill("default", "life")
    assert c.inspect("default", "life")["State"]["ExitCode"] == 137
    c.remove("default", "life")
    with pytest.raises(NotFound):
        c.inspect("default", "life")


def test_stop_signal_lets_the_process_exit_cleanly(rt: Agent) -> None:
    c = rt.containers
    c.run(spec("trap 'echo bye; exit 0' TERM; while true; do sleep 0.1; done", name="polite"))
    until(lambda: c.exec_capture("default", "polite", ["true"])[0] == 0)
    started = time.monotonic()
    c.stop("default", "polite", timeout=10)
    assert time.monotonic() - started < 5
    assert c.inspect("default", "polite")["State"]["ExitCode"] == 0
    assert [e.line for e in c.logs("default", "polite")] == [b"bye"]


def test_exec_exit_codes_and_missing_commands(rt: Agent) -> None:
    c = rt.containers
    c.run(spec("sleep 300", name="ex"))
    assert c.exec("default", "ex", ["sh", "-c", "exit 9"]) == 9
    with pytest.raises(CommandNotFound):
        c.exec("default", "ex", ["nosuchthing"])
    code, output = c.exec_capture("default", "ex", ["sh", "-c", "id -u; echo $FOO"])
    assert (code, output) == (0, b"0\n\n")
    assert c.exec("default", "ex", ["sh", "-c", '[ "$FOO" = bar ]'], env={"FOO": "bar"}) == 0
    assert c.exec("default", "ex", ["sh", "-c", '[ "$(id -u)" = 65534 ]'], user="nobody") == 0


def test_names_are_unique_per_tenant_and_invisible_to_others(rt: Agent) -> None:
    c = rt.containers
    a = c.create(spec("true", name="web", tenant="alpha"))
    with pytest.raises(AlreadyExists):
        c.create(spec("true", name="web", tenant="alpha"))
    b = c.create(spec("true", name="web", tenant="beta"))
    assert a.id != b.id
    assert c.inspect("beta", "web")["Id"] == b.id
    for ref in (a.id, a.id[:12]):
        with pytest.raises(NotFound):
            c.inspect("beta", ref)
    assert [i.id for i in c.list("beta", all=True)] == [b.id]
    with pytest.raises(InvalidArgument):
        c.list("../alpha")
    with pytest.raises(InvalidArgument):
        c.create(spec("true", name="bad/name"))


def test_rm_leaves_nothing_behind(rt: Agent) -> None:
    c = rt.containers
    info = c.run(spec("sleep 300", limits=Limits(memory_bytes=64 << 20, pids=50)))
    assert c.stats("default", info.id).pids >= 1
    assert leftovers(rt, "default", info.id)  # sanity: the probe sees a live container
    c.remove("default", info.id, force=True)
    assert leftovers(rt, "default", info.id) == []
    with pytest.raises(NotFound):
        c.remove("default", info.id, force=True)


def test_failed_start_leaves_nothing_after_rm(rt: Agent) -> None:
    c = rt.containers
    # A working directory that is a file: runc create fails after the bundle was made.
    info = c.create(spec(["true"], workdir="/etc/passwd"))
    with pytest.raises(Exception):  # noqa: B017 - runc's own error, mapped to an AgentError
        c.start("default", info.id)
    assert c.inspect("default", info.id)["State"]["Status"] == "created"
    c.remove("default", info.id)
    assert leftovers(rt, "default", info.id) == []


def test_run_whose_start_fails_leaves_a_created_container(rt: Agent) -> None:
    """As `docker run` does: the container is made, its start fails, `ps -a` shows it
    created (run records that state only when the start fails)."""
    c = rt.containers
    with pytest.raises(Exception):  # noqa: B017 - runc's own error, mapped to an AgentError
        c.run(spec(["true"], name="no-start", workdir="/etc/passwd"))
    (info,) = c.list("default", all=True)
    assert (info.name, info.state) == ("no-start", "created")
    c.remove("default", "no-start")
    assert leftovers(rt, "default", info.id) == []


def test_logs_follow_streams_until_exit(rt: Agent) -> None:
    c = rt.containers
    info = c.run(spec("for i in 1 2 3; do echo line$i; sleep 0.3; done"))
    lines = [e.line for e in c.logs("default", info.id, follow=True)]
    assert lines == [b"line1", b"line2", b"line3"]


def test_logs_follow_waits_without_spinning_and_ends_with_the_container(rt: Agent) -> None:
    """The follower backs off while the container is silent and wakes as soon as the
    container's monitor exits (no poll interval to sit out)."""
    c = rt.containers
    info = c.run(spec("echo start; sleep 1; echo end"))
    started, cpu = time.monotonic(), time.process_time()
    lines = [e.line for e in c.logs("default", info.id, follow=True)]
    assert lines == [b"start", b"end"]
    assert time.process_time() - cpu < 0.3  # a second of waiting, not of spinning
    assert time.monotonic() - started < 5
    assert c.inspect("default", info.id)["State"]["Status"] == "exited"


def test_attach_stdin_needs_a_container_made_with_stdin_open(rt: Agent) -> None:
    c = rt.containers
    closed = c.run(spec("sleep 30"))
    with pytest.raises(FailedPrecondition, match="stdin open"):
        c.attach_stdin("default", closed.id, io.BytesIO(b"x"))
    opened = c.run(spec("wc -c", stdin_open=True))
    assert c.attach_stdin("default", opened.id, io.BytesIO(b"12345" * 10_000)) == 50_000
    assert c.wait("default", opened.id, timeout=10) == 0
    assert [e.line.strip() for e in c.logs("default", opened.id)] == [b"50000"]
    c.remove("default", closed.id, force=True)
    c.remove("default", opened.id)


def test_state_survives_the_agent_process_being_killed(rt: Agent) -> None:
    """An agent process starts a container and is SIGKILLed; the container keeps running
    and a fresh Agent reports its true state and, later, its exit code."""
    script = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from runtime_agent.agent import Agent\n"
        "from runtime_agent.config import AgentConfig\n"
        "from runtime_agent.protocol import ContainerSpec, from_dict\n"
        "cfg = json.loads(sys.argv[1])\n"
        "agent = Agent(AgentConfig(root=Path(cfg['root']), run_root=Path(cfg['run_root']),"
        " name=cfg['name']))\n"
        "info = agent.containers.run(from_dict(ContainerSpec, json.loads(sys.argv[2])))\n"
        "print(info.id, flush=True)\n"
        "time.sleep(600)\n"
    )
    cfg = {"root": str(rt.config.root), "run_root": str(rt.config.run_root), "name": rt.config.name}
    request = to_dict(
        spec("touch /tmp/go-wait; while [ ! -e /tmp/go ]; do sleep 0.05; done; exit 7")
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(cfg), json.dumps(request)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        container_id = proc.stdout.readline().strip()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    fresh = Agent(rt.config)
    assert fresh.containers.inspect("default", container_id)["State"]["Status"] == "running"
    assert fresh.containers.exec("default", container_id, ["touch", "/tmp/go"]) == 0
    assert fresh.containers.wait("default", container_id, timeout=20) == 7
    again = Agent(rt.config)
    again.containers.recover()
    state = again.containers.inspect("default", container_id)["State"]
    assert (state["Status"], state["ExitCode"], state["OOMKilled"]) == ("exited", 7, False)


def test_recover_removes_auto_remove_containers_whose_waiter_died(rt: Agent) -> None:
    c = rt.containers
    info = c.run(spec("exit 0", auto_remove=True), watch_exit=False)
    until(lambda: c.inspect("default", info.id)["State"]["Status"] == "exited")
    Agent(rt.config).containers.recover()
    with pytest.raises(NotFound):
        c.inspect("default", info.id)
    assert leftovers(rt, "default", info.id) == []


def test_detached_auto_remove_cleans_up_through_the_exit_hook(rt: Agent) -> None:
    c = rt.containers
    info = c.run(spec("exit 0", auto_remove=True))
    until(lambda: not c.list("default", all=True), timeout=30)
    assert leftovers(rt, "default", info.id) == []


def test_on_failure_restarts_up_to_the_limit_with_backoff(rt: Agent) -> None:
    c = rt.containers
    info = c.run(spec("exit 3", restart=RestartPolicy("on-failure", 2)))

    def settled() -> bool:
        data = c.inspect("default", info.id)
        return data["RestartCount"] == 2 and data["State"]["Status"] == "exited"

    until(settled, timeout=60, interval=0.2)
    time.sleep(1.5)  # no third attempt
    data = c.inspect("default", info.id)
    assert (data["RestartCount"], data["State"]["ExitCode"]) == (2, 3)


def test_always_restarts_until_stopped(rt: Agent) -> None:
    c = rt.containers
    info = c.run(spec("sleep 0.2; exit 0", restart=RestartPolicy("always")))
    until(lambda: c.inspect("default", info.id)["RestartCount"] >= 2, timeout=60, interval=0.2)
    c.stop("default", info.id, timeout=1)
    count = c.inspect("default", info.id)["RestartCount"]
    time.sleep(2)
    data = c.inspect("default", info.id)
    assert data["State"]["Status"] == "exited"
    assert data["RestartCount"] == count


def test_user_namespace_makes_container_root_an_unprivileged_host_user(rt: Agent) -> None:
    c = rt.containers
    info = c.run(spec("id -u; touch /rootfs-write && echo wrote; sleep 300", user_namespace=True))
    until(lambda: len(list(c.logs("default", info.id))) >= 2)
    assert [e.line for e in c.logs("default", info.id)] == [b"0", b"wrote"]
    pid = c.inspect("default", info.id)["State"]["Pid"]
    with open(f"/proc/{pid}/status") as fh:
        uid_line = next(line for line in fh if line.startswith("Uid:"))
    host_uid = int(uid_line.split()[1])
    assert host_uid >= 100000  # not host root
    assert c.exec_capture("default", info.id, ["id", "-u"]) == (0, b"0\n")
    c.remove("default", info.id, force=True)
    assert leftovers(rt, "default", info.id) == []


def test_rm_containers_rootfs_is_volatile_also_with_a_user_namespace(rt: Agent) -> None:
    """--rm rootfs skip overlayfs' syncs; a user-namespaced one is re-mounted idmapped
    (the volatile plain mount's marker removed first) and volatile too. Without --rm the
    user-namespaced rootfs is a normal (synced) overlay, though prepared volatile."""
    c = rt.containers

    def mount_options(container_id: str) -> str:
        merged = str(rt.snapshots.active_dir / container_id / "merged")
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
        return next(line for line in lines if line.split()[4] == merged).split(" - ")[1]

    for userns, rm in ((False, True), (True, True), (True, False)):
        info = c.run(
            spec("touch /w && echo ok", auto_remove=rm, user_namespace=userns), watch_exit=False
        )
        assert c.wait("default", info.id) == 0
        assert [e.line for e in c.logs("default", info.id)] == [b"ok"]
        meta = (rt.snapshots.active_dir / info.id / "meta.json").read_text()
        assert json.loads(meta)["volatile"] is True
        options = mount_options(info.id).split(",")
        assert ("volatile" in options or "fsync=volatile" in options) is rm
        c.remove("default", info.id)
        assert leftovers(rt, "default", info.id) == []


def test_logs_are_size_capped_and_follow_survives_rotation(
    rt: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime_agent.runtime import monitor

    monkeypatch.setattr(monitor, "LOG_SIZE_MAX", 64 * 1024)
    c = rt.containers
    script = "i=0; while [ $i -lt 20000 ]; do echo line$i; i=$((i+1)); done"
    info = c.run(spec(script))
    followed = [int(e.line[4:]) for e in c.logs("default", info.id, follow=True)]
    assert c.wait("default", info.id, timeout=30) == 0
    log_file = rt.config.containers_dir / "default" / info.id / "ctr.log"
    assert log_file.stat().st_size <= 64 * 1024 + 100
    kept = [e.line for e in c.logs("default", info.id)]
    assert kept[-1] == b"line19999"
    assert 100 < len(kept) < 20000
    assert followed[-1] == 19999
    assert followed == sorted(followed)  # rotation never replays or reorders lines


def test_follow_joins_a_line_whose_parts_arrive_in_different_reads(tmp_path: Path) -> None:
    """conmon writes a long line as partial entries; a follower may read the file
    between them. It used to yield the continuation alone (b"123" for b"line123")."""
    from runtime_agent.runtime.logs import follow_logs, read_logs

    log = tmp_path / "ctr.log"
    log.write_bytes(b"T1 stdout F first\nT2 stdout P line\n")
    writes = [b"T3 stdout P 12\n", b"T4 stdout F 3\nT5 stdout P tail-without-newline\n"]

    def pause(_seconds: float) -> None:  # the container writes between two reads
        if writes:
            with open(log, "ab") as fh:
                fh.write(writes.pop(0))

    entries = list(follow_logs(log, done=lambda: not writes, pause=pause))
    assert [(e.line, e.partial) for e in entries] == [
        (b"first", False),
        (b"line123", False),
        (b"tail-without-newline", True),
    ]
    assert entries[1].time == "T2"  # a joined line keeps its first part's time
    assert [(e.line, e.partial) for e in read_logs(log)] == [(e.line, e.partial) for e in entries]


def test_follow_survives_two_rotations_between_reads(tmp_path: Path) -> None:
    """A busy container can make conmon rotate twice while a follower waits. On ext4 the
    second new file tends to get the first file's inode number back; a follower that
    found the file by name again took it for the one it had half read and went on from
    its old offset, mid-entry (b'ut F line11000' for a line). Here every line it yields
    is whole: the first file to its end, then the newest one from its start."""
    from runtime_agent.runtime.logs import follow_logs

    log = tmp_path / "ctr.log"

    def entries(first: int, count: int) -> bytes:
        return b"".join(b"T stdout F line%d\n" % n for n in range(first, first + count))

    def rotate(content: bytes) -> None:  # as conmon does: a new file renamed over the old
        tmp = tmp_path / "ctr.log.tmp"
        tmp.write_bytes(content)
        os.rename(tmp, log)

    log.write_bytes(entries(0, 100))
    steps = [
        lambda: rotate(entries(100, 10)),
        lambda: rotate(entries(110, 300)),  # longer than the first file was
    ]
    inodes = [log.stat().st_ino]

    def pause(_seconds: float) -> None:
        if len(steps) == 2:  # both rotations in one pause
            while steps:
                steps.pop(0)()
                inodes.append(log.stat().st_ino)

    lines = [e.line for e in follow_logs(log, done=lambda: not steps, pause=pause)]
    assert lines[:100] == [b"line%d" % n for n in range(100)]
    assert lines[100:] == [b"line%d" % n for n in range(110, 410)]
    assert len(set(inodes)) == 3  # the follower held the first file: no number reused


def test_recover_after_the_monitor_and_container_vanished(rt: Agent) -> None:
    """What a node reboot leaves: no monitor, no process, no exit file. A fresh agent
    reports the container exited (255) and recover() restarts an always-policy one."""
    c = rt.containers
    info = c.run(spec("sleep 300", restart=RestartPolicy("always")))
    plain = c.run(spec("sleep 300"))
    for container in (info, plain):
        monitor_dir = rt.config.containers_dir / "default" / container.id / "monitor"
        conmon_pid = int((monitor_dir / "conmon.pid").read_text())
        os.kill(conmon_pid, signal.SIGKILL)
        os.kill(c.inspect("default", container.id)["State"]["Pid"], signal.SIGKILL)
    fresh = Agent(rt.config)
    until(lambda: fresh.containers.inspect("default", plain.id)["State"]["Status"] == "exited")
    assert fresh.containers.inspect("default", plain.id)["State"]["ExitCode"] == 255
    fresh.containers.recover()
    assert fresh.containers.inspect("default", info.id)["State"]["Status"] == "running"
    assert fresh.containers.inspect("default", info.id)["RestartCount"] == 1
    assert fresh.containers.inspect("default", plain.id)["State"]["Status"] == "exited"
    assert fresh.containers.exec_capture("default", info.id, ["true"])[0] == 0


def test_stopped_container_restarts_after_its_rootfs_was_unmounted(rt: Agent) -> None:
    """After a reboot the snapshot isn't mounted; start mounts it again from its records."""
    from runtime_agent.snapshots.mount import unmount

    c = rt.containers
    info = c.run(spec("echo run >> /runs; cat /runs"))
    assert c.wait("default", info.id, timeout=20) == 0
    unmount(rt.config.snapshots_dir / "active" / info.id / "merged")
    c.start("default", info.id)
    assert c.wait("default", info.id, timeout=20) == 0
    assert [e.line for e in c.logs("default", info.id)][-2:] == [b"run", b"run"]
