"""Docker's word processing for Dockerfile arguments: quotes, escapes and ``$VAR``.

A port of BuildKit's ``frontend/dockerfile/shell`` lexer, which docker's legacy builder
uses too, so a Dockerfile expands here exactly as it does under ``docker build``:
``$V``, ``${V}``, ``${V:-word}``, ``${V:+word}``, ``${V-word}``, ``${V+word}``,
``${V:?msg}``; single quotes are literal; inside double quotes only ``\\"``, ``\\$`` and
``\\\\`` are escapes; outside quotes the escape character escapes anything. Unset variables
expand to the empty string. ``process_words`` also splits on unquoted whitespace (and on
whitespace inside expanded values), as EXPOSE does.
"""

from __future__ import annotations

from collections.abc import Mapping

from runtime_agent.errors import InvalidArgument

_EOF = ""


class _Words:
    """Tracks word boundaries the way BuildKit's ``wordsStruct`` does."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.word = ""
        self.in_word = False

    def add_char(self, ch: str) -> None:
        if ch.isspace() and self.in_word:
            if self.word:
                self.words.append(self.word)
                self.word = ""
                self.in_word = False
        elif not ch.isspace():
            self.add_raw_char(ch)

    def add_raw_char(self, ch: str) -> None:
        self.word += ch
        self.in_word = True

    def add_string(self, text: str) -> None:
        for ch in text:
            self.add_char(ch)

    def add_raw_string(self, text: str) -> None:
        self.word += text
        self.in_word = True

    def get_words(self) -> list[str]:
        if self.word:
            self.words.append(self.word)
            self.word = ""
            self.in_word = False
        return self.words


class _Lexer:
    def __init__(self, text: str, env: Mapping[str, str], escape: str) -> None:
        self.text = text
        self.pos = 0
        self.env = env
        self.escape = escape

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else _EOF

    def next(self) -> str:
        ch = self.peek()
        if ch:
            self.pos += 1
        return ch

    def process(self, stop: str = _EOF) -> tuple[str, list[str]]:
        result: list[str] = []
        words = _Words()
        while self.peek() != _EOF:
            ch = self.peek()
            if stop and ch == stop:
                self.next()
                return "".join(result), words.get_words()
            if ch in ("'", '"', "$"):
                if ch == "'":
                    tmp = self.single_quote()
                elif ch == '"':
                    tmp = self.double_quote()
                else:
                    tmp = self.dollar()
                result.append(tmp)
                if ch == "$":
                    words.add_string(tmp)
                else:
                    words.add_raw_string(tmp)
                continue
            ch = self.next()
            if ch == self.escape:
                ch = self.next()
                if ch == _EOF:
                    break
                words.add_raw_char(ch)
            else:
                words.add_char(ch)
            result.append(ch)
        if stop:
            raise InvalidArgument(f"unexpected end of statement while looking for matching {stop}")
        return "".join(result), words.get_words()

    def single_quote(self) -> str:
        self.next()
        out: list[str] = []
        while True:
            ch = self.next()
            if ch == _EOF:
                raise InvalidArgument(
                    "unexpected end of statement while looking for matching single-quote"
                )
            if ch == "'":
                return "".join(out)
            out.append(ch)

    def double_quote(self) -> str:
        self.next()
        out: list[str] = []
        while True:
            ch = self.peek()
            if ch == _EOF:
                raise InvalidArgument(
                    "unexpected end of statement while looking for matching double-quote"
                )
            if ch == '"':
                self.next()
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
                continue
            ch = self.next()
            if ch == self.escape:
                following = self.peek()
                if following == _EOF:
                    continue
                if following in ('"', "$", self.escape):
                    ch = self.next()
            out.append(ch)

    def name(self) -> str:
        out: list[str] = []
        while self.peek() != _EOF:
            ch = self.peek()
            if not out and ch.isdigit():
                while self.peek() != _EOF and self.peek().isdigit():
                    out.append(self.next())
                return "".join(out)
            if not out and ch in "@*#?-$!0":
                return self.next()
            if not (ch.isalnum() or ch == "_"):
                break
            out.append(self.next())
        return "".join(out)

    def dollar(self) -> str:
        self.next()
        if self.peek() != "{":
            name = self.name()
            if not name:
                return "$"
            return self.env.get(name, "")
        self.next()
        if self.peek() == _EOF:
            raise InvalidArgument("syntax error: missing '}'")
        if self.peek() in "{}:":
            raise InvalidArgument("syntax error: bad substitution")
        name = self.name()
        ch = self.next()
        if ch == "}":
            return self.env.get(name, "")
        if ch in ("-", "+", "?"):
            word, _ = self.process("}")
            return self._modify(name, ch, word, colon=False)
        if ch == ":":
            modifier = self.next()
            word, _ = self.process("}")
            if modifier not in ("-", "+", "?"):
                raise InvalidArgument(f"unsupported modifier ({modifier}) in substitution")
            return self._modify(name, modifier, word, colon=True)
        raise InvalidArgument(f"missing ':' in substitution of {name!r}")

    def _modify(self, name: str, modifier: str, word: str, *, colon: bool) -> str:
        is_set = name in self.env
        value = self.env.get(name, "")
        usable = bool(value) if colon else is_set
        if modifier == "-":
            return value if usable else word
        if modifier == "+":
            return word if usable else value
        if not usable:
            raise InvalidArgument(f"{name}: {word or 'is not allowed to be unset'}")
        return value


def process_word(text: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """Expand one word (quotes removed, whitespace kept), as ENV/LABEL/WORKDIR/COPY do."""
    return _Lexer(text, env, escape).process()[0]


def process_words(text: str, env: Mapping[str, str], escape: str = "\\") -> list[str]:
    """Expand and split on unquoted whitespace, as EXPOSE and VOLUME (shell form) do."""
    return _Lexer(text, env, escape).process()[1]


def referenced_names(text: str, escape: str = "\\") -> set[str]:
    """Names a word would read when expanded; the cache key only covers args actually used."""
    seen: set[str] = set()

    class _Recorder(dict[str, str]):
        def get(self, key: str, default: str | None = None) -> str:  # type: ignore[override]
            seen.add(key)
            return ""

        def __contains__(self, key: object) -> bool:
            if isinstance(key, str):
                seen.add(key)
            return False

    try:
        _Lexer(text, _Recorder(), escape).process()
    except InvalidArgument:
        pass
    return seen
