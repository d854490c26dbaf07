"""Platform admins' console for the fleet and tenants' workloads."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from tenants.services import Actor
from workloads.models import BatchJob, Container, Deployment, JobRun, Node, Service
from workloads.services.nodes import remove_node


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ["name", "state", "cpu_millicores", "memory_mib", "gpus", "last_heartbeat_at"]
    list_filter = ["state"]
    search_fields = ["name", "id"]
    readonly_fields = ["id", "credential_hash", "joined_at", "last_heartbeat_at", "last_report"]

    def delete_model(self, request: HttpRequest, obj: Node) -> None:
        remove_node(obj, actor=Actor.from_request(request))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        for node in queryset:
            remove_node(node, actor=Actor.from_request(request))


class ContainerInline(admin.TabularInline):
    model = Container
    fields = ("name", "node", "generation", "desired_state", "state", "exit_code", "started_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True


@admin.register(Service)
class ServiceAdmin(admin.ModelAdmin):
    list_display = ["name", "tenant", "state", "image", "replicas", "generation"]
    list_filter = ["state"]
    search_fields = ["name", "tenant__slug", "image"]
    readonly_fields = ["secrets_encrypted", "secret_names", "generation"]
    inlines = [ContainerInline]


@admin.register(Container)
class ContainerAdmin(admin.ModelAdmin):
    list_display = ["name", "tenant", "node", "desired_state", "state", "exit_code", "created_at"]
    list_filter = ["state", "desired_state"]
    search_fields = ["name", "tenant__slug", "id"]
    readonly_fields = ["spec", "reservation"]


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    list_display = ["service", "generation", "state", "reason", "created_at"]
    list_filter = ["state"]


class JobRunInline(admin.TabularInline):
    model = JobRun
    fields = ("index", "attempt", "state", "exit_code", "started_at", "finished_at")
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(BatchJob)
class BatchJobAdmin(admin.ModelAdmin):
    list_display = ["name", "tenant", "state", "array_size", "parallelism", "priority"]
    list_filter = ["state"]
    search_fields = ["name", "tenant__slug"]
    inlines = [JobRunInline]
