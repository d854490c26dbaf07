"""Side by side with Docker (legacy builder): the same Dockerfile gives the same file tree
and config under Berth and under ``docker build``; images move both ways and run.

Marked ``docker`` (skipped when ``docker info`` fails) and ``privileged``. The base image
is a busybox rootfs ``docker import``ed and ``docker save``d into Berth, so both builders
start from identical layers. Only images this module tagged are removed afterwards.
"""

from __future__ import annotations

import io
import json
import secrets
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime_agent.agent import Agent
from runtime_agent.build.steps import BuildLimits
from tests.agent.dockerfiles.support import (
    build_cgroups_removed,  # noqa: F401 - fixture
    busybox_rootfs_tar,
    corpus_cases,
    corpus_context,
    image_tree,
    run_image,
)

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.docker,
    pytest.mark.usefixtures("build_cgroups_removed"),
]

T = "compat"
CONFIG_KEYS = (
    "Env", "Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "Volumes", "Labels",
    "Healthcheck", "StopSignal", "OnBuild", "Shell",
)  # fmt: skip


def _docker(*args: str, stdin: bytes | None = None, check: bool = True) -> bytes:
    proc = subprocess.run(["docker", *args], input=stdin, capture_output=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr.decode()}")
    return proc.stdout


@pytest.fixture(scope="module")
def docker_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        pytest.skip("no Docker engine")
    token = secrets.token_hex(4)
    repo = f"berthtest-{token}"
    tmp = tmp_path_factory.mktemp("docker-base")
    rootfs = busybox_rootfs_tar(tmp / "rootfs.tar")
    base = f"{repo}/busybox:latest"
    _docker("import", "--change", 'CMD ["sh"]', str(rootfs), base)
    saved = tmp / "base.tar"
    saved.write_bytes(_docker("save", base))
    base_id = json.loads(_docker("image", "inspect", base))[0]["Id"]
    try:
        yield {"repo": repo, "base": base, "saved": saved}
    finally:
        _remove_descendants(base_id)
        listed = _docker("images", "--format", "{{.Repository}}:{{.Tag}}", check=False)
        for ref in listed.decode().split():
            if ref.startswith(f"{repo}/"):  # images `docker load`ed from Berth
                _docker("rmi", ref, check=False)


def _remove_descendants(base_id: str) -> None:
    """Remove the base and every image built on it (tagged or not), children first.

    The legacy builder leaves an untagged image per intermediate stage; they are found
    through their Parent chain, so no other user's image is touched.
    """
    ids = _docker("images", "-a", "-q", "--no-trunc", check=False).decode().split()
    parents: dict[str, str] = {}
    for info in json.loads(_docker("image", "inspect", *ids, check=False) or b"[]"):
        parents[info["Id"]] = info.get("Parent") or ""

    def depth(image: str) -> int | None:
        steps = 0
        while image and image != base_id:
            image = parents.get(image, "")
            steps += 1
        return steps if image == base_id else None

    ours = [(d, i) for i in parents if (d := depth(i)) is not None]
    for _, image in sorted(ours, reverse=True):
        tags = json.loads(_docker("image", "inspect", image, check=False) or b"[{}]")
        for tag in (tags[0].get("RepoTags") or []) if tags else []:
            _docker("rmi", tag, check=False)
        _docker("rmi", image, check=False)


def _import(agent: Agent, tenant: str, archive: bytes) -> None:
    agent.images.import_archive(tenant, io.BytesIO(archive))


def _normalise(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config.get(k) for k in CONFIG_KEYS if config.get(k) not in (None, "", [], {})}


def _history_flags(config: dict[str, Any]) -> list[bool]:
    return [bool(h.get("empty_layer")) for h in config.get("history", [])]


