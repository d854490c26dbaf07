"""rmi and system prune against real containers: what containers use is never removed."""

from __future__ import annotations

import io
import os
import tarfile
import time

import pytest

from runtime_agent.agent import Agent
from runtime_agent.cli.main import main
from runtime_agent.snapshots.mount import is_mounted
from tests.agent.test_runtime_fixtures import needs_runtime, rt, spec

pytestmark = needs_runtime
__all__ = ["rt"]


def _image(agent: Agent, ref: str) -> str:
    base = agent.images.resolve("default", "busybox")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(f"{ref}.txt")
        info.size = 64 * 1024
        tar.addfile(info, io.BytesIO(os.urandom(64 * 1024)))
    digest = agent.content.write_bytes(buf.getvalue())
    layer = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar",
        "digest": digest,
        "size": len(buf.getvalue()),
    }
    agent.images.commit("default", ref, {"config": base.container_config}, [*base.layers, layer])
    return digest


def _age_blobs(agent: Agent) -> None:
    old = time.time() - 7200
    for digest in agent.content.digests():
        os.utime(agent.content.path(digest), (old, old))


@pytest.fixture
def cli(rt: Agent, monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.setenv("BERTH_ROOT", str(rt.config.root))
    monkeypatch.setenv("BERTH_RUN_ROOT", str(rt.config.run_root))
    monkeypatch.setenv("BERTH_AGENT_NAME", rt.config.name)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_prune_spares_what_containers_use(rt: Agent, cli) -> None:
    keep_layer = _image(rt, "keep")
    old_layer = _image(rt, "old")
    unused_layer = _image(rt, "unused")
    running = rt.containers.run(spec("sleep 300", image="keep"))
    stopped = rt.containers.run(spec("true", image="old"))
    assert rt.containers.wait("default", stopped.id, timeout=20) == 0

    code, _, err = cli("rmi", "keep")
    assert code == 1 and "being used by a container" in err

    _age_blobs(rt)
    code, out, err = cli("system", "prune", "-a", "-f")
    assert code == 0, err
    assert stopped.id in out
    assert "untagged: old:latest" in out and "untagged: unused:latest" in out
    assert "keep" not in out
    assert not rt.content.has(old_layer) and not rt.content.has(unused_layer)
    assert rt.content.has(keep_layer)
    assert rt.images.resolve("default", "keep")
    [info] = rt.containers.list("default")
    assert info.id == running.id and info.state == "running"
    assert is_mounted(rt.snapshots.get(running.snapshot_key).path)

    # Forced untag of a running container's image: its blobs and layers still stay.
    assert cli("rmi", "-f", "keep")[0] == 0
    _age_blobs(rt)
    assert cli("system", "prune", "-f")[0] == 0
    assert rt.content.has(keep_layer)
    assert is_mounted(rt.snapshots.get(running.snapshot_key).path)
    code, output = rt.containers.exec_capture("default", running.id, ["cat", "/keep.txt"])
    assert code == 0 and len(output) == 64 * 1024  # its files are all still there
    rt.containers.remove("default", running.id, force=True)
    _age_blobs(rt)
    assert cli("system", "prune", "-f")[0] == 0
    assert not rt.content.has(keep_layer)
    assert rt.snapshots.list() == []
