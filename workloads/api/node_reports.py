"""What nodes tell the control plane and the secrets they fetch, over HTTP with the node
credential (``protocol.NODE_REPORT_PATH``, ``BUILD_REPORT_PATH``,
``CONTAINER_SECRETS_PATH``).

These replace Celery tasks on the shared ``control`` queue: a node's broker user can
enqueue nothing, so a node cannot run any control-plane task, and a report is accepted
only for the node that authenticated the request.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from runtime_agent import protocol
from tenants.errors import InvalidInput, PermissionDenied
from workloads.api.storage_builds import NodeCredentialView
from workloads.services import builds, nodes, reports

R = TypeVar("R", protocol.NodeReport, protocol.BuildReport)


def _signed_report(request: Request, kind: type[R], node_id: str, credential: str) -> R:
    """The body as a ``kind`` of the authenticated node (403 if it names another node)."""
    if not isinstance(request.data, dict):
        raise InvalidInput("the report must be a JSON object")
    try:
        report = protocol.from_dict(kind, request.data)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidInput(f"malformed {kind.__name__}: {exc}") from None
    # The credential is checked once, by the service the report goes to.
    if report.node_id != node_id:
        raise PermissionDenied("a node reports only for itself")
    return dataclasses.replace(report, credential=credential)


class NodeReportView(NodeCredentialView):
    """``POST`` a :class:`~runtime_agent.protocol.NodeReport` (the heartbeat)."""

    @extend_schema(exclude=True)
    def post(self, request: Request) -> Response:
        node_id, credential = self.node_headers(request)
        reports.handle_node_report(
            _signed_report(request, protocol.NodeReport, node_id, credential)
        )
        return Response({"ok": True})


class BuildReportView(NodeCredentialView):
    """``POST`` a :class:`~runtime_agent.protocol.BuildReport` of a build on this node."""

    @extend_schema(exclude=True)
    def post(self, request: Request, build_id: Any) -> Response:
        node_id, credential = self.node_headers(request)
        report = _signed_report(request, protocol.BuildReport, node_id, credential)
        if report.build_id != str(build_id):
            raise InvalidInput("the report's build_id is not the one in the path")
        builds.handle_build_report(report)
        return Response({"ok": True})


class ContainerSecretsView(NodeCredentialView):
    """``GET`` the service secrets of a container placed on this node: ``{"env": {...}}``."""

    @extend_schema(exclude=True)
    def get(self, request: Request, container_id: Any) -> Response:
        node_id, credential = self.node_headers(request)
        env = nodes.container_secrets(node_id, credential, str(container_id))
        return Response({"env": env}, headers={"Cache-Control": "no-store"})
