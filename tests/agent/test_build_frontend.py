"""Dockerfile frontend: docker's word expansion, .dockerignore, parsing and validation,
build contexts. Pure Python; no root needed."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from runtime_agent.build import dockerfile as df
from runtime_agent.build.context import BuildContext
from runtime_agent.build.dockerignore import IgnoreMatcher
from runtime_agent.build.shell import process_word, process_words
from runtime_agent.errors import InvalidArgument, NotFound, ResourceExhausted

ENV = {"A": "alpha", "EMPTY": "", "SP": "a b"}


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("$A", "alpha"),
        ("${A}", "alpha"),
        ("x${A}y", "xalphay"),
        ("$A.txt", "alpha.txt"),
        ("${UNSET}", ""),
        ("$UNSET-z", "-z"),
        ("${UNSET:-def}", "def"),
        ("${EMPTY:-def}", "def"),
        ("${EMPTY-def}", ""),
        ("${UNSET-def}", "def"),
        ("${A:-def}", "alpha"),
        ("${A:+set}", "set"),
        ("${EMPTY:+set}", ""),
        ("${EMPTY+set}", "set"),
        ("${UNSET:+set}", ""),
        ("${UNSET:-${A}}", "alpha"),
        (r"\$A", "$A"),
        (r"\${A}", "${A}"),
        ("'$A'", "$A"),
        ('"$A"', "alpha"),
        (r'"\$A"', "$A"),
        (r'"a\b"', r"a\b"),
        ('"a b"', "a b"),
        ("a\\ b", "a b"),
        ("$", "$"),
        ("a$", "a$"),
        ("$1x", "x"),
        ('"it\'s"', "it's"),
    ],
)
def test_process_word_matches_docker(word: str, expected: str) -> None:
    assert process_word(word, ENV) == expected


def test_process_words_splits_unquoted_whitespace_and_expanded_values() -> None:
    assert process_words("80 '90 91' $SP", ENV) == ["80", "90 91", "a", "b"]


def test_backtick_escape_token() -> None:
    assert process_word("`$A", ENV, escape="`") == "$A"
    assert process_word(r"C:\dir", ENV, escape="`") == r"C:\dir"


@pytest.mark.parametrize(
    "word", ["${A", "${}", "${:-x}", "'open", '"open', "${A:=x}", "${UNSET:?must be set}"]
)
def test_bad_substitutions_are_errors(word: str) -> None:
    with pytest.raises(InvalidArgument):
        process_word(word, ENV)


# ------------------------------------------------------------------ .dockerignore
@pytest.mark.parametrize(
    ("patterns", "path", "ignored"),
    [
        ("*.log", "a.log", True),
        ("*.log", "dir/a.log", False),
        ("**/*.log", "dir/sub/a.log", True),
        ("**/*.log", "a.log", True),
        ("dir", "dir/sub/file", True),
        ("dir/*", "dir/file", True),
        ("dir/*", "dir", False),
        ("/dir", "dir/x", True),
        ("./dir/../dir", "dir/x", True),
        ("*\n!keep.log", "keep.log", False),
        ("*\n!keep.log", "other", True),
        ("dir\n!dir/keep", "dir/keep", False),
        ("dir\n!dir/keep", "dir/drop", True),
        ("!dir/keep\ndir", "dir/keep", True),  # last match wins
        ("# comment\n\n  a  ", "a", True),
        ("a?c", "abc", True),
        ("a?c", "a/c", False),
        ("[a-c]x", "bx", True),
        ("[!a-c]x", "dx", True),
        ("**", "anything/at/all", True),
        ("dir/**", "dir", False),
        ("dir/**", "dir/a/b", True),
        ("a\\*b", "a*b", True),
        ("a\\*b", "axb", False),
    ],
)
def test_dockerignore_semantics(patterns: str, path: str, ignored: bool) -> None:
    assert IgnoreMatcher.from_text(patterns).ignored(path) is ignored


def test_dockerignore_rejects_bare_exclamation() -> None:
    with pytest.raises(InvalidArgument, match="illegal exclusion"):
        IgnoreMatcher.from_text("!\n")


# ------------------------------------------------------------------ parsing
def test_parse_stages_meta_args_and_heredocs() -> None:
    text = (
        "ARG V=1\nFROM busybox:${V} AS Build\nRUN <<EOF\necho hi\nEOF\n"
        'COPY --from=build --chown=1:2 a b /c/\nFROM build\nCMD ["sh"]\n'
    )
    parsed = df.parse(text)
    assert [a.args for a in parsed.meta_args] == [("V=1",)]
    assert [(s.name, s.base) for s in parsed.stages] == [("build", "busybox:${V}"), (None, "build")]
    run, copy = parsed.stages[0].instructions
    assert run.heredocs[0].content == "echo hi\n"
    assert copy.flags == {"from": "build", "chown": "1:2"}
    assert parsed.stages[1].instructions[0].json
    assert parsed.stage("build").index == 0
    assert parsed.stage("1").index == 1


def _tar_entries(entries: list[tarfile.TarInfo], data: bytes = b"owned") -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info in entries:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("linkname", ["/etc", "../../..", "sub/../../outside"])
def test_context_tar_symlink_out_of_the_context_is_refused(tmp_path: Path, linkname: str) -> None:
    """A symlink out of the context, and a file written through it, never land outside
    (with or without tarfile's own filters: Debian 12's Python 3.11.2 has none)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    link = tarfile.TarInfo("link")
    link.type, link.linkname = tarfile.SYMTYPE, linkname
    through = tarfile.TarInfo("link/passwd")
    through.size = 5
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InvalidArgument, match="outside the build context"):
        BuildContext.from_tar(_tar_entries([link, through]), workdir=work)
    assert list(work.iterdir()) == []
    assert list(outside.iterdir()) == []


