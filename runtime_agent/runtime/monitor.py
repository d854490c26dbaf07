"""runc and conmon: the per-container monitor that outlives the agent.

Each started container gets its own conmon (Debian's ``conmon`` package, ~0.5 MB PSS).
conmon daemonises, runs ``runc run --detach`` on the bundle, reports the container pid on a sync
pipe, copies the container's stdout/stderr into a log file (k8s-file format: timestamp,
stream name, partial flag, line; size-capped), and when the container exits writes its
exit status (128+signal for signals, so 137 after an OOM kill) to ``<monitor>/exit`` and
an ``oom`` file when the memory cgroup killed it. None of that depends on the agent
process, so exit codes and OOM flags survive the agent exiting; ``ContainerManager``
reads these files whenever it looks at a container.

runc is always driven with its cgroupfs manager (``--systemd-cgroup=false`` on every runc
call, conmon without ``--systemd-cgroup``) and ``linux.cgroupsPath`` in cgroupfs form.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from runtime_agent.config import AgentConfig
from runtime_agent.errors import AgentError, CommandNotFound, CommandNotRunnable, NotFound

# Bytes of log kept per container before conmon rotates the file (BERTH_LOG_SIZE_MAX).
LOG_SIZE_MAX = int(os.environ.get("BERTH_LOG_SIZE_MAX", 10 * 1024 * 1024))


class RuntimeFailure(AgentError):
    """runc or conmon failed; the message carries runc's own error."""

    code = "runtime_error"


@dataclass(frozen=True)
class MonitorPaths:
    """Files of one container's monitor, all inside the container's state directory."""

    directory: Path  # the container's directory (also the bundle)

    @property
    def monitor(self) -> Path:
        return self.directory / "monitor"

    @property
    def exit_file(self) -> Path:
        return self.monitor / "exit"

    @property
    def oom_file(self) -> Path:
        return self.monitor / "oom"

    @property
    def log(self) -> Path:
        return self.directory / "ctr.log"

    @property
    def runc_log(self) -> Path:
        return self.monitor / "runc.log"

    @property
    def conmon_pid_file(self) -> Path:
        return self.monitor / "conmon.pid"


