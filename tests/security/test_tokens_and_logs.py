"""A tenant's API token cannot grant more than it holds, cannot act as a person, and the
results of tasks (tenants' data) never reach log files (#27 items 2, 6 and 8)."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from celery import Celery
from django.utils import timezone

from runtime_agent import tasklog
from tenants.choices import Scope
from tenants.models import APIToken, Membership, Tenant

V1 = "/api/v1"
pytestmark = pytest.mark.django_db


def error_code(response) -> str:
    return response.json()["error"]["code"]


def test_a_write_token_cannot_mint_an_admin_token(acme, make_token, client_for):
    tenant, owner = acme
    write = client_for(make_token(tenant, owner, Scope.WRITE))
    response = write.post(
        f"{V1}/tenants/acme/tokens/", {"name": "up", "scope": "admin"}, format="json"
    )
    assert response.status_code == 403, response.content
    assert "token" in response.json()["error"]["message"]
    assert not APIToken.objects.filter(name="up").exists()
    # The tenant-level write the admin token would have allowed stays refused.
    rename = write.patch(f"{V1}/tenants/acme/", {"name": "pwned"}, format="json")
    assert rename.status_code == 403
    assert Tenant.objects.get(pk=tenant.pk).name != "pwned"
    # A read token cannot mint a write one either; equal scope is fine.
    read = client_for(make_token(tenant, owner, Scope.READ))
    refused = read.post(
        f"{V1}/tenants/acme/tokens/", {"name": "w", "scope": "write"}, format="json"
    )
    assert refused.status_code == 403
    made = write.post(f"{V1}/tenants/acme/tokens/", {"name": "ci", "scope": "write"}, format="json")
    assert made.status_code == 201 and made.json()["scope"] == "write"


def test_a_child_token_never_outlives_its_parent(acme, make_token, client_for):
    tenant, owner = acme
    ends = timezone.now() + timedelta(days=1)
    client = client_for(make_token(tenant, owner, Scope.ADMIN, expires_at=ends))
    forever = client.post(
        f"{V1}/tenants/acme/tokens/", {"name": "forever", "scope": "read"}, format="json"
    )
    assert forever.status_code == 201
    assert APIToken.objects.get(name="forever").expires_at == ends
    later = (ends + timedelta(days=30)).isoformat()
    longer = client.post(
        f"{V1}/tenants/acme/tokens/",
        {"name": "longer", "scope": "read", "expires_at": later},
        format="json",
    )
    assert longer.status_code == 403
    assert error_code(longer) == "permission_denied"
    assert not APIToken.objects.filter(name="longer").exists()


def test_a_token_of_tenant_a_cannot_accept_an_invitation_into_tenant_b(
    make_tenant, make_token, client_for
):
    a, a_owner = make_tenant("alpha")
    b, b_owner = make_tenant("bravo")
    invitation = (
        client_for(make_token(b, b_owner))
        .post(
            f"{V1}/tenants/bravo/invitations/",
            {"email": a_owner.email, "role": "admin"},
            format="json",
        )
        .json()
    )
    a_read = client_for(make_token(a, a_owner, Scope.READ))
    response = a_read.post(f"{V1}/invitations/accept/", {"key": invitation["key"]}, format="json")
    assert response.status_code == 403
    assert error_code(response) == "token_not_accepted"
    assert not Membership.objects.filter(tenant=b, user=a_owner).exists()
    # The person, logged in, still can.
    session = client_for(None)
    session.force_login(a_owner)
    accepted = session.post(f"{V1}/invitations/accept/", {"key": invitation["key"]}, format="json")
    assert accepted.status_code == 201


def test_celery_success_lines_carry_no_task_result(caplog: pytest.LogCaptureFixture) -> None:
    """Celery's own tracer, run as a worker runs it: the success line names the task and
    its timing, never what it returned or was given."""
    app = Celery("tasklog-test", set_as_current=False)
    app.conf.task_always_eager = True
    secret = "DB_PASSWORD=hunter2-from-env"

    @app.task(name="agent.exec")
    def run_exec(command: str) -> dict[str, str]:
        return {"output": secret}

    tasklog.install()
    tasklog.install()  # idempotent: one filter
    trace_logger = logging.getLogger(tasklog.TRACE_LOGGER)
    assert sum(isinstance(f, tasklog.DropTaskData) for f in trace_logger.filters) == 1
    with caplog.at_level(logging.INFO, logger=tasklog.TRACE_LOGGER):
        assert run_exec.delay(f"echo {secret}").get() == {"output": secret}
    lines = [r.getMessage() for r in caplog.records if r.name == tasklog.TRACE_LOGGER]
    assert any("agent.exec" in line and "succeeded in" in line for line in lines), lines
    assert not any(secret in line for line in lines), lines
    assert all(secret not in repr(getattr(r, "data", "")) for r in caplog.records)
