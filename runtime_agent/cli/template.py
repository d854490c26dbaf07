"""``--format``: the part of Go's text/template that docker's ``-f``/``--format`` use.

CI scripts read containers with ``inspect -f '{{.State.ExitCode}}'`` and list them with
``ps --format '{{.Names}}'``; the same strings work here. Supported:

* text, and actions ``{{ ... }}`` (``{{-`` and ``-}}`` trim the whitespace beside them);
* ``.`` and field chains ``.State.ExitCode`` (a missing field is an error naming it, as
  docker's typed structs make it), string and integer literals;
* functions ``json``, ``index``, ``len``, ``join``, ``lower``, ``upper``, ``title``,
  ``split``, ``println``, and pipes (``{{.Name | upper}}``: the value becomes the last
  argument);
* ``{{if X}} ... {{else}} ... {{end}}``, ``{{range X}} ... {{end}}`` (over a list or a
  map's values, in key order) and ``{{with X}} ... {{end}}``;
* ``\\t`` and ``\\n`` in the format string as tab and newline (docker does the same), and
  ``table`` in front for a header row and aligned columns (``ps`` and ``images``).

Values print as Go's ``%v`` does: ``true``/``false``, ``<nil>``, ``[a b]`` for a list,
``map[k:v]`` for a map.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from runtime_agent.errors import InvalidArgument


class TemplateError(InvalidArgument):
    """The format string doesn't parse, or a field it names doesn't exist."""


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)


@dataclass
class _Node:
    kind: str  # "text", "print", "if", "range", "with"
    text: str = ""
    pipeline: str = ""
    body: list[_Node] = field(default_factory=list)
    alternative: list[_Node] = field(default_factory=list)


def _parse(source: str) -> list[_Node]:
    """The template's tree; raises TemplateError for unbalanced blocks or empty actions."""
    root: list[_Node] = []
    stack: list[tuple[_Node | None, list[_Node]]] = [(None, root)]
    position = 0
    pending_trim = False
    for match in _ACTION.finditer(source):
        text = source[position : match.start()]
        if pending_trim:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        if text:
            stack[-1][1].append(_Node("text", text=text))
        pending_trim = bool(match.group(3))
        position = match.end()
        action = match.group(2).strip()
        word = action.split(None, 1)[0] if action else ""
        if not action:
            raise TemplateError(f"template: empty action in {source!r}")
        if word in ("if", "range", "with"):
            rest = action[len(word) :].strip()
            if not rest:
                raise TemplateError(f"template: missing value for {word}")
            node = _Node(word, pipeline=rest)
            stack[-1][1].append(node)
            stack.append((node, node.body))
        elif word == "else":
            owner = stack[-1][0]
            if owner is None or stack[-1][1] is owner.alternative:
                raise TemplateError("template: unexpected {{else}}")
            stack[-1] = (owner, owner.alternative)
        elif word == "end":
            if len(stack) == 1:
                raise TemplateError("template: unexpected {{end}}")
            stack.pop()
        else:
            stack[-1][1].append(_Node("print", pipeline=action))
    if len(stack) != 1:
        raise TemplateError("template: unexpected EOF: a block has no {{end}}")
    text = source[position:]
    if pending_trim:
        text = text.lstrip()
    if text:
        root.append(_Node("text", text=text))
    return root


