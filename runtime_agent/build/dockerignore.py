"""``.dockerignore`` with docker's pattern semantics (moby ``patternmatcher``).

Lines are cleaned like ``filepath.Clean`` with any leading ``/`` dropped; ``#`` starts a
comment line; ``!`` marks an exception. ``*`` matches within one path element, ``?`` one
character, ``**`` any number of directories (including none), ``[...]`` a class and ``\\``
escapes. A pattern that matches a directory also matches everything under it, and the last
matching pattern decides, so ``!`` can re-include a file inside an excluded directory.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from runtime_agent.errors import InvalidArgument


@dataclass(frozen=True)
class Pattern:
    text: str
    exclusion: bool
    regex: re.Pattern[str]


def _compile(pattern: str) -> re.Pattern[str]:
    out = "^"
    i = 0
    n = len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                i += 2
                if i < n and pattern[i] == "/":
                    i += 1
                out += ".*" if i >= n else "(.*/)?"
                continue
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\":
            i += 1
            if i >= n:
                raise InvalidArgument(f".dockerignore: bad pattern {pattern!r} (trailing escape)")
            out += re.escape(pattern[i])
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                raise InvalidArgument(f".dockerignore: bad pattern {pattern!r} (unclosed [)")
            body = pattern[i + 1 : end]
            if body.startswith("^") or body.startswith("!"):
                body = "^" + body[1:]
            out += "[" + body.replace("\\", "\\\\") + "]"
            i = end
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + "$")


def parse_patterns(text: str) -> list[Pattern]:
    patterns: list[Pattern] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        if exclusion:
            line = line[1:].strip()
            if not line:
                raise InvalidArgument('.dockerignore: illegal exclusion pattern: "!"')
        line = posixpath.normpath(line)
        line = line.lstrip("/") or "."
        patterns.append(Pattern(line, exclusion, _compile(line)))
    return patterns


class IgnoreMatcher:
    """Decides whether a context-relative path is left out of the build context."""

    def __init__(self, patterns: list[Pattern]) -> None:
        self.patterns = patterns

    @classmethod
    def from_text(cls, text: str) -> IgnoreMatcher:
        return cls(parse_patterns(text))

    @classmethod
    def for_directory(cls, root: Path) -> IgnoreMatcher:
        path = root / ".dockerignore"
        if not path.is_file():
            return cls([])
        return cls.from_text(path.read_text(errors="replace"))

    @property
    def has_exceptions(self) -> bool:
        return any(p.exclusion for p in self.patterns)

    def ignored(self, relpath: str) -> bool:
        """True if ``relpath`` (slash-separated, no leading ``./``) is excluded."""
        relpath = posixpath.normpath(relpath).lstrip("/")
        parents = []
        parent = posixpath.dirname(relpath)
        while parent:
            parents.append(parent)
            parent = posixpath.dirname(parent)
        matched = False
        for pattern in self.patterns:
            if pattern.exclusion != matched:
                # Only a pattern that could flip the verdict matters.
                continue
            if pattern.regex.match(relpath) or any(pattern.regex.match(p) for p in parents):
                matched = not pattern.exclusion
        return matched
