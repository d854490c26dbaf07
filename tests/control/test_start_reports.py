"""A start the node acknowledged and is still working on is ``starting``, never lost
(issue #17 item 5): a replica whose start was held up behind another tenant's work used
to be called "disappeared" after 20 s, restarted, and its deployment rolled back.

Real Postgres and Redis; the node's reports are fed in as the agent sends them."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis
from django.utils import timezone

from runtime_agent import protocol
from tenants.models import Tenant, User
from tests.control.test_workloads import SYSTEM, broker, make_node, report, running
from workloads.choices import ContainerState, DeploymentState
from workloads.models import Container, Deployment, Node
from workloads.services import deploy, placement, reconcile, reports

__all__ = ["broker"]

pytestmark = pytest.mark.django_db(transaction=True)


def starting(container: Container) -> protocol.ContainerReport:
    return protocol.ContainerReport(
        uid=str(container.pk),
        tenant=container.tenant.slug,
        name=container.agent_name,
        state="starting",
    )


def _placed(tenant: Tenant) -> tuple[Container, Node, str]:
    node, credential = make_node("n1")
    service = deploy.create_service(
        tenant, name="api", data={"image": "busybox"}, replicas=1, actor=SYSTEM
    )
    placement.schedule_pending()
    container = service.containers.get()
    assert container.state == ContainerState.SCHEDULED
    return container, node, credential


def _age(container: Container, seconds: float) -> None:
    """As if the apply had been sent ``seconds`` ago."""
    Container.objects.filter(pk=container.pk).update(
        scheduled_at=timezone.now() - timedelta(seconds=seconds)
    )


def test_an_acknowledged_start_past_the_grace_stays_scheduled_and_the_deploy_succeeds(
    acme: tuple[Tenant, User], broker: redis.Redis
) -> None:
    tenant, _ = acme
    container, node, credential = _placed(tenant)
    grace = reports.start_grace().total_seconds()
    for elapsed in (grace + 1, grace + 30, grace + 60):  # report after report, still starting
        _age(container, elapsed)
        report(node, credential, starting(container))
        reconcile.restart_exited(now=timezone.now() + timedelta(seconds=120))
        reconcile.advance_deployments()
        container.refresh_from_db()
        assert container.state == ContainerState.SCHEDULED, container.pending_reason
        assert container.restart_count == 0
        assert "disappeared" not in container.pending_reason
        assert Deployment.objects.get(service=container.service).state == (
            DeploymentState.IN_PROGRESS
        )
    assert container.last_reported_at is not None

    report(node, credential, running(container))
    reconcile.advance_deployments()
    container.refresh_from_db()
    assert container.state == ContainerState.RUNNING
    assert Deployment.objects.get(service=container.service).state == DeploymentState.SUCCEEDED


def test_a_start_within_its_grace_is_not_lost_but_one_never_acknowledged_is(
    acme: tuple[Tenant, User], broker: redis.Redis, settings: object
) -> None:
    """Without a ``starting`` entry the grace decides: inside it the apply may still be on
    its way; past it the container is gone (that is what the report is for)."""
    tenant, _ = acme
    container, node, credential = _placed(tenant)
    settings.BERTH_START_GRACE_SECONDS = 45  # type: ignore[attr-defined]
    _age(container, 30)
    report(node, credential)  # a full report without the container
    container.refresh_from_db()
    assert container.state == ContainerState.SCHEDULED

    _age(container, 50)
    report(node, credential)
    container.refresh_from_db()
    assert container.state == ContainerState.FAILED
    assert "disappeared" in container.pending_reason


def test_starting_for_a_container_being_removed_changes_nothing(
    acme: tuple[Tenant, User], broker: redis.Redis
) -> None:
    tenant, _ = acme
    container, node, credential = _placed(tenant)
    deploy.retire(Container.objects.select_related("tenant", "node").get(pk=container.pk))
    before = Container.objects.get(pk=container.pk)
    report(node, credential, starting(container))
    after = Container.objects.get(pk=container.pk)
    assert (after.state, after.desired_state) == (before.state, before.desired_state)
