"""``ensure_image``: the hook the node's container dispatch uses before creating a
container — use the image if the tenant has it, otherwise pull it for the tenant.

Only references that name a registry host are pulled; bare names (``busybox``,
``acme/tools:1``) are local images (built, imported or the shared base images) and a
missing one stays a ``NotFound``. A dispatched container's pull is authorized for its
tenant (``tenant_auth``, see :mod:`runtime_agent.distribution.tenant_auth`), never with
the node's own logins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from runtime_agent.distribution.auth import BearerToken, Credentials
from runtime_agent.distribution.pull import pull
from runtime_agent.distribution.reference import parse_reference
from runtime_agent.errors import InvalidArgument, NotFound
from runtime_agent.fetch import check_pull_allowed

if TYPE_CHECKING:
    from runtime_agent.agent import Agent
    from runtime_agent.images.store import Image

#: Fetches the pull authorization of one tenant for one image (None: anonymous).
TenantAuth = Callable[[], BearerToken | None]


def ensure_image(
    agent: Agent,
    tenant: str,
    ref: str,
    auth: Credentials | None = None,
    *,
    always: bool = False,
    tenant_auth: TenantAuth | None = None,
) -> Image:
    """The tenant's image for ``ref``, pulled first when missing (or when ``always``,
    like ``docker run --pull always``).

    With ``tenant_auth`` the pull uses what it returns, asked for only when a pull is
    needed, and the node's stored logins are never tried.
    """
    if not always:
        try:
            return agent.images.resolve(tenant, ref)
        except NotFound:
            pass
    try:
        parse_reference(ref)
    except InvalidArgument:
        if always:
            raise
        raise NotFound(f"No such image: {ref}", reference=ref, tenant=tenant) from None
    # A tenant's image may only name a registry the operator allows (netpolicy): the node
    # would otherwise call whatever host:port the reference names, its own included.
    check_pull_allowed(agent.config, ref, tenant=tenant)
    if tenant_auth is not None:
        result = pull(agent, tenant, ref, tenant_auth(), use_node_login=False)
    else:
        result = pull(agent, tenant, ref, auth)
    return agent.images.resolve(tenant, result.local_reference)
