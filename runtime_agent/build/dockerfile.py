"""Dockerfile frontend: parse with BuildKit's parser, validate, and model stages.

The ``dockerfile`` package binds BuildKit's own parser, so line continuations, JSON
forms, heredocs and the ``# escape=`` directive behave exactly as under docker. It accepts
anything that looks like an instruction, so this module validates what it returns:
unknown instructions, an empty FROM, flags an instruction does not take, malformed
arguments. Every error names the file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

from runtime_agent.errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    import dockerfile as _bk


def _buildkit() -> ModuleType:
    """BuildKit's parser, loaded on first use: loading it starts a Go runtime and its
    threads, which the agent's CLI server (it forks) must not have (cliserver.py)."""
    import dockerfile

    return dockerfile


KNOWN = {
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
}

# Flags each instruction accepts (BuildKit-only RUN --mount/--network/--security are
# refused with a clear message rather than silently ignored).
ALLOWED_FLAGS: dict[str, set[str]] = {
    "FROM": {"platform"},
    "COPY": {"from", "chown", "chmod", "link"},
    "ADD": {"chown", "chmod", "link", "checksum"},
    "HEALTHCHECK": {"interval", "timeout", "start-period", "start-interval", "retries"},
}
UNSUPPORTED_FLAGS = {"mount", "network", "security"}

STAGE_NAME = re.compile(r"^[a-z][a-z0-9\-_.]*$")
ESCAPE_DIRECTIVE = re.compile(r"^#\s*escape\s*=\s*(\S)\s*$", re.IGNORECASE)
DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")


@dataclass(frozen=True)
class Heredoc:
    name: str
    content: str
    fd: int


@dataclass(frozen=True)
class Instruction:
    """One instruction as written; arguments are expanded later, with the stage's env."""

    cmd: str
    args: tuple[str, ...]
    flags: dict[str, str]
    json: bool
    original: str
    line: int
    filename: str
    heredocs: tuple[Heredoc, ...] = ()
    trigger: Instruction | None = None  # ONBUILD's wrapped instruction

    @property
    def where(self) -> str:
        return f"{self.filename}:{self.line}"

    def error(self, message: str) -> InvalidArgument:
        return InvalidArgument(f"{self.where}: {self.cmd}: {message}", line=self.line)


@dataclass
class Stage:
    index: int
    base: str  # unexpanded image reference (or stage name)
    name: str | None
    platform: str | None
    instr: Instruction
    instructions: list[Instruction] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name or str(self.index)


@dataclass
class Dockerfile:
    filename: str
    escape: str
    meta_args: list[Instruction]
    stages: list[Stage]

    def stage(self, name_or_index: str) -> Stage:
        lowered = name_or_index.lower()
        for stage in self.stages:
            if stage.name == lowered:
                return stage
        if name_or_index.isdigit() and int(name_or_index) < len(self.stages):
            return self.stages[int(name_or_index)]
        raise NotFound(f"target stage {name_or_index!r} could not be found")

    def find_stage(self, ref: str, before: int) -> Stage | None:
        """The earlier stage a FROM or COPY --from names, if it names one."""
        lowered = ref.lower()
        for stage in self.stages[:before]:
            if stage.name == lowered:
                return stage
        if ref.isdigit():
            idx = int(ref)
            if idx < before:
                return self.stages[idx]
            raise InvalidArgument(f"invalid stage index {ref}: no such earlier stage")
        return None


def _escape_token(text: str) -> str:
    for line in text.splitlines():
        m = ESCAPE_DIRECTIVE.match(line)
        if m:
            if m.group(1) not in ("\\", "`"):
                raise InvalidArgument(f"invalid escape token {m.group(1)!r}: must be \\ or `")
            return m.group(1)
        if not DIRECTIVE.match(line):
            break
    return "\\"


def _split_flags(cmd: _bk.Command, filename: str) -> dict[str, str]:
    flags: dict[str, str] = {}
    name = cmd.cmd.upper()
    allowed = ALLOWED_FLAGS.get(name, set())
    for raw in cmd.flags:
        body = raw[2:]
        key, sep, value = body.partition("=")
        if key in UNSUPPORTED_FLAGS and name == "RUN":
            raise InvalidArgument(
                f"{filename}:{cmd.start_line}: RUN --{key} needs BuildKit and is not supported"
            )
        if key not in allowed:
            raise InvalidArgument(f"{filename}:{cmd.start_line}: {name}: unknown flag: --{key}")
        if key in flags:
            raise InvalidArgument(f"{filename}:{cmd.start_line}: {name}: duplicate flag --{key}")
        if not sep and key != "link":
            raise InvalidArgument(f"{filename}:{cmd.start_line}: {name}: --{key} needs a value")
        flags[key] = value
    return flags


