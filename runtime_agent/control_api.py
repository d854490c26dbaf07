"""Requests from this node to the control plane over HTTP, signed with the node credential.

Everything a node tells the control plane (reports, build logs and results) and the
service secrets it needs travel here, not through the broker: the node's broker user may
only consume its own queue and write its own results (``workloads.services.broker``).
Bodies and answers are never logged (a secrets answer carries tenants' secrets).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import requests

from runtime_agent import protocol
from runtime_agent.errors import AgentError, FailedPrecondition

if TYPE_CHECKING:
    from runtime_agent.node import NodeIdentity

TIMEOUT = 30.0


def _url(identity: NodeIdentity, path: str) -> str:
    url = urljoin(identity.control_url, path)
    if not url.startswith(("http://", "https://")):
        raise AgentError(f"the control plane URL {url!r} is not http(s)")
    return url


def _headers(identity: NodeIdentity) -> dict[str, str]:
    return {
        protocol.NODE_ID_HEADER: identity.node_id,
        protocol.NODE_CREDENTIAL_HEADER: identity.credential,
    }


def _refusal(response: requests.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.reason or f"HTTP {response.status_code}"


def request(
    identity: NodeIdentity, method: str, path: str, *, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``method path`` with the node's headers; the JSON answer. A refusal or an
    unreachable control plane is FailedPrecondition naming the path, not the payload."""
    try:
        response = requests.request(
            method, _url(identity, path), json=body, headers=_headers(identity), timeout=TIMEOUT
        )
    except requests.RequestException as exc:
        raise FailedPrecondition(
            f"cannot reach the control plane for {path}: {type(exc).__name__}"
        ) from None
    if not response.ok:
        raise FailedPrecondition(
            f"the control plane refused {method} {path} ({response.status_code}): "
            f"{_refusal(response)}"
        )
    try:
        answer = response.json()
    except ValueError:
        raise FailedPrecondition(f"the control plane answered {path} with no JSON") from None
    if not isinstance(answer, dict):
        raise FailedPrecondition(f"the control plane answered {path} with no object")
    return answer


def send_node_report(identity: NodeIdentity, report: protocol.NodeReport) -> None:
    request(identity, "POST", protocol.NODE_REPORT_PATH, body=protocol.to_dict(report))


def send_build_report(identity: NodeIdentity, report: protocol.BuildReport) -> None:
    path = protocol.BUILD_REPORT_PATH.format(build_id=report.build_id)
    request(identity, "POST", path, body=protocol.to_dict(report))


def fetch_container_secrets(identity: NodeIdentity, container_id: str) -> dict[str, str]:
    """The service secrets of a container placed on this node (name -> value)."""
    path = protocol.CONTAINER_SECRETS_PATH.format(container_id=container_id)
    env = request(identity, "GET", path).get("env")
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise FailedPrecondition(f"the control plane answered {path} with no secrets mapping")
    return env