def _which(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise RuntimeFailure(f"{program} is not installed (apt-get install {program})")
    return path


class Runc:
    """``runc --root <config.runc_root>`` commands for one agent."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.binary = _which(config.runc)
        self.root = str(config.runc_root)
        # cgroupfs, said explicitly: cgroupsPath is in cgroupfs form ("/a/b/c").
        self.global_args = ["--root", self.root, "--systemd-cgroup=false"]

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.binary, *self.global_args, *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if check and result.returncode != 0:
            message = result.stderr.strip() or result.stdout.strip()
            if "does not exist" in message or "not exist" in message:
                raise NotFound(f"runc: {message}")
            raise RuntimeFailure(f"runc {args[0]}: {message}")
        return result

    def start(self, runc_id: str) -> None:
        self._run("start", runc_id)

    def kill(self, runc_id: str, signal: int, *, all_processes: bool = False) -> bool:
        """Send ``signal``; False when there is nothing (left) to signal."""
        args = ["kill", *(["--all"] if all_processes else []), runc_id, str(signal)]
        result = self._run(*args, check=False)
        return result.returncode == 0

    def pause(self, runc_id: str) -> None:
        self._run("pause", runc_id)

    def resume(self, runc_id: str) -> None:
        self._run("resume", runc_id)

    def delete(self, runc_id: str) -> None:
        """Forget the container (force: kills leftovers); idempotent."""
        self._run("delete", "--force", runc_id, check=False)

    def state(self, runc_id: str) -> dict[str, object] | None:
        result = self._run("state", runc_id, check=False)
        if result.returncode != 0:
            return None
        data: dict[str, object] = json.loads(result.stdout)
        return data

    def exec_command(
        self,
        runc_id: str,
        argv: list[str],
        *,
        env: list[str],
        cwd: str,
        uid: int,
        gid: int,
        additional_gids: tuple[int, ...] = (),
    ) -> list[str]:
        """The argv of ``runc exec`` (the caller runs it, streaming or capturing)."""
        command = [self.binary, *self.global_args, "exec", "--cwd", cwd, "--user", f"{uid}:{gid}"]
        for gid_extra in additional_gids:
            command += ["--additional-gids", str(gid_extra)]
        for item in env:
            command += ["--env", item]
        return [*command, runc_id, *argv]


# conmon runs "<runtime> [global args] create --bundle B --pid-file P ID" and leaves the
# start to a second runc process. Starting in the same runc invocation ("run --detach")
# saves one runc process per start; conmon doesn't mind: it only needs the pid file and
# the container's stdio pipes, which it set up before running the runtime.
#
# With BERTH_START_GATE (a descriptor number) set, the wrapper first waits for the word
# "start" on that pipe: the agent starts conmon before the bundle is finished (see
# MonitorStart) and opens the gate once it is. A gate closed without the word (the
# create failed, or the agent died) ends the wrapper before runc runs.
_RUN_DETACHED = """#!/bin/sh
if [ -n "$BERTH_START_GATE" ]; then
  read -r word < "/proc/self/fd/$BERTH_START_GATE" && [ "$word" = start ] || exit 1
fi
for arg; do
  shift
  if [ "$arg" = create ]; then set -- "$@" run --detach; else set -- "$@" "$arg"; fi
done
exec {runc} "$@"
"""


def run_detached_wrapper(config: AgentConfig, runc_binary: str) -> Path:
    """The runtime conmon runs: runc with ``create`` turned into ``run --detach``."""
    path = config.run_root / "runc-run-detached"
    text = _RUN_DETACHED.format(runc=runc_binary)
    try:
        if path.read_text() == text:
            return path
    except FileNotFoundError:
        pass
    config.run_root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


class MonitorStart:
    """conmon for one start of the bundle in ``paths.directory``, launched;
    ``started()`` returns the container's pid once it runs.

    ``gated=True`` launches conmon before the bundle exists: conmon starting up (~5 ms
    of exec and library loading) and its runtime wrapper overlap the rest of the
    create. The wrapper waits at a pipe until ``started()`` opens it; ``cancel()``
    closes it instead, and conmon exits without having run runc.
    """

    def __init__(
        self,
        config: AgentConfig,
        runc: Runc,
        *,
        runc_id: str,
        name: str,
        paths: MonitorPaths,
        exit_command: list[str] | None = None,
        stdin: bool = False,
        gated: bool = False,
    ) -> None:
        self.paths = paths
        conmon = _which(config.conmon)
        monitor = paths.monitor
        if monitor.exists():
            shutil.rmtree(monitor)
        monitor.mkdir(parents=True)
        socket_dir = config.run_root / "conmon"
        socket_dir.mkdir(parents=True, exist_ok=True)
        config.runc_root.mkdir(parents=True, exist_ok=True)
        args = [
            conmon,
            "--api-version", "1",
            "--cid", runc_id,
            "--cuuid", runc_id,
            "--name", name,
            "--runtime", str(run_detached_wrapper(config, runc.binary)),
            "--bundle", str(paths.directory),
            "--container-pidfile", str(monitor / "pid"),
            "--conmon-pidfile", str(paths.conmon_pid_file),
            "--log-path", f"k8s-file:{paths.log}",
            "--log-size-max", str(LOG_SIZE_MAX),
            "--exit-dir", str(monitor / "exits"),
            "--persist-dir", str(monitor),
            "--socket-dir-path", str(socket_dir),
            "--runtime-arg", f"--root={runc.root}",
            "--runtime-arg", "--systemd-cgroup=false",
            "--runtime-arg", f"--log={paths.runc_log}",
            "--runtime-arg", "--log-format=json",
            "--no-sync-log",
        ]  # fmt: skip
        (monitor / "exits").mkdir()
        if stdin:
            args.append("--stdin")  # a pipe for the container's stdin, fed by attach clients
        if exit_command:
            args += ["--exit-command", exit_command[0]]
            for part in exit_command[1:]:
                args += ["--exit-command-arg", part]
        self._sync, write_fd = os.pipe()
        self._gate = -1
        gate_read = -1
        try:
            env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
            env["_OCI_SYNCPIPE"] = str(write_fd)
            passed = [write_fd]
            if gated:
                gate_read, self._gate = os.pipe()
                env["BERTH_START_GATE"] = str(gate_read)
                passed.append(gate_read)
            with open(monitor / "conmon.err", "wb") as err:
                self._process = subprocess.Popen(
                    args,
                    pass_fds=passed,
                    env=env,
                    cwd=monitor,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                )
        except BaseException:
            self._close()
            raise
        finally:
            os.close(write_fd)
            if gate_read >= 0:
                os.close(gate_read)

    def _close(self) -> None:
        for fd in (self._sync, self._gate):
            if fd >= 0:
                os.close(fd)
        self._sync = self._gate = -1

    def started(self) -> int:
        """Open the gate (if any) and wait until the container runs; its pid."""
        chunks = []
        try:
            if self._gate >= 0:
                try:
                    os.write(self._gate, b"start\n")
                except BrokenPipeError:
                    pass  # the wrapper is gone: conmon's report below says why
                os.close(self._gate)
                self._gate = -1
            self._process.wait()
            while True:
                chunk = os.read(self._sync, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\n" in chunk:
                    break
        finally:
            self._close()
        raw = b"".join(chunks).decode(errors="replace").strip()
        try:
            message = json.loads(raw.splitlines()[0]) if raw else {}
        except json.JSONDecodeError:
            message = {}
        pid = int(message.get("data", -1)) if isinstance(message, dict) else -1
        if pid > 0:
            return pid
        paths = self.paths
        error = (
            runc_error(paths)
            or str(message.get("message", ""))
            or _tail(paths.monitor / "conmon.err")
        )
        raise classify_start_error(error or "conmon could not create the container")

    def cancel(self) -> None:
        """Close the gate unopened: conmon exits without running runc (its daemonised
        half soon after this returns; see the manager's ``_await_monitor_exit``)."""
        self._close()
        self._process.wait()


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()[-2000:]
    except FileNotFoundError:
        return ""


def runc_error(paths: MonitorPaths) -> str:
    """The last error runc logged for this container."""
    last = ""
    try:
        lines = paths.runc_log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("level") in ("error", "fatal"):
            last = str(entry.get("msg", ""))
    return last


def classify_start_error(message: str) -> AgentError:
    """docker's mapping of start failures: 127 not found, 126 not runnable, else 125."""
    lowered = message.lower()
    if "no such file or directory" in lowered or "executable file not found" in lowered:
        return CommandNotFound(f"failed to start container: {message}")
    if "permission denied" in lowered or "exec format error" in lowered:
        return CommandNotRunnable(f"failed to start container: {message}")
    return RuntimeFailure(f"failed to start container: {message}")


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int
    oom_killed: bool
    finished_at: float  # epoch seconds (the exit file's mtime)


def read_exit(paths: MonitorPaths) -> ExitStatus | None:
    """What conmon recorded when the container exited; None while it runs."""
    try:
        st = os.stat(paths.exit_file)
        text = paths.exit_file.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        code = int(text)
    except ValueError:
        return None  # conmon is still writing it
    return ExitStatus(code, paths.oom_file.exists(), st.st_mtime)


def process_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[19])


def exit_hook_command(config: AgentConfig, tenant: str, container_id: str) -> list[str]:
    """The command conmon runs when a container exits (restart policies, --rm with -d)."""
    return [
        sys.executable,
        "-m",
        "runtime_agent.runtime.exithook",
        "--root", str(config.root),
        "--run-root", str(config.run_root),
        "--name", config.name,
        "--runc", config.runc,
        "--conmon", config.conmon,
        tenant,
        container_id,
    ]  # fmt: skip