@pytest.mark.parametrize("case", corpus_cases())
def test_same_tree_and_config_as_docker(
    agent: Agent, tmp_path: Path, docker_base: dict[str, Any], case: str
) -> None:
    ctx, expected = corpus_context(case, tmp_path / case)
    if expected.get("docker") is False:
        pytest.skip("needs BuildKit (heredocs); the engine here runs the legacy builder")
    _import(agent, T, docker_base["saved"].read_bytes())
    args = {"BASE": docker_base["base"], **expected.get("build_args", {})}
    tag = f"{docker_base['repo']}/{case}:latest"
    cli_args = [f"--build-arg={k}={v}" for k, v in args.items()]
    _docker("build", "--force-rm", "-q", "-t", tag, *cli_args, str(ctx))
    _import(agent, "dockerref", _docker("save", tag))
    list(agent.builder.build(T, ctx, tag=tag, build_args=args, limits=BuildLimits(network=None)))

    ours = image_tree(agent, T, tag)
    theirs = image_tree(agent, "dockerref", tag)
    assert ours == theirs
    our_config = agent.images.resolve(T, tag).config
    their_config = agent.images.resolve("dockerref", tag).config
    assert _normalise(our_config["config"]) == _normalise(their_config["config"])
    assert _history_flags(our_config) == _history_flags(their_config)


def test_berth_image_runs_under_docker(
    agent: Agent, tmp_path: Path, docker_base: dict[str, Any]
) -> None:
    ctx, _ = corpus_context("multistage", tmp_path / "ms")
    _import(agent, T, docker_base["saved"].read_bytes())
    tag = f"{docker_base['repo']}/from-berth:1"
    list(
        agent.builder.build(
            T, ctx, tag=tag, build_args={"BASE": docker_base["base"]},
            limits=BuildLimits(network=None),
        )
    )  # fmt: skip
    out = io.BytesIO()
    agent.images.save(T, [tag], out, "docker")
    _docker("load", stdin=out.getvalue())
    assert _docker("run", "--rm", "--network", "none", tag) == b"hello berth\n"
    inspect = json.loads(_docker("image", "inspect", tag))[0]
    assert inspect["Id"] == agent.images.resolve(T, tag).config_digest


def test_docker_saved_image_runs_under_berth(
    agent: Agent, tmp_path: Path, docker_base: dict[str, Any]
) -> None:
    ctx, _ = corpus_context("multistage", tmp_path / "ms")
    tag = f"{docker_base['repo']}/from-docker:1"
    _docker(
        "build", "--force-rm", "-q", "-t", tag, f"--build-arg=BASE={docker_base['base']}", str(ctx)
    )
    _import(agent, T, _docker("save", tag))
    assert run_image(agent, T, tag) == (0, "hello berth\n")
    # and Berth builds on top of it
    (tmp_path / "child").mkdir()
    (tmp_path / "child" / "Dockerfile").write_text(f"FROM {tag}\nRUN /app/app.sh > /out\n")
    list(agent.builder.build(T, tmp_path / "child", tag="child", limits=BuildLimits(network=None)))
    assert image_tree(agent, T, "child")["/out"][4] == "hello berth\n"


def _tar_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


def test_add_url_matches_docker(agent: Agent, tmp_path: Path, docker_base: dict[str, Any]) -> None:
    import dataclasses
    import http.server
    import threading

    # The server is on loopback, which a tenant's ADD reaches only when the operator allows
    # it (BERTH_FETCH_ALLOW; tests/security/test_fetches.py tries the refusals).
    agent = Agent(dataclasses.replace(agent.config, fetch_allow=("127.0.0.1",)))

    www = tmp_path / "www"
    www.mkdir()
    (www / "remote.txt").write_text("from the web\n")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, directory=str(www), **k)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/remote.txt"
        ctx = tmp_path / "ctx"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(
            "ARG BASE\nFROM $BASE\nARG URL\nADD $URL /dl/\nADD $URL /renamed.txt\n"
        )
        args = {"BASE": docker_base["base"], "URL": url}
        tag = f"{docker_base['repo']}/add-url:latest"
        _import(agent, T, docker_base["saved"].read_bytes())
        cli_args = [f"--build-arg={k}={v}" for k, v in args.items()]
        _docker("build", "--force-rm", "--network", "host", "-q", "-t", tag, *cli_args, str(ctx))
        _import(agent, "dockerref", _docker("save", tag))
        list(
            agent.builder.build(T, ctx, tag=tag, build_args=args, limits=BuildLimits(network=None))
        )
        ours, theirs = image_tree(agent, T, tag), image_tree(agent, "dockerref", tag)
        assert ours == theirs
        assert ours["/dl/remote.txt"] == ("file", 0o600, 0, 0, "from the web\n")
    finally:
        server.shutdown()
        server.server_close()
