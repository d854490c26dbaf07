"""Builds without RUN steps: COPY/ADD layers, image config per instruction, the layer
cache and failures. Real content store and image store; no containers needed."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.build.events import BuildEvent
from runtime_agent.errors import InvalidArgument, NotFound, ResourceExhausted
from tests.agent.dockerfiles.support import build, image_tree, make_base, write_context

T = "acme"


def _config(agent: Agent, ref: str, tenant: str = T) -> dict:
    return agent.images.resolve(tenant, ref).config


def _kinds(events: list[BuildEvent]) -> list[str]:
    return [e.kind for e in events]


def test_scratch_copy_builds_expected_tree_and_config(agent: Agent, tmp_path: Path) -> None:
    ctx = write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": (
                "FROM scratch\n"
                "COPY a.txt /etc/a.txt\n"
                "COPY dir /opt/dir/\n"
                "COPY *.md /docs/\n"
                'ENV X=1 Y="two words"\n'
                "WORKDIR /opt/dir\n"
                "COPY a.txt rel\n"
                "LABEL org.example=yes\n"
                "EXPOSE 80 53/udp\n"
                'VOLUME ["/data"]\n'
                "USER 1000:1000\n"
                "STOPSIGNAL SIGTERM\n"
                'HEALTHCHECK --interval=5s --retries=3 CMD ["/check"]\n'
                'ENTRYPOINT ["/bin/app"]\n'
                "CMD run --help\n"
            ),
            "a.txt": "A\n",
            "dir/x": "X",
            "dir/sub/y": "Y",
            "one.md": "1",
            "two.md": "2",
        },
    )
    os.chmod(ctx / "dir" / "x", 0o750)  # noqa: S103
    events = build(agent, T, ctx, tag="app:1")
    assert events[-1].kind == "done" and events[-1].reference == "app:1"
    assert [e.step for e in events if e.kind == "step"] == list(range(1, 16))
    tree = image_tree(agent, T, "app:1")
    assert tree["/etc/a.txt"] == ("file", 0o644, 0, 0, "A\n")
    assert tree["/opt/dir/x"][:4] == ("file", 0o750, 0, 0)
    assert tree["/opt/dir/sub/y"][4] == "Y"
    assert tree["/docs/one.md"][4] == "1" and tree["/docs/two.md"][4] == "2"
    assert tree["/opt/dir/rel"][4] == "A\n"
    cfg = _config(agent, "app:1")["config"]
    assert cfg["Env"] == [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "X=1",
        "Y=two words",
    ]
    assert cfg["WorkingDir"] == "/opt/dir"
    assert cfg["Labels"] == {"org.example": "yes"}
    assert cfg["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}}
    assert cfg["Volumes"] == {"/data": {}}
    assert cfg["User"] == "1000:1000"
    assert cfg["StopSignal"] == "SIGTERM"
    assert cfg["Healthcheck"] == {"Test": ["CMD", "/check"], "Interval": 5 * 10**9, "Retries": 3}
    assert cfg["Entrypoint"] == ["/bin/app"]
    assert cfg["Cmd"] == ["/bin/sh", "-c", "run --help"]
    history = _config(agent, "app:1")["history"]
    assert len(history) == 14
    assert sum(1 for h in history if not h.get("empty_layer")) == len(
        agent.images.resolve(T, "app:1").layers
    )


def test_entrypoint_resets_inherited_cmd(agent: Agent, tmp_path: Path) -> None:
    make_base(agent, T, tmp_path)
    ctx = write_context(tmp_path / "c", {"Dockerfile": 'FROM busybox\nENTRYPOINT ["echo"]\n'})
    build(agent, T, ctx, tag="e")
    cfg = _config(agent, "e")["config"]
    assert cfg["Entrypoint"] == ["echo"] and cfg.get("Cmd") is None
    ctx2 = write_context(
        tmp_path / "c2", {"Dockerfile": 'FROM busybox\nCMD ["x"]\nENTRYPOINT ["echo"]\n'}
    )
    build(agent, T, ctx2, tag="e2")
    assert _config(agent, "e2")["config"]["Cmd"] == ["x"]


def test_chown_names_resolve_from_image_passwd(agent: Agent, tmp_path: Path) -> None:
    make_base(agent, T, tmp_path)
    ctx = write_context(
        tmp_path / "c",
        {
            "Dockerfile": (
                "FROM busybox\nCOPY --chown=app:staff f /home/app/f\n"
                "COPY --chown=app d /d\nCOPY --chown=7:8 --chmod=600 f /g\n"
            ),
            "f": "data",
            "d/e": "e",
        },
    )
    build(agent, T, ctx, tag="own")
    tree = image_tree(agent, T, "own")
    assert tree["/home/app/f"][2:4] == (1000, 50)
    assert tree["/home/app"][2:4] == (1000, 50)  # created parent gets the owner, as docker
    assert tree["/d"][2:4] == (1000, 1000) and tree["/d/e"][2:4] == (1000, 1000)
    assert tree["/g"][1:4] == (0o600, 7, 8)
    assert tree["/etc"][2:4] == (0, 0)


def test_chown_unknown_user_fails_without_tag(agent: Agent, tmp_path: Path) -> None:
    make_base(agent, T, tmp_path)
    ctx = write_context(
        tmp_path / "c", {"Dockerfile": "FROM busybox\nCOPY --chown=ghost f /f\n", "f": "x"}
    )
    with pytest.raises(NotFound, match="ghost"):
        build(agent, T, ctx, tag="bad")
    with pytest.raises(NotFound):
        agent.images.resolve(T, "bad")


def test_arg_env_interplay_and_scoping(agent: Agent, tmp_path: Path) -> None:
    ctx = write_context(
        tmp_path / "c",
        {
            "Dockerfile": (
                "ARG DIR=/meta\nARG UNUSED_GLOBAL=g\n"
                "FROM scratch AS one\n"
                "COPY f ${DIR:-/none}/a\n"  # meta ARG not visible inside a stage
                "ARG DIR\n"
                "COPY f ${DIR}/b\n"  # redeclared: gets the global value
                "ARG NAME=default\nENV NAME=env-wins\nARG NAME=ignored\n"
                "COPY f /${NAME}\n"
                "ENV A=1\nENV A=2 B=$A\n"  # B sees the old A
                "LABEL name=$NAME b=$B\n"
                "FROM scratch\nCOPY f ${DIR:-/unset}/c\n"
            ),
            "f": "x",
        },
    )
    build(agent, T, ctx, tag="args", target="one", build_args={"DIR": "/given"})
    tree = image_tree(agent, T, "args")
    assert "/none/a" in tree and "/given/b" in tree and "/env-wins" in tree
    cfg = _config(agent, "args")["config"]
    assert cfg["Labels"] == {"name": "env-wins", "b": "1"}
    assert "A=2" in cfg["Env"] and "B=1" in cfg["Env"]
    build(agent, T, ctx, tag="args2")
    assert "/unset/c" in image_tree(agent, T, "args2")


def test_unused_build_arg_warns(agent: Agent, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "c", {"Dockerfile": "FROM scratch\nARG USED\n"})
    events = build(agent, T, ctx, build_args={"USED": "1", "NOPE": "2"})
    warnings = [e.message for e in events if e.kind == "warning"]
    assert warnings == ["One or more build-args ['NOPE'] were not consumed"]


def test_target_builds_only_needed_stages(agent: Agent, tmp_path: Path) -> None:
    ctx = write_context(
        tmp_path / "c",
        {
            "Dockerfile": (
                "FROM scratch AS a\nCOPY f /a\n"
                "FROM scratch AS b\nCOPY missing /b\n"  # would fail if built
                "FROM scratch AS c\nCOPY --from=a /a /c\n"
            ),
            "f": "x",
        },
    )
    events = build(agent, T, ctx, tag="t", target="c")
    steps = [e.message for e in events if e.kind == "step"]
    assert "COPY missing /b" not in steps
    assert steps[0] == "FROM scratch AS a" and events[0].total == 4
    assert image_tree(agent, T, "t")["/c"][4] == "x"
    with pytest.raises(NotFound, match="could not be found"):
        build(agent, T, ctx, target="zzz")


def test_copy_from_earlier_stage_and_image(agent: Agent, tmp_path: Path) -> None:
    make_base(agent, T, tmp_path)
    ctx = write_context(
        tmp_path / "c",
        {
            "Dockerfile": (
                "FROM busybox AS build\nCOPY src /out/\nWORKDIR /out\n"
                "FROM scratch\nCOPY --from=build /out /app\n"
                "COPY --from=0 /out/*.txt /txt/\n"
                "COPY --from=busybox:latest /etc/passwd /passwd\n"
            ),
            "src/one.txt": "1",
            "src/two.bin": "2",
        },
    )
    build(agent, T, ctx, tag="ms")
    tree = image_tree(agent, T, "ms")
    assert tree["/app/one.txt"][4] == "1" and tree["/app/two.bin"][4] == "2"
    assert "/txt/one.txt" in tree and "/txt/two.bin" not in tree
    assert tree["/passwd"][4].startswith("root:x:0:0")
    assert "/bin/busybox" not in tree


def test_copy_errors(agent: Agent, tmp_path: Path) -> None:
    ctx = write_context(
        tmp_path / "c",
        {"Dockerfile": "FROM scratch\nCOPY a b /dest\n", "a": "1", "b": "2"},
    )
    with pytest.raises(InvalidArgument, match="must be a directory and end with a /"):
        build(agent, T, ctx)
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY ../outside /x\n")
    with pytest.raises(InvalidArgument, match="outside the build context"):
        build(agent, T, ctx)
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY nope /x\n")
    with pytest.raises(NotFound, match=r"Dockerfile:2.*nope"):
        build(agent, T, ctx)
    (ctx / "Dockerfile").write_text(
        "FROM scratch AS first\nCOPY --from=later /x /x\nFROM scratch AS later\n"
    )
    with pytest.raises(InvalidArgument, match="not defined before"):
        build(agent, T, ctx, target="first")
    (ctx / "Dockerfile").write_text("FROM nosuchimage:1\n")
    with pytest.raises(NotFound, match="nosuchimage"):
        build(agent, T, ctx)
    (ctx / "Dockerfile").write_text("FROM --platform=linux/s390x scratch\n")
    with pytest.raises(InvalidArgument, match="s390x is not supported"):
        build(agent, T, ctx)


def test_dockerignore_applies_to_copy(agent: Agent, tmp_path: Path) -> None:
    ctx = write_context(
        tmp_path / "c",
        {
            "Dockerfile": "FROM scratch\nCOPY . /app\n",
            ".dockerignore": "*.log\nsecrets\n!secrets/public\nDockerfile\n",
            "main.py": "m",
            "debug.log": "l",
            "secrets/key": "k",
            "secrets/public": "p",
        },
    )
    build(agent, T, ctx, tag="ign")
    files = {p for p, e in image_tree(agent, T, "ign").items() if e[0] == "file"}
    assert files == {"/app/main.py", "/app/.dockerignore", "/app/secrets/public"}


def _tarball(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.uid = 42
            info.mode = 0o640
            tar.addfile(info, io.BytesIO(data))


def test_add_extracts_local_archives_but_copy_does_not(agent: Agent, tmp_path: Path) -> None:
    ctx = write_context(
        tmp_path / "c",
        {"Dockerfile": "FROM scratch\nADD pkg.tar.gz /opt/\nCOPY pkg.tar.gz /raw/\n"},
    )
    _tarball(ctx / "pkg.tar.gz", {"pkg/bin/tool": b"#!tool", "pkg/README": b"r"})
    build(agent, T, ctx, tag="add")
    tree = image_tree(agent, T, "add")
    assert tree["/opt/pkg/bin/tool"] == ("file", 0o640, 42, 0, "#!tool")
    assert tree["/raw/pkg.tar.gz"][0] == "file"
    assert "/opt/pkg.tar.gz" not in tree


def test_add_url(agent: Agent, tmp_path: Path) -> None:
    import dataclasses
    import http.server
    import threading

    # The server is on loopback, which a tenant's ADD reaches only when the operator allows
    # it (BERTH_FETCH_ALLOW; tests/security/test_fetches.py tries the refusals).
    agent = Agent(dataclasses.replace(agent.config, fetch_allow=("127.0.0.1",)))

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "file.txt").write_text("remote")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **k: object) -> None:
            super().__init__(*a, directory=str(tmp_path / "www"), **k)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/file.txt"
        ctx = write_context(tmp_path / "c", {"Dockerfile": f"FROM scratch\nADD {url} /dl/\n"})
        build(agent, T, ctx, tag="url")
        assert image_tree(agent, T, "url")["/dl/file.txt"] == ("file", 0o600, 0, 0, "remote")
    finally:
        server.shutdown()
        server.server_close()


def test_heredoc_copy(agent: Agent, tmp_path: Path) -> None:
    ctx = write_context(
        tmp_path / "c", {"Dockerfile": "FROM scratch\nCOPY <<EOF /etc/motd\nhello $X\nEOF\n"}
    )
    build(agent, T, ctx, tag="hd")
    assert image_tree(agent, T, "hd")["/etc/motd"][4] == "hello $X\n"


# ------------------------------------------------------------------ cache
def _ctx_for_cache(tmp_path: Path) -> Path:
    return write_context(
        tmp_path / "c",
        {
            "Dockerfile": (
                "FROM scratch AS b\nARG V=1\nCOPY src /src\nENV V=$V\n"
                "FROM scratch\nCOPY --from=b /src /app\nCOPY other /other\n"
            ),
            "src/a": "a",
            "other": "o",
        },
    )


def _cached_steps(events: list[BuildEvent]) -> list[str]:
    """Instructions (in step order) that were satisfied from the cache."""
    cached = {e.step for e in events if e.kind == "cached"}
    steps = sorted((e.step or 0, e.message) for e in events if e.kind == "step")
    return [message for step, message in steps if step in cached]


def test_cache_hits_and_misses_like_docker(agent: Agent, tmp_path: Path) -> None:
    ctx = _ctx_for_cache(tmp_path)
    first = build(agent, T, ctx, tag="c")
    assert _cached_steps(first) == []
    again = build(agent, T, ctx, tag="c")
    assert len(_cached_steps(again)) == 5
    assert again[-1].digest == first[-1].digest  # a fully cached rebuild is the same image
    os.utime(ctx / "src" / "a", (1, 1))  # mtimes don't matter
    assert build(agent, T, ctx)[-1].digest == first[-1].digest
    (ctx / "other").write_text("changed")  # only the last COPY misses
    changed = build(agent, T, ctx)
    assert _cached_steps(changed) == [
        "ARG V=1",
        "COPY src /src",
        "ENV V=$V",
        "COPY --from=b /src /app",
    ]
    with_arg = build(agent, T, ctx, build_args={"V": "2"})  # ENV after the ARG misses
    assert _cached_steps(with_arg) == ["ARG V=1", "COPY src /src"]
    no_cache = build(agent, T, ctx, no_cache=True)
    assert _cached_steps(no_cache) == []


def test_cache_is_per_tenant(agent: Agent, tmp_path: Path) -> None:
    ctx = _ctx_for_cache(tmp_path)
    build(agent, T, ctx, tag="c")
    other = build(agent, "other", ctx, tag="c")
    assert _cached_steps(other) == []
    assert agent.builder.cache(T).entries() > 0
    assert (agent.config.build_cache_dir / "other").is_dir()


def test_cache_entries_go_with_their_layers(agent: Agent, tmp_path: Path) -> None:
    ctx = _ctx_for_cache(tmp_path)
    build(agent, T, ctx, tag="c")
    agent.images.remove(T, "c")
    agent.images.gc(grace_seconds=0)
    rebuilt = build(agent, T, ctx, tag="c")
    assert not any(e.kind == "cached" for e in rebuilt if e.message.startswith("COPY"))
    assert agent.builder.cache(T).prune() >= 0
    for path in (agent.config.build_cache_dir / T).glob("*.json"):
        entry = json.loads(path.read_text())
        assert all(agent.content.has(layer["digest"]) for layer in entry["layers"])


def test_context_over_limit_is_refused(agent: Agent, tmp_path: Path) -> None:
    from runtime_agent.build.steps import BuildLimits

    ctx = write_context(tmp_path / "c", {"Dockerfile": "FROM scratch\n", "big": b"x" * 4096})
    with pytest.raises(ResourceExhausted):
        build(agent, T, ctx, limits=BuildLimits(context_bytes=1024))


def test_tar_context_on_stdin(agent: Agent, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {"Dockerfile": b"FROM scratch\nCOPY f /f\n", "f": b"from-tar"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    events = list(agent.builder.build(T, buf, tag="tarctx"))
    assert events[-1].kind == "done"
    assert image_tree(agent, T, "tarctx")["/f"][4] == "from-tar"
    assert list((agent.config.build_cache_dir / ".contexts").iterdir()) == []


def test_onbuild_triggers_run_in_the_child_build(agent: Agent, tmp_path: Path) -> None:
    parent = write_context(
        tmp_path / "p",
        {"Dockerfile": "FROM scratch\nONBUILD COPY marker /from-trigger\nCOPY marker /m\n",
         "marker": "parent"},
    )  # fmt: skip
    build(agent, T, parent, tag="onbuild-parent")
    assert _config(agent, "onbuild-parent")["config"]["OnBuild"] == ["COPY marker /from-trigger"]
    child = write_context(
        tmp_path / "c", {"Dockerfile": "FROM onbuild-parent\n", "marker": "child"}
    )
    build(agent, T, child, tag="onbuild-child")
    assert image_tree(agent, T, "onbuild-child")["/from-trigger"][4] == "child"
    assert not _config(agent, "onbuild-child")["config"].get("OnBuild")


def test_other_tenants_images_are_invisible(agent: Agent, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "a", {"Dockerfile": "FROM scratch\nCOPY f /f\n", "f": "x"})
    build(agent, T, ctx, tag="private:1")
    for text in ("FROM private:1\n", "FROM scratch\nCOPY --from=private:1 /f /f\n"):
        other = write_context(tmp_path / "b", {"Dockerfile": text})
        with pytest.raises(NotFound):
            build(agent, "intruder", other, tag="stolen")


def test_abandoned_build_is_cancelled_and_cleaned_up(agent: Agent, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {"Dockerfile": b"FROM scratch\nCOPY f /f\nENV A=1\n", "f": b"x"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    events = agent.builder.build(T, buf, tag="abandoned")
    assert next(events).kind == "step"
    events.close()
    with pytest.raises(NotFound):
        agent.images.resolve(T, "abandoned")
    assert list((agent.config.build_cache_dir / ".contexts").iterdir()) == []


def test_expansion_errors_name_the_line(agent: Agent, tmp_path: Path) -> None:
    ctx = write_context(tmp_path / "c", {"Dockerfile": 'FROM scratch\n\nENV A="unbalanced\n'})
    with pytest.raises(InvalidArgument, match=r"Dockerfile:3: .*double-quote"):
        build(agent, T, ctx)
