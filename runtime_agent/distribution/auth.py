"""Registry credentials: what ``berth-agent login`` stores and what pulls present.

Credentials are a username and a secret (a tenant's API token, or the node credential
``node-<node-name>`` / per-node secret the control plane issues). They are only ever sent
to the registry's token realm (Basic auth), never to the registry itself.

A :class:`BearerToken` is a registry token the control plane already minted (a build's
push token, scoped to one repository): it goes straight to the registry, with no round
trip to the realm, and is never stored.

``CredentialStore`` keeps logins per registry host in ``<root>/registry-auth.json``
(mode 0600), like docker's ``config.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials(username={self.username!r}, password=***)"


@dataclass(frozen=True)
class BearerToken:
    """A pre-issued registry bearer token (a JWT from the control plane's token server).

    ``renew``, when given, fetches a fresh one: the client calls it shortly before the
    token expires and once after the registry refuses it, so an operation that outlives
    one short-lived token (a big push) goes on with the next.
    """

    token: str
    renew: Callable[[], str] | None = field(default=None, compare=False)

    def __repr__(self) -> str:  # never print the secret
        return "BearerToken(***)"


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (epoch seconds), read without verifying; None if absent.

    Only used to renew in time: the registry verifies the token, not us.
    """
    import jwt

    try:
        return float(jwt.decode(token, options={"verify_signature": False})["exp"])
    except (jwt.PyJWTError, KeyError, TypeError, ValueError):
        return None


class CredentialStore:
    """Per-registry logins on this node, written atomically with owner-only permissions."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, data: dict[str, dict[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".registry-auth.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def registries(self) -> list[str]:
        """The registry hosts this node holds a login for."""
        return sorted(self._load())

    def get(self, registry: str) -> Credentials | None:
        entry = self._load().get(registry)
        if not entry:
            return None
        return Credentials(entry["username"], entry["password"])

    def set(self, registry: str, credentials: Credentials) -> None:
        data = self._load()
        data[registry] = {"username": credentials.username, "password": credentials.password}
        self._save(data)

    def remove(self, registry: str) -> bool:
        data = self._load()
        if data.pop(registry, None) is None:
            return False
        self._save(data)
        return True