def test_context_tar_drops_setuid_and_group_write_bits(tmp_path: Path) -> None:
    info = tarfile.TarInfo("tool")
    info.size, info.mode = 5, 0o6777
    inner = tarfile.TarInfo("dir/")
    inner.type, inner.mode = tarfile.DIRTYPE, 0o1777
    with BuildContext.from_tar(_tar_entries([inner, info]), workdir=tmp_path) as ctx:
        assert (ctx.root / "tool").stat().st_mode & 0o7777 == 0o755
        assert (ctx.root / "dir").stat().st_mode & 0o7777 == 0o755
        assert (ctx.root / "tool").read_bytes() == b"owned"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("FROM busybox\nFOO bar\n", 2, "unknown instruction: FOO"),
        ("FROM\n", 1, "requires either one or three arguments"),
        ("FROM a b\n", 1, "requires either one or three arguments"),
        ("RUN echo\n", 1, "no build stage"),
        ("FROM a\nCOPY --bogus=1 x y\n", 2, "unknown flag: --bogus"),
        ("FROM a\nRUN --mount=type=cache,target=/x true\n", 2, "needs BuildKit"),
        ("FROM a\nCOPY x\n", 2, "at least two arguments"),
        ("FROM a\nENV\n", 2, "requires at least one argument"),
        ("FROM a\nSHELL sh -c\n", 2, "JSON form"),
        ("FROM a\nHEALTHCHECK --interval=1s NONE\n", 2, "NONE takes no other"),
        ("FROM a\nONBUILD FROM b\n", 2, "isn't allowed as an ONBUILD trigger"),
        ("FROM a AS x\nFROM b AS x\n", 2, "duplicate name"),
        ("FROM a AS 1x\n", 1, "invalid name for build stage"),
        ("FROM a\nCOPY --chmod=abc x y\n", 2, "invalid --chmod"),
    ],
)
def test_validation_errors_name_file_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        df.parse(text, "ctx/Dockerfile")
    assert f"ctx/Dockerfile:{line}" in str(info.value)
    assert message in str(info.value)


def test_empty_dockerfile_is_an_error() -> None:
    with pytest.raises(InvalidArgument, match=r"no instructions|no FROM"):
        df.parse("# nothing\n")


def test_escape_directive() -> None:
    parsed = df.parse("# escape=`\nFROM a\nRUN echo `\n  hi\n")
    assert parsed.escape == "`"
    assert parsed.stages[0].instructions[0].args == ("echo   hi",)


def test_unknown_target_stage() -> None:
    with pytest.raises(NotFound, match="nope"):
        df.parse("FROM a AS one\n").stage("nope")