def go_time(when: datetime) -> str:
    """A time as Go prints a ``time.Time`` in UTC (docker's ``CreatedAt`` columns)."""
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def go_string(value: Any) -> str:
    """``fmt.Sprint(value)`` for JSON-shaped values."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    if isinstance(value, Mapping):
        return "map[" + " ".join(f"{k}:{go_string(value[k])}" for k in sorted(value)) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(go_string(v) for v in value) + "]"
    return str(value)


def _index(container: Any, *keys: Any) -> Any:
    for key in keys:
        try:
            container = container[key]
        except (KeyError, IndexError, TypeError):
            if isinstance(container, Mapping):
                return None  # Go: the zero value for a missing map key
            raise TemplateError(
                f"template: can't index {go_string(container)} with {key!r}"
            ) from None
    return container


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _join(items: Any, separator: str) -> str:
    return separator.join(go_string(item) for item in items)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "json": _json,
    "index": _index,
    "len": len,
    "join": _join,
    "lower": lambda text: str(text).lower(),
    "upper": lambda text: str(text).upper(),
    "title": lambda text: str(text).title(),
    "split": lambda text, separator: str(text).split(separator),
    "println": lambda *values: " ".join(go_string(v) for v in values) + "\n",
}

_FIELD_CHAIN = re.compile(r"^\.([A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)?$")


_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|`[^`]*`|\||[^\s|]+')
_NO_VALUE = object()  # no value piped into a pipeline's stage yet


def _operand(part: str, dot: Any) -> Any:
    if _FIELD_CHAIN.match(part):
        value = dot
        for name in filter(None, part[1:].split(".")):
            if not isinstance(value, Mapping) or name not in value:
                raise TemplateError(f'template: executing "{part}": can\'t evaluate field {name}')
            value = value[name]
        return value
    if re.fullmatch(r"-?\d+", part):
        return int(part)
    if part in ("true", "false"):
        return part == "true"
    if part == "nil":
        return None
    if part.startswith("`"):
        return part[1:-1]
    if part.startswith('"'):
        try:
            return json.loads(part)  # Go's escapes are JSON's, near enough
        except json.JSONDecodeError:
            raise TemplateError(f"template: bad string {part}") from None
    raise TemplateError(f'template: function "{part}" not defined')


def _evaluate(pipeline: str, dot: Any) -> Any:
    stages: list[list[str]] = [[]]
    for part in _TOKEN.findall(pipeline):
        if part == "|":
            stages.append([])
        else:
            stages[-1].append(part)
    value: Any = _NO_VALUE
    for tokens in stages:
        if not tokens:
            raise TemplateError(f"template: empty command in {pipeline!r}")
        name, args = tokens[0], [_operand(t, dot) for t in tokens[1:]]
        if value is not _NO_VALUE:
            args.append(value)
        if name in FUNCTIONS:
            try:
                value = FUNCTIONS[name](*args)
            except TypeError as exc:
                raise TemplateError(f"template: {name}: {exc}") from None
        elif args:
            raise TemplateError(f"template: {name} is not a function")
        else:
            value = _operand(name, dot)
    return value


def _render(nodes: Sequence[_Node], dot: Any, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "print":
            out.append(go_string(_evaluate(node.pipeline, dot)))
        else:
            value = _evaluate(node.pipeline, dot)
            if node.kind == "range":
                items = [value[k] for k in sorted(value)] if isinstance(value, Mapping) else value
                if items:
                    for item in items:
                        _render(node.body, item, out)
                else:
                    _render(node.alternative, dot, out)
            elif value:  # Go's truth: false, 0, nil and empty strings, lists, maps fail
                _render(node.body, value if node.kind == "with" else dot, out)
            else:
                _render(node.alternative, dot, out)


@dataclass(frozen=True)
class Template:
    """A parsed ``--format`` string; ``render(obj)`` is one object's output."""

    text: str  # the format with its escapes turned into tabs and newlines, without "table"
    nodes: tuple[_Node, ...]
    table: bool

    @classmethod
    def parse(cls, source: str) -> Template:
        text = source.replace("\\t", "\t").replace("\\n", "\n")
        table = text.startswith("table")
        if table:
            text = text[len("table") :].lstrip(" ")
        return cls(text, tuple(_parse(text)), table)

    def render(self, value: Any) -> str:
        out: list[str] = []
        _render(self.nodes, value, out)
        return "".join(out)

    def header(self, names: Mapping[str, str]) -> str:
        """The ``table`` header: each ``{{.Field}}`` as ``names[Field]`` (or FIELD)."""

        def title(match: re.Match[str]) -> str:
            inner = match.group(2).strip()
            if inner.startswith(".") and _FIELD_CHAIN.match(inner):
                key = inner[1:]
                return names.get(key, key.upper())
            return ""

        return _ACTION.sub(title, self.text)


def print_rows(template: Template, rows: Sequence[Any], names: Mapping[str, str]) -> None:
    """``rows`` through ``template``, one per line; for ``table``, a header first and the
    tab-separated cells aligned as docker's tabwriter aligns them (a column is its widest
    cell plus 3 spaces, and at least 10 wide)."""
    lines = [template.render(row) for row in rows]
    if not template.table:
        for line in lines:
            print(line)
        return
    grid = [line.split("\t") for line in [template.header(names), *lines]]
    columns = max(len(cells) for cells in grid)
    widths = [
        max(10, 3 + max((len(cells[i]) for cells in grid if i < len(cells) - 1), default=0))
        for i in range(columns)
    ]
    for cells in grid:
        last = len(cells) - 1
        line = "".join(c if i == last else c.ljust(widths[i]) for i, c in enumerate(cells))
        print(line.rstrip())


def print_inspected(found: Sequence[Any], template: Template | None) -> None:
    """``inspect``'s output: the objects as a JSON list, or each through ``-f``."""
    if template is None:
        print(json.dumps(list(found), indent=4))
    else:
        print_rows(template, found, {})


def add_format_argument(parser: Any, example: str) -> None:
    """``-f``/``--format`` for an ``inspect`` command."""
    parser.add_argument("-f", "--format", help=f"a Go template per object, e.g. '{example}'")
