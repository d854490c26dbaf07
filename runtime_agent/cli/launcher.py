"""Write ``berth-agent``: a native client in front of a Python launcher without site.

pip's console script for ``runtime_agent.cli:entry_point`` starts a normal interpreter:
~8 ms of Python start-up here, plus ~4 ms for the site module (virtualenv and ``.pth``
processing, ``os``), on every command, for a served command whose client only connects
to a socket and waits. So ``install`` writes two programs into the scripts directory:

* ``berth-agent-py``: a launcher that starts Python with ``-S`` and puts the directory
  holding ``runtime_agent`` on ``sys.path`` itself; ``entry_point`` loads site when the
  command runs in-process after all (no server).
* ``berth-agent``: ``client.c`` (next to this module) compiled with the host's C
  compiler, the same client as :mod:`runtime_agent.cliclient` in ~0.5 ms instead of
  ~8 ms. A command it can't hand to the server it hands to ``berth-agent-py`` (exec,
  same arguments). Without a compiler, or when compiling fails, ``berth-agent`` is the
  Python launcher itself: the same commands, only slower.

pip cannot write either (it drops interpreter options from shebangs), so
``infra/setup.sh`` runs ``python -m runtime_agent.cli.launcher`` after ``pip install``;
without it, pip's script works the same, only slower.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import runtime_agent

TEMPLATE = """\
#!{python} -S
# berth-agent, written by `python -m runtime_agent.cli.launcher` (infra/setup.sh) over
# pip's console script: the same entry point, started without the site module.
import sys
sys.path.append({root!r})
from runtime_agent.cli import entry_point
sys.exit(entry_point())
"""


def render(python: str, root: str) -> str:
    if any(ch.isspace() for ch in python):
        raise ValueError(f"a shebang can't hold an interpreter path with spaces: {python!r}")
    return TEMPLATE.format(python=python, root=root)


def install(scripts_dir: Path, python: str | None = None, *, native: bool = True) -> Path:
    """Write ``scripts_dir/berth-agent-py`` for this interpreter and this
    ``runtime_agent``, and ``scripts_dir/berth-agent`` (the native client when it
    compiles and ``native``, else the same launcher), each replaced atomically; returns
    the path of ``berth-agent``."""
    python = python or sys.executable
    root = str(Path(runtime_agent.__file__).resolve().parent.parent)
    script = render(python, root)
    fallback = scripts_dir / "berth-agent-py"
    _write(fallback, script)
    target = scripts_dir / "berth-agent"
    if not (native and compile_client(fallback, target)):
        _write(target, script)
    return target


def compile_client(fallback: Path, target: Path) -> bool:
    """Build the native client into ``target`` (replacing it atomically), with
    ``fallback`` as the program it execs for commands it doesn't hand over. False when
    there is no C compiler or the build fails (``target`` is then left as it was)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    text = str(fallback.absolute())
    if compiler is None or any(ch in text for ch in '"\\\n'):
        return False  # the path is baked in as a C string literal: keep it plain
    tmp = target.with_name(f".{target.name}.build")
    result = subprocess.run(
        [compiler, "-O2", "-Wall", "-o", str(tmp), str(Path(__file__).with_name("client.c")),
         f'-DBERTH_FALLBACK="{text}"'],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        sys.stderr.write(f"berth-agent: the native client didn't build; using Python:\n"
                         f"{result.stderr}")  # fmt: skip
        return False
    os.replace(tmp, target)
    return True


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime_agent.cli.launcher",
        description="Write berth-agent: a native client (when a C compiler is there) in "
        "front of a Python launcher without the site module.",
    )
    parser.add_argument(
        "--scripts-dir",
        type=Path,
        default=Path(sysconfig.get_path("scripts")),
        help="where pip put the console script (default: this interpreter's scripts directory)",
    )
    parser.add_argument("--python-only", action="store_true", help="don't build the native client")
    args = parser.parse_args(argv)
    print(install(args.scripts_dir, native=not args.python_only))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
