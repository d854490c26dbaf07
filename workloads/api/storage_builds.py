"""API of volumes, networks and builds (tenant-scoped), and what a build node asks for
with its node credential (the context download, the push token). Views translate HTTP
only; the services do the work."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from django.http import FileResponse, Http404, StreamingHttpResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.parsers import BaseParser, JSONParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from runtime_agent import protocol
from tenants import permissions as perms
from tenants.api.serializers import StrictSerializer
from tenants.api.throttling import limited_stream
from tenants.api.views import TenantScopedViewSet
from tenants.errors import InvalidInput, PermissionDenied
from workloads.models import Build, Network, Volume
from workloads.services import builds, storage

FOLLOW_SECONDS_MAX = 3600


# --------------------------------------------------------------------------- serializers


class VolumeCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=63)
    size_gib = serializers.IntegerField(default=1)
    labels = serializers.DictField(child=serializers.CharField(), required=False)


class VolumeSerializer(serializers.ModelSerializer):
    node = serializers.CharField(source="node.name", default=None, read_only=True)
    services = serializers.SerializerMethodField()

    class Meta:
        model = Volume
        fields = ["id", "name", "size_gib", "node", "labels", "services", "created_at"]
        read_only_fields = fields

    def get_services(self, volume: Volume) -> list[str]:
        return storage.services_using(volume.tenant, volume=volume.name)


class NetworkCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=63)
    labels = serializers.DictField(child=serializers.CharField(), required=False)


class NetworkSerializer(serializers.ModelSerializer):
    services = serializers.SerializerMethodField()

    class Meta:
        model = Network
        fields = ["id", "name", "labels", "services", "created_at"]
        read_only_fields = fields

    def get_services(self, network: Network) -> list[str]:
        return storage.services_using(network.tenant, network=network.name)


class BuildSerializer(serializers.ModelSerializer):
    node = serializers.CharField(source="node.name", default=None, read_only=True)
    duration_seconds = serializers.FloatField(read_only=True)

    class Meta:
        model = Build
        fields = [
            "id",
            "state",
            "reason",
            "tag",
            "dockerfile",
            "build_args",
            "target",
            "no_cache",
            "context_size",
            "context_sha256",
            "node",
            "image_digest",
            "image_reference",
            "pushed",
            "created_at",
            "started_at",
            "finished_at",
            "duration_seconds",
        ]
        read_only_fields = fields


#: The multipart upload, for the schema (the view reads the fields itself, see ``create``).
BUILD_UPLOAD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["context", "tag"],
    "properties": {
        "context": {"type": "string", "format": "binary", "description": "a tar (or tar.gz)"},
        "tag": {"type": "string", "description": "repository[:tag] in the tenant's namespace"},
        "dockerfile": {"type": "string"},
        "build_args": {"type": "string", "description": "a JSON object"},
        "target": {"type": "string"},
        "no_cache": {"type": "boolean"},
    },
}


class TarParser(BaseParser):
    """Accepts a raw tar body; the view streams it from the request itself."""

    media_type = "application/x-tar"

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        return {}


# --------------------------------------------------------------------------- views


class VolumeViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, TenantScopedViewSet):
    """Named volumes, node-local, sized against the ``storage_gib`` quota."""

    queryset = Volume.objects.select_related("tenant", "node")
    serializer_class = VolumeSerializer
    lookup_field = "name"
    read_permission = perms.WORKLOADS_VIEW
    write_permission = perms.WORKLOADS_MANAGE

    @extend_schema(request=VolumeCreateSerializer, responses={201: VolumeSerializer})
    def create(self, request: Request, tenant_slug: str) -> Response:
        data = VolumeCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        volume = storage.create_volume(self.tenant, **data.validated_data, actor=self.actor)
        return Response(VolumeSerializer(volume).data, status=status.HTTP_201_CREATED)

    def destroy(self, request: Request, tenant_slug: str, name: str) -> Response:
        storage.delete_volume(self.get_object(), actor=self.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)


class NetworkViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, TenantScopedViewSet):
    """Tenant networks: names services attach to; nodes create them on first use."""

    queryset = Network.objects.select_related("tenant")
    serializer_class = NetworkSerializer
    lookup_field = "name"
    read_permission = perms.WORKLOADS_VIEW
    write_permission = perms.WORKLOADS_MANAGE

    @extend_schema(request=NetworkCreateSerializer, responses={201: NetworkSerializer})
    def create(self, request: Request, tenant_slug: str) -> Response:
        data = NetworkCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        network = storage.create_network(self.tenant, **data.validated_data, actor=self.actor)
        return Response(NetworkSerializer(network).data, status=status.HTTP_201_CREATED)

    def destroy(self, request: Request, tenant_slug: str, name: str) -> Response:
        storage.delete_network(self.get_object(), actor=self.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)


def _flag(value: Any) -> bool:
    if value in (None, "", "0", "false", "False", "no", False):
        return False
    if value in ("1", "true", "True", "yes", True):
        return True
    raise InvalidInput("no_cache must be true or false")


def _build_args(params: Any) -> dict[str, str]:
    raw = params.get("build_args")
    args: dict[str, Any] = {}
    if raw:
        try:
            args = json.loads(raw)
        except ValueError:
            raise InvalidInput("build_args must be a JSON object") from None
    for item in params.getlist("build_arg") if hasattr(params, "getlist") else []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidInput(f"build_arg {item!r} must be NAME=value")
        args[key] = value
    return builds.validate_build_args(args)


class BuildViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, TenantScopedViewSet):
    """Image builds: upload a context, follow the log, get the image."""

    queryset = Build.objects.select_related("tenant", "node")
    serializer_class = BuildSerializer
    read_permission = perms.WORKLOADS_VIEW
    write_permission = perms.WORKLOADS_MANAGE
    parser_classes = [MultiPartParser, TarParser, JSONParser]

    @extend_schema(
        request={
            "multipart/form-data": BUILD_UPLOAD_SCHEMA,
            "application/x-tar": {"type": "string", "format": "binary"},
        },
        parameters=[
            OpenApiParameter("tag", str, description="with a raw tar body: repository[:tag]"),
            OpenApiParameter("dockerfile", str, description="with a raw tar body"),
            OpenApiParameter("build_arg", str, many=True, description="NAME=value"),
            OpenApiParameter("target", str, description="with a raw tar body"),
            OpenApiParameter("no_cache", bool, description="with a raw tar body"),
        ],
        responses={201: BuildSerializer},
    )
    def create(self, request: Request, tenant_slug: str) -> Response:
        """Upload a build context: multipart (field ``context``) or a raw tar body."""
        content_type = (request.content_type or "").split(";")[0].strip()
        declared = request.META.get("CONTENT_LENGTH")
        declared_size = int(declared) if declared and declared.isdigit() else None
        if content_type in ("application/x-tar", "application/gzip", "application/octet-stream"):
            params: Any = request.query_params
            raw = request._request  # stream the body; never hold it in memory

            def chunks() -> Iterator[bytes]:
                while chunk := raw.read(1024 * 1024):
                    yield chunk

            context = builds.store_context(chunks(), declared_size=declared_size)
        elif content_type == "multipart/form-data":
            if declared_size is not None and declared_size > builds.max_context_bytes() + 65536:
                raise builds.ContextTooLarge(
                    f"the upload is {declared_size} bytes; the build context may be at most "
                    f"{builds.max_context_bytes()}",
                    details={"limit_bytes": builds.max_context_bytes()},
                )
            params = request.data
            upload = request.FILES.get("context")
            if upload is None:
                raise InvalidInput("upload the build context as the multipart field 'context'")
            context = builds.store_context(upload.chunks(), declared_size=upload.size)
        else:
            raise InvalidInput(
                "send the build context as multipart/form-data (field 'context') or as an "
                "application/x-tar body"
            )
        try:
            build = builds.create_build(
                self.tenant,
                context=context,
                tag=params.get("tag") or "",
                dockerfile=params.get("dockerfile"),
                build_args=_build_args(params),
                target=params.get("target") or None,
                no_cache=_flag(params.get("no_cache")),
                actor=self.actor,
            )
        except BaseException:
            builds.discard_context(context[0])
            raise
        return Response(BuildSerializer(build).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=BuildSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, tenant_slug: str, pk: str) -> Response:
        return Response(
            BuildSerializer(builds.cancel_build(self.get_object(), actor=self.actor)).data
        )

    @extend_schema(
        parameters=[
            OpenApiParameter("follow", bool, description="stream NDJSON until the build ends"),
            OpenApiParameter("seconds", int, description="follow at most this long"),
        ],
        responses={200: {"type": "object"}},
    )
    @action(detail=True, methods=["get"])
    def logs(self, request: Request, tenant_slug: str, pk: str) -> Any:
        """The kept log of a build; with ``follow=1`` NDJSON lines ``{"log": text}`` as it
        grows and a last ``{"state", "image_digest", "reason"}`` when it ends."""
        build = self.get_object()
        if request.query_params.get("follow") not in ("1", "true", "yes"):
            return Response({"state": build.state, "log": build.log, "log_size": build.log_size})
        raw_seconds = request.query_params.get("seconds") or str(FOLLOW_SECONDS_MAX)
        if not raw_seconds.isdigit() or not 1 <= int(raw_seconds) <= FOLLOW_SECONDS_MAX:
            raise InvalidInput(f"seconds must be between 1 and {FOLLOW_SECONDS_MAX}")
        deadline = time.monotonic() + int(raw_seconds)
        pk_value = build.pk

        def stream() -> Iterator[bytes]:
            sent = 0
            while True:
                current = (
                    Build.objects.filter(pk=pk_value)
                    .values("state", "log", "log_size", "image_digest", "reason")
                    .first()
                )
                if current is None:
                    return
                if current["log_size"] > sent:
                    new = min(current["log_size"] - sent, len(current["log"]))
                    text = current["log"][len(current["log"]) - new :]
                    sent = current["log_size"]
                    yield (json.dumps({"log": text}) + "\n").encode()
                if current["state"] in builds.TERMINAL or time.monotonic() > deadline:
                    yield (
                        json.dumps(
                            {
                                "state": current["state"],
                                "image_digest": current["image_digest"],
                                "reason": current["reason"],
                            }
                        )
                        + "\n"
                    ).encode()
                    return
                time.sleep(0.25)

        return StreamingHttpResponse(
            limited_stream(request, stream(), seconds=int(raw_seconds)),
            content_type="application/x-ndjson",
        )


class NodeCredentialView(APIView):
    """A request from a node, signed with its id and credential in headers (no user
    authentication: the service checks the credential and what the node may do)."""

    permission_classes = [AllowAny]
    authentication_classes: list[Any] = []
    throttle_classes: list[Any] = []

    @staticmethod
    def node_headers(request: Request) -> tuple[str, str]:
        """The node id and credential (403 without them)."""
        node_id = request.headers.get(protocol.NODE_ID_HEADER, "")
        credential = request.headers.get(protocol.NODE_CREDENTIAL_HEADER, "")
        if not node_id or not credential:
            raise PermissionDenied("node credentials required")
        return node_id, credential


class BuildContextView(NodeCredentialView):
    """A build node downloads the context of a build placed on it (node credential)."""

    @extend_schema(exclude=True)
    def get(self, request: Request, build_id: str) -> Any:
        node_id, credential = self.node_headers(request)
        build = builds.authenticate_context_fetch(str(build_id), node_id, credential)
        try:
            handle = open(build.context_path, "rb")
        except OSError:
            raise Http404 from None
        return FileResponse(handle, content_type="application/x-tar")


class BuildPushTokenView(NodeCredentialView):
    """The node running a build gets a short-lived registry token to push its image
    (node credential; ``builds.issue_push_token`` decides). The token is in this response
    only: ``Cache-Control: no-store``, as OAuth2 token responses."""

    @extend_schema(exclude=True)
    def post(self, request: Request, build_id: str) -> Response:
        node_id, credential = self.node_headers(request)
        issued = builds.issue_push_token(str(build_id), node_id, credential)
        return Response(
            {
                "token": issued.token,
                "expires_in": issued.expires_in,
                "issued_at": issued.issued_at,
            },
            headers={"Cache-Control": "no-store"},
        )
