"""Encryption of service secrets at rest (Fernet: AES-128-CBC + HMAC-SHA256).

The key comes from ``BERTH_SECRETS_KEY`` (a Fernet key) or, when unset, is derived from
``SECRET_KEY`` with HKDF so that a development install works without extra set-up.
Secrets are decrypted only to build the container spec sent to the node; the API shows
their names, never their values.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings

#: A generous cap per value; bigger blobs belong in volumes, not environment variables.
MAX_SECRET_BYTES = 64 * 1024


@lru_cache(maxsize=1)
def _fernet() -> Fernet:
    configured = getattr(settings, "BERTH_SECRETS_KEY", "")
    if configured:
        return Fernet(configured.encode())
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"berth-secrets", info=b"service-secrets"
    ).derive(settings.SECRET_KEY.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def encrypt_secrets(values: dict[str, str]) -> str:
    return _fernet().encrypt(json.dumps(values, sort_keys=True).encode()).decode()


def decrypt_secrets(token: str) -> dict[str, str]:
    if not token:
        return {}
    try:
        return dict(json.loads(_fernet().decrypt(token.encode())))
    except InvalidToken:
        raise ValueError("service secrets cannot be decrypted with the configured key") from None
