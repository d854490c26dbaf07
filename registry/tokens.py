"""Bearer tokens for the registry (docker's token authentication, as distribution checks it).

distribution 2.8 accepts an RS256 JWT when its header ``kid`` names a key in its
``rootcertbundle`` (by libtrust key id), ``iss`` equals its configured issuer, ``aud`` is
a plain string equal to its service name, and ``exp``/``nbf`` bracket now. The ``access``
claim lists what the bearer may do: ``[{"type": "repository", "name": "acme/web",
"actions": ["pull", "push"]}]``.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey


def libtrust_key_id(private_key: RSAPrivateKey) -> str:
    """The key id libtrust (and so distribution) derives from a public key.

    base32 of the first 30 bytes of sha256(DER SubjectPublicKeyInfo), in 12 groups of 4
    characters joined by ':'.
    """
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, 48, 4))


@lru_cache(maxsize=4)
def load_signing_key(path: str) -> tuple[RSAPrivateKey, str]:
    """The PEM private key at ``path`` and its key id (cached: read once per process)."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, RSAPrivateKey):
        raise ValueError(f"{path}: the registry token key must be an RSA key")
    return key, libtrust_key_id(key)


@dataclass(frozen=True)
class Access:
    """One granted scope: ``repository:acme/web:pull,push`` → Access("repository", ...)."""

    type: str
    name: str
    actions: tuple[str, ...] = field(default_factory=tuple)

    def as_claim(self) -> dict[str, object]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int
    issued_at: str


def issue_token(
    *,
    key_path: str,
    issuer: str,
    service: str,
    subject: str,
    access: list[Access],
    lifetime: int = 300,
    now: float | None = None,
) -> IssuedToken:
    """Sign a registry bearer token granting ``access`` to ``subject`` for ``lifetime`` s."""
    key, kid = load_signing_key(key_path)
    issued = int(now if now is not None else time.time())
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": service,
        "exp": issued + lifetime,
        "nbf": issued - 10,
        "iat": issued,
        "jti": secrets.token_hex(16),
        "access": [a.as_claim() for a in access],
    }
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})
    issued_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issued))
    return IssuedToken(token=token, expires_in=lifetime, issued_at=issued_at)


def parse_scope(scope: str) -> Access | None:
    """Parse ``type:name:actions`` (name may contain ':' for a port); None if malformed."""
    head, sep, actions = scope.rpartition(":")
    if not sep:
        return None
    type_, sep, name = head.partition(":")
    if not sep or not type_ or not name:
        return None
    parsed = tuple(a for a in actions.split(",") if a)
    return Access(type_, name, parsed)
