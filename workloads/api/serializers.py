"""Serializers of the workloads API. Inputs are strict (unknown fields are an error);
secrets are write-only: the API shows their names, never their values."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from tenants.api.serializers import StrictSerializer
from workloads.models import BatchJob, Container, Deployment, JobRun, Node, Service
from workloads.services import jobs as job_services


class PortSerializer(StrictSerializer):
    container_port = serializers.IntegerField(min_value=1, max_value=65535)
    host_port = serializers.IntegerField(min_value=0, max_value=65535, default=0)
    protocol = serializers.ChoiceField(choices=["tcp", "udp"], default="tcp")


class HealthCheckSerializer(StrictSerializer):
    test = serializers.ListField(child=serializers.CharField(), min_length=1)
    retries = serializers.IntegerField(min_value=0, max_value=100, default=3)
    timeout = serializers.IntegerField(min_value=1, max_value=300, default=5)
    start_period = serializers.IntegerField(min_value=0, max_value=3600, default=0)


class ServiceVolumeSerializer(StrictSerializer):
    name = serializers.CharField(max_length=63)
    target = serializers.CharField(max_length=1000)
    # docker's name for the flag; DRF moves declared fields off the class, so this does not
    # shadow Field.read_only at run time (mypy only sees the class attribute).
    read_only = serializers.BooleanField(default=False)  # type: ignore[assignment]


class ServiceSpecSerializer(StrictSerializer):
    """The deployable fields; every one optional on deploy (PATCH)."""

    image = serializers.CharField(max_length=300, required=False)
    command = serializers.ListField(child=serializers.CharField(), required=False, allow_null=True)
    entrypoint = serializers.ListField(
        child=serializers.CharField(), required=False, allow_null=True
    )
    env = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False)
    secrets = serializers.DictField(
        child=serializers.CharField(allow_blank=True), required=False, write_only=True
    )
    ports = PortSerializer(many=True, required=False)
    cpu_millicores = serializers.IntegerField(required=False)
    memory_mib = serializers.IntegerField(required=False)
    blkio_bps = serializers.IntegerField(required=False, allow_null=True)
    gpus = serializers.IntegerField(required=False)
    restart_policy = serializers.ChoiceField(
        choices=["no", "on-failure", "always", "unless-stopped"], required=False
    )
    health_check = HealthCheckSerializer(required=False, allow_null=True)
    constraints = serializers.DictField(child=serializers.CharField(), required=False)
    volumes = ServiceVolumeSerializer(many=True, required=False)
    networks = serializers.ListField(child=serializers.CharField(max_length=63), required=False)


class ServiceCreateSerializer(ServiceSpecSerializer):
    name = serializers.CharField(max_length=63)
    image = serializers.CharField(max_length=300)
    replicas = serializers.IntegerField(default=1)


class ScaleSerializer(StrictSerializer):
    replicas = serializers.IntegerField()


class ExecSerializer(StrictSerializer):
    argv = serializers.ListField(child=serializers.CharField(), min_length=1)
    timeout = serializers.IntegerField(min_value=1, max_value=300, default=30)


class ContainerSerializer(serializers.ModelSerializer):
    node = serializers.CharField(source="node.name", default=None, read_only=True)
    name_on_node = serializers.CharField(source="agent_name", read_only=True)

    class Meta:
        model = Container
        fields = [
            "id",
            "name",
            "name_on_node",
            "generation",
            "node",
            "desired_state",
            "state",
            "pending_reason",
            "exit_code",
            "oom_killed",
            "restart_count",
            "healthy",
            "cpu_millicores",
            "memory_mib",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


RESOLVED_IMAGE_HELP = (
    "The registry digest reference (<registry-host>/<tenant>/<repo>@sha256:…) that image, "
    "a bare tag of a pushed build, resolved to when this was created or deployed: what the "
    "containers run. Null: the image runs as written."
)


class DeploymentSerializer(serializers.ModelSerializer):
    image = serializers.SerializerMethodField()
    resolved_image = serializers.SerializerMethodField(help_text=RESOLVED_IMAGE_HELP)

    class Meta:
        model = Deployment
        fields = [
            "generation",
            "previous_generation",
            "image",
            "resolved_image",
            "state",
            "reason",
            "created_at",
            "finished_at",
        ]
        read_only_fields = fields

    def get_image(self, deployment: Deployment) -> str:
        return str(deployment.spec.get("image", ""))

    def get_resolved_image(self, deployment: Deployment) -> str | None:
        return deployment.spec.get("resolved_image") or None


class ServiceSerializer(serializers.ModelSerializer):
    resolved_image = serializers.SerializerMethodField(help_text=RESOLVED_IMAGE_HELP)
    running = serializers.SerializerMethodField()
    containers = serializers.SerializerMethodField()
    latest_deployment = serializers.SerializerMethodField()

    class Meta:
        model = Service
        fields = [
            "id",
            "name",
            "state",
            "image",
            "resolved_image",
            "command",
            "entrypoint",
            "env",
            "secret_names",
            "ports",
            "volumes",
            "networks",
            "cpu_millicores",
            "memory_mib",
            "blkio_bps",
            "gpus",
            "replicas",
            "running",
            "restart_policy",
            "health_check",
            "constraints",
            "generation",
            "latest_deployment",
            "containers",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    def get_resolved_image(self, service: Service) -> str | None:
        return service.resolved_image or None

    def get_running(self, service: Service) -> int:
        return service.containers.filter(state="running", desired_state="running").count()

    def get_containers(self, service: Service) -> list[dict[str, Any]]:
        live = service.containers.exclude(state__in=["removed", "lost"]).select_related("node")
        return ContainerSerializer(live, many=True).data  # type: ignore[return-value]

    def get_latest_deployment(self, service: Service) -> dict[str, Any] | None:
        deployment = service.deployments.order_by("-generation").first()
        return DeploymentSerializer(deployment).data if deployment else None


class JobCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=63, required=False)
    image = serializers.CharField(max_length=300)
    command = serializers.ListField(child=serializers.CharField(), required=False, allow_null=True)
    env = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False)
    cpu_millicores = serializers.IntegerField(required=False)
    memory_mib = serializers.IntegerField(required=False)
    gpus = serializers.IntegerField(required=False)
    array_size = serializers.IntegerField(required=False)
    parallelism = serializers.IntegerField(required=False)
    max_retries = serializers.IntegerField(required=False)
    backoff_seconds = serializers.IntegerField(required=False)
    timeout_seconds = serializers.IntegerField(required=False, allow_null=True)
    priority = serializers.IntegerField(required=False)


class JobRunSerializer(serializers.ModelSerializer):
    duration_seconds = serializers.FloatField(read_only=True)

    class Meta:
        model = JobRun
        fields = [
            "index",
            "attempt",
            "state",
            "exit_code",
            "reason",
            "started_at",
            "finished_at",
            "duration_seconds",
            "cpu_seconds",
            "max_memory_bytes",
        ]
        read_only_fields = fields


class JobSerializer(serializers.ModelSerializer):
    resolved_image = serializers.SerializerMethodField(help_text=RESOLVED_IMAGE_HELP)
    counts = serializers.SerializerMethodField()

    class Meta:
        model = BatchJob
        fields = [
            "id",
            "name",
            "state",
            "image",
            "resolved_image",
            "command",
            "env",
            "cpu_millicores",
            "memory_mib",
            "gpus",
            "array_size",
            "parallelism",
            "max_retries",
            "backoff_seconds",
            "timeout_seconds",
            "priority",
            "counts",
            "created_at",
            "finished_at",
        ]
        read_only_fields = fields

    def get_resolved_image(self, job: BatchJob) -> str | None:
        return job.resolved_image or None

    def get_counts(self, job: BatchJob) -> dict[str, int]:
        return job_services.job_counts(job)


class NodeSerializer(serializers.ModelSerializer):
    containers = serializers.SerializerMethodField()

    class Meta:
        model = Node
        fields = [
            "id",
            "name",
            "state",
            "cpu_millicores",
            "memory_mib",
            "disk_gib",
            "gpus",
            "arch",
            "version",
            "labels",
            "joined_at",
            "last_heartbeat_at",
            "containers",
        ]
        read_only_fields = fields

    def get_containers(self, node: Node) -> int:
        return node.containers.exclude(state__in=["removed", "lost"]).count()


class NodeStateSerializer(StrictSerializer):
    state = serializers.ChoiceField(choices=["ready", "cordoned", "draining"])


class NodeJoinSerializer(StrictSerializer):
    token = serializers.CharField()
    name = serializers.CharField(max_length=100)
    labels = serializers.DictField(child=serializers.CharField(), required=False)
    capacity = serializers.DictField()
