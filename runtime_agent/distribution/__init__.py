"""OCI distribution client: pull images into the agent's stores and push them back.

``pull(agent, tenant, ref, auth)`` and ``push(agent, tenant, ref, auth)`` speak the
distribution HTTP API (``/v2/``) with the bearer-token dance docker does: an anonymous
request, a 401 naming the token realm, a token fetched with Basic credentials, the
request retried with that token.
"""

from __future__ import annotations

from runtime_agent.distribution.auth import BearerToken, Credentials, CredentialStore
from runtime_agent.distribution.ensure import ensure_image
from runtime_agent.distribution.errors import RegistryError
from runtime_agent.distribution.pull import PullResult, pull
from runtime_agent.distribution.push import PushResult, push
from runtime_agent.distribution.reference import Reference, parse_reference

__all__ = [
    "BearerToken",
    "CredentialStore",
    "Credentials",
    "PullResult",
    "PushResult",
    "Reference",
    "RegistryError",
    "ensure_image",
    "parse_reference",
    "pull",
    "push",
]
