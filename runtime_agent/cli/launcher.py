"""Write ``berth-agent`` as a launcher that starts Python without the site module.

pip's console script for ``runtime_agent.cli:entry_point`` starts a normal interpreter,
and the site module (virtualenv and ``.pth`` processing, ``os``) costs every command
~4 ms here, against ~11 ms for the interpreter itself. A command the CLI server runs
needs none of it: its client (:mod:`runtime_agent.cliclient`) uses only built-in modules.
The launcher starts Python with ``-S`` and puts the directory holding ``runtime_agent``
on ``sys.path`` itself; ``entry_point`` loads site when the command runs in-process
after all (no server).

pip cannot write such a script (it drops interpreter options from shebangs), so
``infra/setup.sh`` runs ``python -m runtime_agent.cli.launcher`` after ``pip install``;
without it, pip's script works the same, only slower.
"""

from __future__ import annotations

import argparse
import os
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


def install(scripts_dir: Path, python: str | None = None) -> Path:
    """Write ``scripts_dir/berth-agent`` for this interpreter and this ``runtime_agent``
    (replacing pip's script atomically); returns its path."""
    python = python or sys.executable
    root = str(Path(runtime_agent.__file__).resolve().parent.parent)
    target = scripts_dir / "berth-agent"
    tmp = scripts_dir / ".berth-agent.tmp"
    tmp.write_text(render(python, root))
    tmp.chmod(0o755)
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime_agent.cli.launcher",
        description="Write berth-agent as a launcher without the site module (~4 ms per command).",
    )
    parser.add_argument(
        "--scripts-dir",
        type=Path,
        default=Path(sysconfig.get_path("scripts")),
        help="where pip put the console script (default: this interpreter's scripts directory)",
    )
    args = parser.parse_args(argv)
    print(install(args.scripts_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
