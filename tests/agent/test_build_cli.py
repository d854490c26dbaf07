"""`berth-agent build` as a user runs it: streamed steps, final digest, exit codes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.config import AgentConfig
from tests.agent.dockerfiles.support import (
    build_cgroups_removed,  # noqa: F401 - fixture
    write_context,
)


def _cli(config: AgentConfig, *args: str, stdin: bytes | None = None, fast: bool = False):
    env = {
        **os.environ,
        "BERTH_ROOT": str(config.root),
        "BERTH_RUN_ROOT": str(config.run_root),
        "BERTH_AGENT_NAME": config.name,
    }
    if fast:
        cmd = [sys.executable, "-m", "runtime_agent.cli.build", *args]
    else:
        cmd = [sys.executable, "-m", "runtime_agent.cli.main", "build", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, env=env, check=False)


def test_build_streams_steps_and_digest(agent_config: AgentConfig, tmp_path: Path) -> None:
    ctx = write_context(
        tmp_path / "c", {"Dockerfile": "FROM scratch\nCOPY f /f\nENV A=1\n", "f": "x"}
    )
    first = _cli(agent_config, "--tenant", "t1", "-t", "app:1", str(ctx))
    assert first.returncode == 0, first.stderr
    out = first.stdout.decode()
    assert "Step 1/3 : FROM scratch" in out and "Step 3/3 : ENV A=1" in out
    digest = Agent(agent_config).images.resolve("t1", "app:1").config_digest
    assert out.endswith(f"Successfully built {digest}\nSuccessfully tagged app:1\n")
    again = _cli(agent_config, "--tenant", "t1", "-t", "app:1", str(ctx), fast=True)
    assert again.stdout.decode().count("Using cache") == 2
    quiet = _cli(agent_config, "--tenant", "t1", "-q", str(ctx))
    assert quiet.stdout.decode() == f"{digest}\n"


def test_build_context_tar_on_stdin_and_dockerfile_options(
    agent_config: AgentConfig, tmp_path: Path
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in {"build/Dfile": b"FROM scratch\nCOPY f /f\n", "f": b"y"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = _cli(agent_config, "-f", "build/Dfile", "-t", "t:1", "-", stdin=buf.getvalue())
    assert result.returncode == 0, result.stderr
    ctx = write_context(tmp_path / "c", {"f": "z"})
    piped = _cli(agent_config, "-f", "-", "-t", "t:2", str(ctx), stdin=b"FROM t:1\nCOPY f /g\n")
    assert piped.returncode == 0, piped.stderr
    images = Agent(agent_config).images
    assert len(images.resolve("default", "t:2").layers) == 2


@pytest.mark.parametrize(
    ("dockerfile", "message"),
    [
        ("FROM scratch\nCOPY nope /x\n", "Dockerfile:2"),
        ("FROM scratch\nBOGUS x\n", "unknown instruction: BOGUS"),
        ("", "Cannot locate specified Dockerfile"),
    ],
)
def test_build_errors_exit_125_with_a_clear_message(
    agent_config: AgentConfig, tmp_path: Path, dockerfile: str, message: str
) -> None:
    files = {"Dockerfile": dockerfile} if dockerfile else {"other": "x"}
    ctx = write_context(tmp_path / "c", files)
    result = _cli(agent_config, "-t", "bad:1", str(ctx))
    assert result.returncode == 125
    assert message in result.stderr.decode()


@pytest.mark.privileged
@pytest.mark.usefixtures("build_cgroups_removed")
def test_failing_run_exits_1_with_the_step_output(
    agent_config: AgentConfig, tmp_path: Path
) -> None:
    from tests.agent.dockerfiles.support import make_base

    make_base(Agent(agent_config), "default", tmp_path)
    ctx = write_context(
        tmp_path / "c", {"Dockerfile": "FROM busybox\nRUN echo failing-now; exit 4\n"}
    )
    result = _cli(agent_config, "--network", "none", "-t", "x:1", str(ctx))
    assert result.returncode == 1
    assert "failing-now" in result.stdout.decode()
    assert "returned a non-zero code: 4" in result.stderr.decode()
