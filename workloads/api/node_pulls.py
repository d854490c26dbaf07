"""The endpoint a node asks, right before pulling an image for a tenant's container, for a
registry token carrying that tenant's rights (``protocol.PULL_TOKEN_PATH``)."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.api.serializers import StrictSerializer
from workloads.api.storage_builds import NodeCredentialView
from workloads.services import nodes


class PullTokenRequestSerializer(StrictSerializer):
    tenant = serializers.CharField(max_length=63)
    image = serializers.CharField(max_length=300)


class NodePullTokenView(NodeCredentialView):
    """``{"tenant", "image"}`` → ``{"token", "expires_in", "issued_at"}`` (``token`` null:
    not this platform's registry, pull anonymously). ``nodes.issue_pull_token`` decides;
    the token is in this response only (``Cache-Control: no-store``)."""

    @extend_schema(exclude=True)
    def post(self, request: Request) -> Response:
        node_id, credential = self.node_headers(request)
        body = PullTokenRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        issued = nodes.issue_pull_token(
            node_id, credential, body.validated_data["tenant"], body.validated_data["image"]
        )
        payload = (
            {"token": issued.token, "expires_in": issued.expires_in, "issued_at": issued.issued_at}
            if issued is not None
            else {"token": None}
        )
        return Response(payload, headers={"Cache-Control": "no-store"})
