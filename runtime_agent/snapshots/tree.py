"""Deleting directory trees of any depth (snapshots, layers, leftovers of crashes).

Kept apart from ``unpack`` so removing a snapshot (every ``rm``) doesn't import the tar
machinery.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def remove_tree(path: Path) -> None:
    """Delete a directory tree of any depth; absent is fine.

    ``shutil.rmtree`` recurses once per level (Python's recursion limit); a deeper tree,
    which a tenant can create, goes to ``rm``, which walks it iteratively, and never
    crosses into another mount.
    """
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except RecursionError:
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=False)
