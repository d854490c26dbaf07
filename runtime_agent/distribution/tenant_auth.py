"""Pull credentials for a tenant's container: a token the control plane mints for that
tenant, asked for right before the pull (``protocol.PULL_TOKEN_PATH``).

A node pulls a tenant's image with the tenant's rights, never its own: the token reaches
only the one repository, and only if the tenant may read it (its own or a public one).
The node's stored registry logins are not used for tenants' pulls at all, so naming
another tenant's private image, or spelling the registry differently, gets nothing the
tenant could not get itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urljoin

import requests

from runtime_agent import protocol
from runtime_agent.distribution.auth import BearerToken
from runtime_agent.distribution.errors import RegistryDenied, RegistryError

if TYPE_CHECKING:
    from runtime_agent.node import NodeIdentity

FETCH_TIMEOUT = 30.0


def _refusal(response: requests.Response) -> str:
    """The message of an error in the API's format (``{"error": {"message"}}``)."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.reason or f"HTTP {response.status_code}"


def fetch_pull_token(identity: NodeIdentity, tenant: str, image: str) -> BearerToken | None:
    """The token to pull ``image`` for ``tenant`` with, now; None: pull anonymously (the
    image is not on the platform's registry).

    Raises :class:`RegistryDenied` with the control plane's reason when it refuses (no
    such container here, or the tenant may not read that repository), RegistryError when
    it cannot be reached.
    """
    url = urljoin(identity.control_url, protocol.PULL_TOKEN_PATH)
    if not url.startswith(("http://", "https://")):
        raise RegistryError(f"the control plane URL {url!r} is not http(s)")
    headers = {
        protocol.NODE_ID_HEADER: identity.node_id,
        protocol.NODE_CREDENTIAL_HEADER: identity.credential,
    }
    body = {"tenant": tenant, "image": image}
    try:
        response = requests.post(url, json=body, headers=headers, timeout=FETCH_TIMEOUT)
        token = response.json().get("token") if response.ok else None
    except (requests.RequestException, ValueError, AttributeError) as exc:
        raise RegistryError(
            f"cannot pull {image} for tenant {tenant}: no pull token: {exc}"
        ) from None
    if not response.ok:
        raise RegistryDenied(
            f"cannot pull {image} for tenant {tenant}: the control plane refused "
            f"({response.status_code}): {_refusal(response)}",
            status=response.status_code,
            registry_code="DENIED",
        )
    if token is None:
        return None
    if not isinstance(token, str) or not token:
        raise RegistryError(f"cannot pull {image}: the control plane sent no pull token")
    # A pull that outlives this short-lived token asks for the next one the same way.
    return BearerToken(token, renew=lambda: _renewed(identity, tenant, image))


def _renewed(identity: NodeIdentity, tenant: str, image: str) -> str:
    fresh = fetch_pull_token(identity, tenant, image)
    if fresh is None:
        raise RegistryError(f"cannot pull {image}: the control plane stopped issuing tokens")
    return fresh.token