def test_onbuild_trigger_is_parsed_and_validated() -> None:
    parsed = df.parse("FROM a\nONBUILD COPY --from=x a /b\n")
    trigger = parsed.stages[0].instructions[0].trigger
    assert trigger is not None and trigger.cmd == "COPY" and trigger.flags == {"from": "x"}


# ------------------------------------------------------------------ context
def _ctx(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    (root / "src" / "sub").mkdir(parents=True)
    (root / "src" / "a.py").write_text("a")
    (root / "src" / "sub" / "b.py").write_text("b")
    (root / "src" / "c.log").write_text("c")
    (root / "top.txt").write_text("t")
    (root / ".dockerignore").write_text("**/*.log\nsrc/sub\n!src/sub/b.py\n")
    return root


def test_context_walk_respects_dockerignore_with_exceptions(tmp_path: Path) -> None:
    ctx = BuildContext.from_directory(_ctx(tmp_path))
    assert list(ctx.walk()) == [".dockerignore", "src", "src/a.py", "src/sub/b.py", "top.txt"]


def test_context_resolves_globs_and_refuses_escapes(tmp_path: Path) -> None:
    ctx = BuildContext.from_directory(_ctx(tmp_path))
    assert ctx.resolve_sources("src/*.py") == ["src/a.py"]
    assert ctx.resolve_sources("./top.txt") == ["top.txt"]
    with pytest.raises(NotFound, match=r"excluded by \.dockerignore"):
        ctx.resolve_sources("src/c.log")
    with pytest.raises(NotFound):
        ctx.resolve_sources("missing.txt")
    with pytest.raises(InvalidArgument, match="outside the build context"):
        ctx.resolve_sources("../etc/passwd")
    (ctx.root / "link").symlink_to("/etc")
    with pytest.raises(InvalidArgument, match="outside the build context"):
        ctx.resolve_sources("link")


def test_context_digest_covers_content_and_mode_not_mtime(tmp_path: Path) -> None:
    root = _ctx(tmp_path)
    first = BuildContext.from_directory(root).digest("src")
    (root / "src" / "a.py").touch()
    import os

    os.utime(root / "src" / "a.py", (1, 1))
    assert BuildContext.from_directory(root).digest("src") == first
    (root / "src" / "a.py").chmod(0o600)
    assert BuildContext.from_directory(root).digest("src") != first
    (root / "src" / "a.py").chmod(0o644)
    (root / "src" / "a.py").write_text("changed")
    assert BuildContext.from_directory(root).digest("src") != first
    # an ignored file does not take part
    (root / "src" / "c.log").write_text("different")
    later = BuildContext.from_directory(root).digest("src")
    (root / "src" / "c.log").write_text("again")
    assert BuildContext.from_directory(root).digest("src") == later


def _tar(members: dict[str, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def test_context_from_tar_stream(tmp_path: Path) -> None:
    stream = _tar({"Dockerfile": b"FROM scratch\n", "dir/f": b"x"})
    with BuildContext.from_tar(stream, workdir=tmp_path) as ctx:
        root = ctx.root
        assert ctx.read_text("Dockerfile") == "FROM scratch\n"
        assert ctx.resolve_sources("dir") == ["dir"]
    assert not root.exists()


def test_context_tar_over_limit_leaves_nothing(tmp_path: Path) -> None:
    stream = _tar({"big": b"x" * 5000})
    with pytest.raises(ResourceExhausted, match="larger than the limit"):
        BuildContext.from_tar(stream, limit=1000, workdir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_context_directory_over_limit(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    (root / "big").write_bytes(b"x" * 5000)
    with pytest.raises(ResourceExhausted):
        BuildContext.from_directory(root, limit=1000)
    (root / ".dockerignore").write_text("big\n")
    BuildContext.from_directory(root, limit=1000)


def test_context_tar_with_escaping_member(tmp_path: Path) -> None:
    stream = _tar({"../evil": b"x"})
    with pytest.raises(InvalidArgument, match="outside the build context"):
        BuildContext.from_tar(stream, workdir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("FROM a\nRUN true\nRUN <<EOF\nnever closed\n", 3, "unterminated heredoc"),
        ("FROM a\n\nENV lonely\n", 3, "ENV must have two arguments"),
    ],
)
def test_parser_syntax_errors_get_a_line(text: str, line: int, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        df.parse(text, "Dockerfile")
    assert f"Dockerfile:{line}: syntax error: {message}" in str(info.value)
