"""A forked child that enters or makes namespaces and holds them while the agent works
with its ``/proc/<pid>/ns/*`` files.

Some namespace operations are for single-threaded processes only: ``unshare`` or
``setns`` of a user namespace fails in a process with threads, and the agent has them.
A forked child is single-threaded; it does the namespace calls (``enter``, async-signal-
safe system calls only), then waits until the caller has opened, bound or written what
it needed (uid maps, a bind mount of its namespace), and exits.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def held_namespaces(enter: Callable[[], bool], what: str) -> Iterator[int]:
    """Fork a child that runs ``enter`` and waits; yields its pid while it waits.

    ``enter`` returns False when a call failed: then ``OSError`` (naming ``what``) is
    raised here. The child is reaped when the context ends.
    """
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    try:
        pid = os.fork()
    except BaseException:
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
        raise
    if pid == 0:  # child: no Python-level locks or allocations that could be held
        try:
            os.close(ready_r)
            os.close(done_w)
            os.write(ready_w, b"1" if enter() else b"0")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(errno.EPERM, f"{what} failed")
        yield pid
    finally:
        os.write(done_w, b"x")
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


NS_GET_USERNS = 0xB701  # linux/nsfs.h: an fd of the user namespace owning a namespace


def owning_userns(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the user namespace that owns the namespace at ``path`` (a bind
    mount or /proc/<pid>/ns/*), comparable with ``os.stat`` of a bound user namespace;
    None if it can't be read."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        st = os.fstat(owner)
        return st.st_dev, st.st_ino
    finally:
        os.close(owner)