def _instruction(cmd: _bk.Command, filename: str, escape: str) -> Instruction:
    name = cmd.cmd.upper()
    where = f"{filename}:{cmd.start_line}"
    if name not in KNOWN:
        raise InvalidArgument(f"{where}: unknown instruction: {cmd.cmd}", line=cmd.start_line)
    heredocs = tuple(Heredoc(h.name, h.content, h.file_descriptor) for h in cmd.heredocs)
    trigger = None
    if name == "ONBUILD":
        sub = (cmd.sub_cmd or "").upper()
        if not sub:
            raise InvalidArgument(f"{where}: ONBUILD requires an instruction")
        if sub in ("ONBUILD", "FROM", "MAINTAINER"):
            raise InvalidArgument(f"{where}: {sub} isn't allowed as an ONBUILD trigger")
        body = re.sub(r"^\s*onbuild\s+", "", cmd.original, count=1, flags=re.IGNORECASE)
        parsed = _buildkit().parse_string(body)
        trigger = _instruction(parsed[0], filename, escape)
        trigger = Instruction(
            trigger.cmd,
            trigger.args,
            trigger.flags,
            trigger.json,
            trigger.original,
            cmd.start_line,
            filename,
            trigger.heredocs,
        )
        return Instruction(
            name, (body,), {}, False, cmd.original, cmd.start_line, filename, (), trigger
        )
    flags = _split_flags(cmd, filename)
    args = tuple(a for a in cmd.value if a != "") if not cmd.json else tuple(cmd.value)
    instr = Instruction(
        name, args, flags, cmd.json, cmd.original, cmd.start_line, filename, heredocs
    )
    _validate(instr)
    return instr


def _validate(i: Instruction) -> None:
    n = len(i.args)
    if i.cmd == "FROM":
        if n not in (1, 3) or (n == 3 and i.args[1].upper() != "AS"):
            raise i.error("requires either one or three arguments (FROM image [AS name])")
    elif i.cmd in ("COPY", "ADD"):
        if n < 2 and not (n == 1 and i.heredocs):
            raise i.error("requires at least two arguments, but only one was provided")
        for key in ("chmod",):
            if key in i.flags and not re.fullmatch(r"[0-7]{3,4}", i.flags[key]):
                raise i.error(f"invalid --chmod value {i.flags[key]!r}: expected octal digits")
    elif i.cmd in ("ENV", "LABEL"):
        if n == 0:
            raise i.error("requires at least one argument")
        if n % 2:
            raise i.error("requires KEY=VALUE pairs (or KEY VALUE)")
    elif i.cmd == "ARG":
        if n != 1 and not all("=" in a for a in i.args):
            raise i.error("ARG requires exactly one argument (NAME or NAME=default)")
        for a in i.args:
            if not a.split("=", 1)[0]:
                raise i.error("ARG names can not be blank")
    elif i.cmd in ("WORKDIR", "USER", "STOPSIGNAL", "MAINTAINER"):
        if n == 0:
            raise i.error("requires exactly one argument")
        if i.cmd in ("USER", "STOPSIGNAL") and n != 1:
            raise i.error("requires exactly one argument")
    elif i.cmd in ("EXPOSE", "VOLUME", "RUN", "CMD", "ENTRYPOINT", "SHELL"):
        if n == 0 and not (i.json and i.cmd in ("CMD", "ENTRYPOINT")) and not i.heredocs:
            raise i.error("requires at least one argument")
        if i.cmd == "SHELL" and not i.json:
            raise i.error('requires the arguments to be in JSON form, e.g. ["/bin/sh", "-c"]')
        if i.cmd == "RUN" and not i.json and i.args and i.args[0].lstrip().startswith("["):
            raise i.error(f"malformed JSON array: {i.args[0]!r}")
    elif i.cmd == "HEALTHCHECK":
        if n == 0:
            raise i.error("requires NONE or CMD")
        kind = i.args[0].upper()
        if kind == "NONE":
            if n != 1 or i.flags:
                raise i.error("HEALTHCHECK NONE takes no other arguments")
        elif kind != "CMD" or n < 2:
            raise i.error("requires NONE or CMD followed by a command")


def _error_line(text: str, message: str) -> int | None:
    """The parser's errors carry no line: find the first prefix of the file that fails
    the same way (only runs on a syntax error)."""
    bk = _buildkit()
    lines = text.splitlines(keepends=True)
    for end in range(1, len(lines) + 1):
        try:
            bk.parse_string("".join(lines[:end]))
        except bk.GoParseError as exc:
            if str(exc) == message:
                return end
    return None


def parse(text: str, filename: str = "Dockerfile") -> Dockerfile:
    """Parse and validate a Dockerfile; raise ``InvalidArgument`` naming file and line."""
    escape = _escape_token(text)
    bk = _buildkit()
    try:
        commands = bk.parse_string(text)
    except bk.GoParseError as exc:
        line = _error_line(text, str(exc))
        where = f"{filename}:{line}" if line else filename
        raise InvalidArgument(f"{where}: syntax error: {exc}", line=line) from exc
    meta_args: list[Instruction] = []
    stages: list[Stage] = []
    for cmd in commands:
        instr = _instruction(cmd, filename, escape)
        if instr.cmd == "FROM":
            name = None
            if len(instr.args) == 3:
                name = instr.args[2].lower()
                if not STAGE_NAME.match(name):
                    raise instr.error(f"invalid name for build stage: {instr.args[2]!r}")
                if any(s.name == name for s in stages):
                    raise instr.error(f"duplicate name {name!r} for build stage")
            stages.append(
                Stage(len(stages), instr.args[0], name, instr.flags.get("platform"), instr)
            )
        elif not stages:
            if instr.cmd != "ARG":
                raise instr.error("no build stage in current context (FROM must come first)")
            meta_args.append(instr)
        else:
            stages[-1].instructions.append(instr)
    if not stages:
        raise InvalidArgument(f"{filename}: file with no instructions (no FROM found)")
    return Dockerfile(filename, escape, meta_args, stages)
