"""``ensure_image``: the hook the node's container dispatch uses before creating a
container — use the image if the tenant has it, otherwise pull it with the node's login.

Only references that name a registry host are pulled; bare names (``busybox``,
``acme/tools:1``) are local images (built, imported or the shared base images) and a
missing one stays a ``NotFound``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime_agent.distribution.auth import Credentials
from runtime_agent.distribution.pull import pull
from runtime_agent.distribution.reference import parse_reference
from runtime_agent.errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from runtime_agent.agent import Agent
    from runtime_agent.images.store import Image


def ensure_image(
    agent: Agent, tenant: str, ref: str, auth: Credentials | None = None, *, always: bool = False
) -> Image:
    """The tenant's image for ``ref``, pulled first when missing (or when ``always``,
    like ``docker run --pull always``)."""
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
    result = pull(agent, tenant, ref, auth)
    return agent.images.resolve(tenant, result.local_reference)
