"""Container logs as conmon writes them (k8s-file format), read back for ``logs``.

Each line of ``ctr.log`` is ``<RFC3339Nano time> <stdout|stderr> <P|F> <text>``; ``P``
marks a partial line (conmon splits long lines) that continues in the next entry of the
same stream. conmon caps the file at ``LOG_SIZE_MAX``: when it would grow beyond, the
file is rotated (started afresh), so a chatty container can't fill the disk.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LogEntry:
    time: str  # RFC 3339 with nanoseconds, as conmon wrote it
    stream: str  # "stdout" or "stderr"
    line: bytes  # without the trailing newline
    # The output ended without a newline (``printf abc``): print no newline after it.
    partial: bool = False


class _Joiner:
    """Joins partial entries (``P``) with what follows them in the same stream, across
    any number of ``feed`` calls (a follower reads the file as it grows; conmon may have
    written only the first part of a line yet)."""

    def __init__(self) -> None:
        self.pending: dict[str, tuple[str, list[bytes]]] = {}

    def feed(self, raw_lines: Iterator[bytes]) -> Iterator[LogEntry]:
        for raw in raw_lines:
            raw = raw.rstrip(b"\n")
            parts = raw.split(b" ", 3)
            if len(parts) < 3:
                continue
            stamp, stream, tag = (p.decode(errors="replace") for p in parts[:3])
            text = parts[3] if len(parts) == 4 else b""
            first_time, chunks = self.pending.get(stream, (stamp, []))
            chunks.append(text)
            if tag == "P":
                self.pending[stream] = (first_time, chunks)
                continue
            self.pending.pop(stream, None)
            yield LogEntry(first_time, stream, b"".join(chunks))

    def flush(self) -> Iterator[LogEntry]:
        """What is left once the output is over: a last line without a newline."""
        for stream, (first_time, chunks) in sorted(self.pending.items(), key=lambda i: i[1][0]):
            yield LogEntry(first_time, stream, b"".join(chunks), partial=True)
        self.pending.clear()


def parse_lines(raw_lines: Iterator[bytes]) -> Iterator[LogEntry]:
    """Join partial entries and yield whole lines (and a last one without a newline)."""
    joiner = _Joiner()
    yield from joiner.feed(raw_lines)
    yield from joiner.flush()


def _read_lines(path: Path) -> list[bytes]:
    try:
        with open(path, "rb") as fh:
            return fh.readlines()
    except FileNotFoundError:
        return []


def read_logs(path: Path, *, tail: int | None = None, since: str | None = None) -> list[LogEntry]:
    """The whole log (or its last ``tail`` lines, or lines at or after ``since``)."""
    entries: Iterator[LogEntry] = parse_lines(iter(_read_lines(path)))
    if since:
        entries = (e for e in entries if e.time >= since)
    if tail is not None:
        if tail <= 0:
            return []
        return list(deque(entries, maxlen=tail))
    return list(entries)


def follow_logs(
    path: Path,
    *,
    tail: int | None = None,
    done: Callable[[], bool],
    poll_interval: float = 0.05,  # the longest wait between reads
    pause: Callable[[float], None] = time.sleep,
) -> Iterator[LogEntry]:
    """Yield the log's lines, then new ones as they come, until ``done()`` and drained.

    A rotation is followed onto the new file, as ``tail -F`` does: the file stays open
    between reads, and once ``path`` names another file (conmon writes a new one and
    renames it over the old), the old one is read to its end, then the new one from its
    start. Holding the old file open also keeps its inode number from being reused: found
    by name again and again, a file made two rotations later may get that number back
    and would look like the one already half read.

    ``pause(seconds)`` waits between reads; it may return early (the container's
    monitor exiting: then ``done()`` is checked at once instead of after the back-off).
    """
    fh = None
    buffer = b""
    joiner = _Joiner()  # partial lines carry over between reads (and rotations)
    first = True
    finished = False
    delay = 0.001  # short right after output or start: a fast container's end shows at once
    try:
        while True:
            rotated = False
            if fh is None:
                try:
                    fh = open(path, "rb")
                except FileNotFoundError:
                    fh = None
            if fh is not None:
                data = fh.read()
                try:
                    rotated = os.stat(path).st_ino != os.fstat(fh.fileno()).st_ino
                except FileNotFoundError:
                    rotated = False  # removed, not replaced: keep what is open
                if rotated:
                    data += fh.read()  # written between the read and the stat
                    fh.close()
                    fh = None
                buffer += data
                lines = buffer.split(b"\n")
                buffer = lines.pop()
                complete = [line + b"\n" for line in lines]
                entries = list(joiner.feed(iter(complete)))
                if first and tail is not None:
                    entries = entries[-tail:] if tail > 0 else []
                first = False
                if entries:
                    delay = 0.001
                yield from entries
            if rotated:
                continue  # the new file at once
            if finished:
                yield from joiner.flush()
                return
            if done():
                finished = True  # one more read drains what conmon wrote before exiting
                continue
            pause(delay)
            delay = min(delay * 2, poll_interval)
    finally:
        if fh is not None:
            fh.close()
