"""Objects the cross-tenant sweep (test_cross_tenant_sweep.py) creates in each tenant.

The sweep walks every /api/ route. For a route with an object in its URL it needs one
object of the view's model in the victim tenant; it finds it with
``Model.objects.for_tenant(tenant).first()``. Apps whose objects are not created by the
tenants fixtures below add a factory here, keyed ``"app_label.ModelName"``: a callable
``(tenant, owner) -> object`` creating one object of that model in ``tenant`` (use the
app's services). Without one, the sweep still requests the route with a made-up id and
warns that the route's object case is not covered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tenants.models import Tenant, User

Factory = Callable[[Tenant, User], Any]

FACTORIES: dict[str, Factory] = {}


def _service(tenant: Tenant, owner: User) -> Any:
    from tenants.services import Actor
    from workloads.services.deploy import create_service

    return create_service(
        tenant,
        name="sweep-svc",
        data={"image": "busybox", "command": ["sleep", "1000"]},
        replicas=0,
        actor=Actor.for_system("sweep"),
    )


def _job(tenant: Tenant, owner: User) -> Any:
    from tenants.services import Actor
    from workloads.services.jobs import submit_job

    return submit_job(
        tenant, {"name": "sweep-job", "image": "busybox"}, actor=Actor.for_system("sweep")
    )


FACTORIES["workloads.Service"] = _service
FACTORIES["workloads.BatchJob"] = _job


def _repository(tenant: Tenant, owner: User) -> Any:
    # Repositories come into being from registry push events; a row is all the API needs.
    from registry.models import Repository

    return Repository.objects.create(tenant=tenant, name="sweep/app")


FACTORIES["registry.Repository"] = _repository


def _volume(tenant: Tenant, owner: User) -> Any:
    from tenants.services import Actor
    from workloads.services.storage import create_volume

    return create_volume(tenant, name="sweep-vol", actor=Actor.for_system("sweep"))


def _network(tenant: Tenant, owner: User) -> Any:
    from tenants.services import Actor
    from workloads.services.storage import create_network

    return create_network(tenant, name="sweep-net", actor=Actor.for_system("sweep"))


def _build(tenant: Tenant, owner: User) -> Any:
    # A queued build row (no node, no context file): all the API routes need.
    from workloads.models import Build

    return Build.objects.create(tenant=tenant, tag="sweep:1", reason="waiting for a ready node")


FACTORIES["workloads.Volume"] = _volume
FACTORIES["workloads.Network"] = _network
FACTORIES["workloads.Build"] = _build
