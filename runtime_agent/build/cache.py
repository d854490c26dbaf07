"""The per-tenant layer cache: step key -> the image state that step produced.

A key hashes the tenant, the parent state (its config and layer digests, so a re-run
step that produced a different layer invalidates everything after it, as docker's
parent-image chain does), the instruction after expansion, the build args a RUN sees and
the content digests of COPY/ADD sources. Entries live as small JSON files under
``config.build_cache_dir/<tenant>/``; an entry whose layer blobs were garbage-collected
with the images is a miss and is dropped, so cache entries go when their layers go.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from runtime_agent.content.store import ContentStore


def digest_json(data: Any) -> str:
    return (
        "sha256:"
        + hashlib.sha256(
            json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
    )


class BuildCache:
    def __init__(self, root: Path, tenant: str, content: ContentStore) -> None:
        self.dir = root / tenant
        self.tenant = tenant
        self.content = content

    def key(self, parent: str, signature: Any) -> str:
        return digest_json({"tenant": self.tenant, "parent": parent, "step": signature})

    def _path(self, key: str) -> Path:
        return self.dir / (key.split(":", 1)[1] + ".json")

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if not all(self.content.has(layer["digest"]) for layer in entry.get("layers", [])):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
        tmp.write_text(json.dumps(entry, sort_keys=True))
        os.rename(tmp, path)

    def entries(self) -> int:
        return len(list(self.dir.glob("*.json"))) if self.dir.exists() else 0

    def prune(self, *, all_entries: bool = False) -> int:
        """Drop entries whose layers are gone (or every entry); return how many."""
        removed = 0
        if not self.dir.exists():
            return 0
        for path in self.dir.glob("*.json"):
            drop = all_entries
            if not drop:
                try:
                    entry = json.loads(path.read_text())
                    drop = not all(
                        self.content.has(layer["digest"]) for layer in entry.get("layers", [])
                    )
                except ValueError:
                    drop = True
            if drop:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed

    def layer_digests(self) -> set[str]:
        """Blobs the cache would like kept (for a GC that wants to spare warm caches)."""
        out: set[str] = set()
        if not self.dir.exists():
            return out
        for path in self.dir.glob("*.json"):
            with contextlib.suppress(ValueError, OSError):
                out.update(layer["digest"] for layer in json.loads(path.read_text())["layers"])
        return out
