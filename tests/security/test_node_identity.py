"""Node identity (#27 item 4), attacked through the join endpoint as an outsider holding a
join token would: joining under a production node's name used to take over that node's
registry credential (minted by name), and a name the registry's rule refused consumed the
token and left an orphan node behind. Real Postgres, the real HTTP endpoints."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from registry import services as registry_services
from registry.errors import RegistryAuthError
from registry.models import NodeCredential
from tenants.errors import InvalidInput
from tests.control.conftest import SYSTEM
from workloads.models import JoinToken, Node
from workloads.services.nodes import create_join_token

pytestmark = pytest.mark.django_db(transaction=True)

CAPACITY = {"cpu_millicores": 2000, "memory_mib": 1024}


def _join(token: str, name: str) -> Any:
    return APIClient().post(
        "/api/v1/nodes/join/", {"token": token, "name": name, "capacity": CAPACITY}, format="json"
    )


def _unused(token: str) -> bool:
    from tenants.models import hash_secret

    return JoinToken.objects.get(token_hash=hash_secret(token)).used_at is None


def _logs_in(username: str, secret: str) -> bool:
    try:
        principal = registry_services.authenticate((username, secret))
    except RegistryAuthError:
        return False
    return principal.kind == "node"


def test_a_second_node_cannot_take_a_running_nodes_name_or_registry_login() -> None:
    _, first = create_join_token(actor=SYSTEM)
    joined = _join(first, "prod-1")
    assert joined.status_code == 201, joined.content
    login = joined.json()["registry"]
    assert _logs_in(login["username"], login["password"])
    prod = Node.objects.get(name="prod-1")
    assert NodeCredential.objects.get(node_name="prod-1").node_id == prod.pk

    _, second = create_join_token(actor=SYSTEM)
    taken = _join(second, "prod-1")
    assert taken.status_code == 400, taken.content
    assert "already exists" in taken.json()["error"]["message"]
    # Nothing changed: one node, its credential still the one it got, the token unused.
    assert list(Node.objects.values_list("name", flat=True)) == ["prod-1"]
    assert _logs_in(login["username"], login["password"])
    assert _unused(second)
    # The operator's by-name minting does not touch a joined node's credential either.
    with pytest.raises(InvalidInput, match="never minted by name"):
        registry_services.create_node_credential("prod-1", actor=SYSTEM)
    with pytest.raises(CommandError):
        call_command("registry_node_credential", "prod-1")
    assert _logs_in(login["username"], login["password"])
    # The token still works under a name of its own.
    assert _join(second, "prod-2").status_code == 201
    assert NodeCredential.objects.filter(node_id__isnull=False).count() == 2


@pytest.mark.parametrize(
    "name",
    ["my node", "../etc", "a" * 101, "", "-lead", "n\u00f6de", "no\nde", "x/y", "node:1"],
)
def test_a_join_with_a_bad_name_consumes_nothing(name: str) -> None:
    _, token = create_join_token(actor=SYSTEM)
    refused = _join(token, name)
    assert refused.status_code == 400, refused.content
    assert _unused(token)
    assert not Node.objects.exists()
    assert not NodeCredential.objects.exists()
    assert _join(token, "good-1").status_code == 201
    # A trailing newline (which the API trims) is no more a name to the rule itself.
    with pytest.raises(InvalidInput):
        registry_services.create_node_credential("node\n", actor=SYSTEM)


def test_a_join_cannot_take_an_operator_minted_credential_by_name() -> None:
    _, secret = registry_services.create_node_credential("manual-1", actor=SYSTEM)
    _, token = create_join_token(actor=SYSTEM)
    refused = _join(token, "manual-1")
    assert refused.status_code == 400, refused.content
    assert "operator minted" in refused.json()["error"]["message"]
    assert _unused(token) and not Node.objects.exists()
    assert _logs_in("node-manual-1", secret)
