"""Image references for remote registries: ``host[:port]/path/name[:tag][@digest]``.

Berth's registry namespaces repositories by tenant: ``registry.example.com/acme/web:1``.
The host is required (there is no implicit Docker Hub: nodes pull from Berth's registry or
another one named explicitly).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from runtime_agent.errors import InvalidArgument
from runtime_agent.images.reference import is_registry_host

# From the distribution reference grammar.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_HOST = re.compile(r"^(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(ref: str) -> Reference:
    """Parse and validate a remote reference; a bare tag defaults to ``latest``."""
    original = ref
    digest = None
    if "@" in ref:
        ref, digest = ref.rsplit("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidArgument(f"invalid digest in reference {original!r}: {digest!r}")
    host, sep, rest = ref.partition("/")
    if not sep or not is_registry_host(host):
        raise InvalidArgument(
            f"reference {original!r} must name its registry host, e.g. 127.0.0.1:5000/acme/web:1"
        )
    if not _HOST.match(host):
        raise InvalidArgument(f"invalid registry host in reference {original!r}")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG.match(tag):
            raise InvalidArgument(f"invalid tag in reference {original!r}: {tag!r}")
    if not _PATH.match(rest) or len(rest) > 255:
        raise InvalidArgument(
            f"invalid repository name in reference {original!r}: lowercase letters, digits "
            "and separators (. _ - /) only"
        )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=host, repository=rest, tag=tag, digest=digest)
