"""Workloads API for CI systems and the dashboard: services, jobs, nodes.

Tenant-owned collections live under ``/api/v1/tenants/<slug>/`` and are scoped by
:class:`tenants.api.views.TenantScopedViewSet`; nodes are platform-wide (platform admins),
except ``nodes/join/`` which a new node calls with its one-time join token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from django.db import transaction
from django.db.models import QuerySet
from django.http import StreamingHttpResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.viewsets import GenericViewSet

from runtime_agent import protocol
from tenants import permissions as perms
from tenants.api.permissions import PlatformAdminOnly
from tenants.api.throttling import limited_stream, stream_slot
from tenants.api.views import TenantScopedViewSet
from tenants.errors import InvalidInput
from tenants.services import Actor
from workloads.api import serializers as s
from workloads.choices import ContainerState, ServiceState
from workloads.models import BatchJob, Container, Node, Service
from workloads.services import deploy, dispatch, jobs, nodes

FOLLOW_SECONDS_MAX = 600


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be between {low} and {high}")
    return value


def _container_logs(container: Container, *, tail: int, since: str | None) -> list[dict[str, Any]]:
    if container.node is None:
        return []
    result = dispatch.call(
        container.node,
        protocol.AGENT_LOGS,
        tenant=container.tenant.slug,
        name=container.agent_name,
        tail=tail,
        since=since,
    )
    return [{**line, "container": str(container.pk)} for line in result.get("lines", [])]


class ServiceViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    TenantScopedViewSet,
):
    """Services: long-running replicated containers. PATCH deploys a new spec."""

    queryset = Service.objects.exclude(state=ServiceState.DELETED).select_related("tenant")
    serializer_class = s.ServiceSerializer
    lookup_field = "name"
    read_permission = perms.WORKLOADS_VIEW
    write_permission = perms.WORKLOADS_MANAGE

    def _service(self) -> Service:
        return self.get_object()

    @extend_schema(request=s.ServiceCreateSerializer, responses={201: s.ServiceSerializer})
    def create(self, request: Request, tenant_slug: str) -> Response:
        data = s.ServiceCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        name = fields.pop("name")
        replicas = fields.pop("replicas")
        service = deploy.create_service(
            self.tenant, name=name, data=fields, replicas=replicas, actor=self.actor
        )
        return Response(s.ServiceSerializer(service).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=s.ServiceSpecSerializer, responses={202: s.DeploymentSerializer})
    def partial_update(self, request: Request, tenant_slug: str, name: str) -> Response:
        data = s.ServiceSpecSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        deployment = deploy.deploy_service(
            self._service(), dict(data.validated_data), actor=self.actor
        )
        return Response(s.DeploymentSerializer(deployment).data, status=status.HTTP_202_ACCEPTED)

    def destroy(self, request: Request, tenant_slug: str, name: str) -> Response:
        deploy.delete_service(self._service(), actor=self.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=s.ScaleSerializer, responses=s.ServiceSerializer)
    @action(detail=True, methods=["post"])
    def scale(self, request: Request, tenant_slug: str, name: str) -> Response:
        data = s.ScaleSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        service = deploy.scale_service(
            self._service(), data.validated_data["replicas"], actor=self.actor
        )
        return Response(s.ServiceSerializer(service).data)

    @extend_schema(request=None, responses=s.ServiceSerializer)
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, tenant_slug: str, name: str) -> Response:
        return Response(
            s.ServiceSerializer(deploy.stop_service(self._service(), actor=self.actor)).data
        )

    @extend_schema(request=None, responses=s.ServiceSerializer)
    @action(detail=True, methods=["post"])
    def start(self, request: Request, tenant_slug: str, name: str) -> Response:
        return Response(
            s.ServiceSerializer(deploy.start_service(self._service(), actor=self.actor)).data
        )

    @extend_schema(request=None, responses={202: s.DeploymentSerializer})
    @action(detail=True, methods=["post"])
    def restart(self, request: Request, tenant_slug: str, name: str) -> Response:
        deployment = deploy.restart_service(self._service(), actor=self.actor)
        return Response(s.DeploymentSerializer(deployment).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(responses=s.DeploymentSerializer(many=True))
    @action(detail=True, methods=["get"])
    def deployments(self, request: Request, tenant_slug: str, name: str) -> Response:
        service = self._service()
        return Response(s.DeploymentSerializer(service.deployments.all()[:50], many=True).data)

    def _live(self, service: Service) -> QuerySet[Container]:
        return (
            service.containers.exclude(state__in=[ContainerState.REMOVED, ContainerState.LOST])
            .exclude(node__isnull=True)
            .select_related("node", "tenant")
        )

    @extend_schema(
        parameters=[
            OpenApiParameter("tail", int, description="lines per container (default 100)"),
            OpenApiParameter("follow", bool, description="stream new lines (NDJSON)"),
        ],
        responses={200: {"type": "object"}},
    )
    @action(detail=True, methods=["get"])
    def logs(self, request: Request, tenant_slug: str, name: str) -> Any:
        """Logs of the service's containers: JSON, or NDJSON streamed with ``follow=1``."""
        service = self._service()
        tail = _int_param(request, "tail", 100, 0, 10_000)
        containers = list(self._live(service))
        if request.query_params.get("follow") not in ("1", "true", "yes"):
            lines: list[dict[str, Any]] = []
            for container in containers:
                lines.extend(_container_logs(container, tail=tail, since=None))
            lines.sort(key=lambda line: line.get("time", ""))
            return Response({"lines": lines})
        seconds = _int_param(request, "seconds", FOLLOW_SECONDS_MAX, 1, FOLLOW_SECONDS_MAX)

        def stream() -> Iterator[bytes]:
            since: dict[str, str | None] = {str(c.pk): None for c in containers}
            first = True
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for container in containers:
                    key = str(container.pk)
                    try:
                        batch = _container_logs(
                            container, tail=tail if first else 10_000, since=since[key]
                        )
                    except dispatch.NodeUnavailable:
                        continue
                    for line in batch:
                        since[key] = line.get("time") or since[key]
                        yield (json.dumps(line) + "\n").encode()
                first = False
                time.sleep(1)

        return StreamingHttpResponse(
            limited_stream(request, stream(), seconds=seconds),
            content_type="application/x-ndjson",
        )

    @extend_schema(responses={200: {"type": "object"}})
    @action(detail=True, methods=["get"])
    def stats(self, request: Request, tenant_slug: str, name: str) -> Response:
        result = []
        for container in self._live(self._service()):
            assert container.node is not None
            stats = dispatch.call(
                container.node,
                protocol.AGENT_STATS,
                tenant=container.tenant.slug,
                name=container.agent_name,
            )
            result.append({"container": str(container.pk), **stats})
        return Response({"containers": result})

    @extend_schema(request=s.ExecSerializer, responses={200: {"type": "object"}})
    @action(detail=True, methods=["post"], url_path="exec")
    def exec_(self, request: Request, tenant_slug: str, name: str) -> Response:
        """Run a command in one running replica; returns its exit code and output."""
        data = s.ExecSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        container = self._live(self._service()).filter(state=ContainerState.RUNNING).first()
        if container is None or container.node is None:
            raise InvalidInput("the service has no running container")
        timeout = data.validated_data["timeout"]
        result = dispatch.call(
            container.node,
            protocol.AGENT_EXEC,
            timeout=timeout + 10,
            tenant=container.tenant.slug,
            name=container.agent_name,
            argv=data.validated_data["argv"],
            exec_timeout=timeout,
        )
        return Response({"container": str(container.pk), **result})


class JobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, TenantScopedViewSet):
    """Batch jobs: arrays of runs, at most the tenant's concurrency quota at once."""

    queryset = BatchJob.objects.select_related("tenant")
    serializer_class = s.JobSerializer
    read_permission = perms.WORKLOADS_VIEW
    write_permission = perms.WORKLOADS_MANAGE

    @extend_schema(request=s.JobCreateSerializer, responses={201: s.JobSerializer})
    def create(self, request: Request, tenant_slug: str) -> Response:
        data = s.JobCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        job = jobs.submit_job(self.tenant, dict(data.validated_data), actor=self.actor)
        return Response(s.JobSerializer(job).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=s.JobSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, tenant_slug: str, pk: str) -> Response:
        return Response(s.JobSerializer(jobs.cancel_job(self.get_object(), actor=self.actor)).data)

    @extend_schema(responses=s.JobRunSerializer(many=True))
    @action(detail=True, methods=["get"])
    def runs(self, request: Request, tenant_slug: str, pk: str) -> Response:
        job = self.get_object()
        return Response(s.JobRunSerializer(job.runs.all()[:10_000], many=True).data)

    @extend_schema(
        parameters=[OpenApiParameter("index", int, description="array index (default 0)")],
        responses={200: {"type": "object"}},
    )
    @action(detail=True, methods=["get"])
    def logs(self, request: Request, tenant_slug: str, pk: str) -> Response:
        """Output of the latest run of one index: kept on the run once it has ended."""
        job = self.get_object()
        index = _int_param(request, "index", 0, 0, job.array_size - 1)
        run = job.runs.filter(index=index).order_by("-attempt").first()
        if run is None:
            return Response({"index": index, "log": ""})
        container = Container.objects.filter(job_run=run).select_related("node", "tenant").first()
        if not run.log and container is not None and container.state == ContainerState.RUNNING:
            lines = _container_logs(container, tail=1000, since=None)
            return Response({"index": index, "attempt": run.attempt, "lines": lines})
        return Response({"index": index, "attempt": run.attempt, "log": run.log})

    @extend_schema(
        parameters=[OpenApiParameter("timeout", int, description="seconds to wait (max 300)")],
        responses=s.JobSerializer,
    )
    @action(detail=True, methods=["get"])
    def wait(self, request: Request, tenant_slug: str, pk: str) -> Response:
        """Block until the job ends or ``timeout`` seconds pass; returns the job."""
        timeout = _int_param(request, "timeout", 60, 0, 300)
        deadline = time.monotonic() + timeout
        job = self.get_object()
        with stream_slot(request, seconds=timeout):  # a worker thread held for minutes
            while job.state in ("queued", "running") and time.monotonic() < deadline:
                time.sleep(0.5)
                job.refresh_from_db()
        return Response(s.JobSerializer(job).data)


class NodeViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, GenericViewSet):
    """The fleet (platform admins)."""

    queryset = Node.objects.all()
    serializer_class = s.NodeSerializer
    permission_classes = [PlatformAdminOnly]

    @extend_schema(request=s.NodeStateSerializer, responses=s.NodeSerializer)
    @action(detail=True, methods=["post"])
    def state(self, request: Request, pk: str) -> Response:
        """Cordon, drain (moves its services elsewhere) or make ready again."""
        data = s.NodeStateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        node = nodes.set_node_state(
            self.get_object(), data.validated_data["state"], actor=Actor.from_request(request)
        )
        return Response(s.NodeSerializer(node).data)

    @extend_schema(request=s.NodeJoinSerializer, responses={201: {"type": "object"}})
    @action(
        detail=False,
        methods=["post"],
        permission_classes=[AllowAny],
        authentication_classes=[],
        throttle_classes=[],
    )
    def join(self, request: Request) -> Response:
        """A new node exchanges its one-time join token for its identity (no other auth)."""
        data = s.NodeJoinSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        # One transaction: a join whose registry login fails consumes no token, leaves no node.
        with transaction.atomic():
            node, credential = nodes.join_node(
                data.validated_data["token"],
                name=data.validated_data["name"],
                capacity=data.validated_data["capacity"],
                labels=data.validated_data.get("labels", {}),
            )
            registry = nodes.registry_login(node)
            # Last: a join refused above creates no broker user.
            broker_url = nodes.broker_login(node)
        return Response(
            {
                "node_id": str(node.pk),
                "credential": credential,
                "registry": registry,
                "queue": node.queue,
                "broker_url": broker_url,
            },
            status=status.HTTP_201_CREATED,
            headers={"Cache-Control": "no-store"},
        )
