"""The broker is no shared secret (#27 item 5), attacked as a hostile node would.

Each node joins through the real endpoint and gets a Redis ACL user of its own; a node
that uses its broker URL for anything but consuming its own queue and writing its own
results is refused by Redis itself: another node's queue (whose specs used to carry
decrypted service secrets), the ``control`` queue (any control-plane task), the control
plane's cache and results, key enumeration, pattern subscriptions, admin commands — in
every spelling (other commands, Lua, another database). Service secrets never travel
through the broker: the node fetches them over HTTP, for its own containers only.

A separate ``redis-server`` with a password (like production's, ``infra/run.sh``) runs
per test, so nothing here touches the shared Redis's users. The positive control is the
real agent worker (``berth-agent worker``) with its issued URL: it consumes its queue,
its results reach the sender, its reports reach the control plane over HTTP, and the
container it starts has the secret in its environment.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from celery import Celery
from django.core.management import call_command
from rest_framework.test import APIClient

from runtime_agent import protocol
from tenants.models import Tenant, User
from tests.control.conftest import SYSTEM
from tests.e2e.conftest import STATE, AgentProcess, _database_url, remove_all_containers, wait_for
from tests.registry_process import free_port
from workloads.choices import ContainerState, NodeState
from workloads.models import Container, Node
from workloads.services import deploy, nodes, placement
from workloads.services.broker import node_user, task_id_prefix

pytestmark = pytest.mark.django_db(transaction=True)

CAPACITY = {"cpu_millicores": 4000, "memory_mib": 4096, "disk_gib": 10, "gpus": 0}
SECRET_VALUE = "s3cret-" + secrets.token_hex(8)
NO_DISK = ("--save", "", "--appendonly", "no", "--dir")


@dataclass
class AclRedis:
    port: int
    password: str

    def url(self, db: int = 0) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/{db}"

    def admin(self) -> redis.Redis:
        return redis.Redis.from_url(self.url())


@pytest.fixture
def acl_redis(tmp_path: Path, settings: Any) -> Iterator[AclRedis]:
    """A redis-server of its own whose default user needs a password; the control plane
    (this process and its live server) uses it as ``REDIS_URL``."""
    from config.celery import app

    # The control plane's own Celery app keeps the shared broker (configured now, before
    # REDIS_URL changes below): only broker users and what the tests send go here.
    assert app.conf.broker_url
    port, password = free_port(), secrets.token_urlsafe(24)
    process = subprocess.Popen(
        ["redis-server", "-", "--port", str(port), "--bind", "127.0.0.1", *NO_DISK, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=(tmp_path / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    assert process.stdin is not None
    process.stdin.write(f"requirepass {password}\n".encode())  # never on a command line
    process.stdin.close()
    server = AclRedis(port, password)
    try:
        wait_for(lambda: _pings(server), timeout=10, what="the test's redis-server")
        settings.REDIS_URL = server.url()
        settings.BERTH_AGENT_BROKER_URL = ""
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)


def _pings(server: AclRedis) -> bool:
    try:
        return bool(server.admin().ping())
    except redis.RedisError:
        return False


@dataclass
class Joined:
    node: Node
    credential: str
    broker_url: str

    def headers(self, credential: str | None = None) -> dict[str, Any]:
        return {
            "HTTP_X_BERTH_NODE": str(self.node.pk),
            "HTTP_X_BERTH_NODE_CREDENTIAL": credential or self.credential,
        }


def join(name: str) -> Joined:
    _, token = nodes.create_join_token(actor=SYSTEM)
    response = APIClient().post(
        "/api/v1/nodes/join/",
        {"token": token, "name": name, "capacity": CAPACITY},
        format="json",
    )
    assert response.status_code == 201, response.content
    data = response.json()
    return Joined(Node.objects.get(pk=data["node_id"]), data["credential"], data["broker_url"])


def refused(call: Callable[[], Any]) -> bool:
    """Redis refused the command for lack of permission (NOPERM), not for anything else."""
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    except redis.exceptions.ResponseError as exc:
        # Inside a Lua script the refusal is a script error with the ACL's reason.
        reasons = ("NOPERM", "no permissions", "can't run this command", "can't access")
        return any(reason in str(exc) for reason in reasons)
    return False


def test_join_hands_out_a_broker_user_of_the_node_not_the_control_planes_url(
    acl_redis: AclRedis,
) -> None:
    n1 = join("n1")
    url = urlsplit(n1.broker_url)
    assert url.username == node_user(n1.node.pk) and url.password
    assert acl_redis.password not in n1.broker_url
    assert (url.hostname, url.port) == ("127.0.0.1", acl_redis.port)
    # Redis requires a password from anyone else (the default user is the control plane's).
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=acl_redis.port).get("anything")
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=acl_redis.port, username="default", password=url.password).ping()


def test_a_node_reaches_only_its_own_queue_and_results(acl_redis: AclRedis) -> None:
    n1, n2 = join("n1"), join("n2")
    admin = acl_redis.admin()
    other_queue = n2.node.queue
    other_result = f"celery-task-meta-{task_id_prefix(n2.node.pk)}{uuid.uuid4()}"
    control_result = f"celery-task-meta-{uuid.uuid4()}"
    cache_key = ":1:session-of-someone"
    admin.lpush(other_queue, json.dumps({"env": {"API_KEY": SECRET_VALUE}}))
    admin.lpush(f"{other_queue}{chr(6)}{chr(22)}3", "priority message")
    admin.set(other_result, "result of n2")
    admin.set(control_result, "result of the control plane")
    admin.set(cache_key, "cached")
    admin.hset("unacked", "tag", "a message of anyone")
    attacker = redis.Redis.from_url(n1.broker_url)
    other_db = redis.Redis.from_url(n1.broker_url.rsplit("/", 1)[0] + "/5")
    script = "return redis.call('lrange', KEYS[1], 0, -1)"
    attacks: dict[str, Callable[[], Any]] = {
        # Another node's queue, in every read spelling, and its priority lists.
        "LRANGE n2": lambda: attacker.lrange(other_queue, 0, -1),
        "BRPOP n2": lambda: attacker.brpop([other_queue], timeout=1),
        "RPOP n2": lambda: attacker.rpop(other_queue),
        "LLEN n2": lambda: attacker.llen(other_queue),
        "LRANGE n2 priority": lambda: attacker.lrange(f"{other_queue}\x06\x163", 0, -1),
        "BRPOP n2 (other db)": lambda: other_db.brpop([other_queue], timeout=1),
        "EVAL LRANGE n2": lambda: attacker.eval(script, 1, other_queue),
        "EVAL undeclared key": lambda: attacker.eval(
            f"return redis.call('lrange', '{other_queue}', 0, -1)", 0
        ),
        "EVAL RPUSH control": lambda: attacker.eval("return redis.call('rpush', 'control', 1)", 0),
        "EVAL GET n2 result": lambda: attacker.eval(
            f"return redis.call('get', '{other_result}')", 0
        ),
        # Enqueueing for the control plane or another node.
        "LPUSH control": lambda: attacker.lpush("control", "{}"),
        "RPUSH control": lambda: attacker.rpush("control", "{}"),
        "LPUSH celery": lambda: attacker.lpush("celery", "{}"),
        "LPUSH n2": lambda: attacker.lpush(other_queue, "{}"),
        "binding of control": lambda: attacker.sadd("_kombu.binding.control", "x"),
        # The control plane's cache, results, and kombu's shared bookkeeping.
        "GET cache": lambda: attacker.get(cache_key),
        "GET n2 result": lambda: attacker.get(other_result),
        "GET control result": lambda: attacker.get(control_result),
        "SET n2 result": lambda: attacker.set(other_result, "forged"),
        "HGETALL unacked": lambda: attacker.hgetall("unacked"),
        "HGET unacked": lambda: attacker.hget("unacked", "tag"),
        "DEL n2 queue": lambda: attacker.delete(other_queue),
        # Enumeration and eavesdropping.
        "KEYS": lambda: attacker.keys("*"),
        "SCAN": lambda: attacker.scan(0),
        "RANDOMKEY": lambda: attacker.randomkey(),
        "DBSIZE": lambda: attacker.dbsize(),
        "PSUBSCRIBE": lambda: _subscribe(n1.broker_url, pattern="*"),
        "SUBSCRIBE n2 result": lambda: _subscribe(n1.broker_url, channel=other_result),
        "PUBLISH n2 result": lambda: attacker.publish(other_result, "forged"),
        "MONITOR": lambda: attacker.execute_command("MONITOR"),
        # Administration.
        "CONFIG GET": lambda: attacker.config_get("requirepass"),
        "ACL LIST": lambda: attacker.acl_list(),
        "ACL SETUSER": lambda: attacker.acl_setuser(node_user(n1.node.pk), commands=["+@all"]),
        "CLIENT LIST": lambda: attacker.client_list(),
        "CLIENT KILL": lambda: attacker.execute_command("CLIENT", "KILL", "TYPE", "normal"),
        "FLUSHALL": lambda: attacker.flushall(),
        "FLUSHDB": lambda: attacker.flushdb(),
        "SCRIPT FLUSH": lambda: attacker.script_flush(),
    }
    allowed = [name for name, attack in attacks.items() if not refused(attack)]
    assert allowed == [], f"node n1's broker user may: {allowed}"
    # Nothing was taken or changed.
    assert admin.llen(other_queue) == 1 and admin.get(other_result) == b"result of n2"
    assert admin.llen("control") == 0 and admin.get(cache_key) == b"cached"

    # Positive control: its own queue, priority lists and results are its own.
    own = n1.node.queue
    assert attacker.lpush(own, "mine") == 1 and attacker.brpop([own], timeout=1) is not None
    assert attacker.lpush(f"{own}\x06\x169", "p") == 1
    own_result = f"celery-task-meta-{task_id_prefix(n1.node.pk)}{uuid.uuid4()}"
    assert attacker.get(own_result) is None
    assert attacker.setex(own_result, 60, "done") and attacker.publish(own_result, "done") == 0


def _subscribe(url: str, *, pattern: str | None = None, channel: str | None = None) -> None:
    pubsub = redis.Redis.from_url(url).pubsub()
    if pattern is not None:
        pubsub.psubscribe(pattern)
    elif channel is not None:
        pubsub.subscribe(channel)
    # The refusal arrives as the subscription's reply.
    pubsub.get_message(timeout=1)


def test_rotating_and_removing_a_node_ends_its_broker_login(acl_redis: AclRedis) -> None:
    n1, n2 = join("n1"), join("n2")
    old = redis.Redis.from_url(n1.broker_url)
    assert old.ping()
    call_command("provision_broker_users", "--node", str(n1.node.pk), stdout=open("/dev/null", "w"))
    with pytest.raises(redis.exceptions.RedisError):
        redis.Redis.from_url(n1.broker_url).ping()  # the old password is gone
    with pytest.raises(redis.exceptions.RedisError):
        old.ping()  # ...and its open connection was closed
    # A removed node's user goes with it; a user left by a node removed behind the control
    # plane's back (a restored database) is pruned.
    nodes.remove_node(n2.node, actor=SYSTEM)
    with pytest.raises(redis.exceptions.RedisError):
        redis.Redis.from_url(n2.broker_url).ping()
    stray = node_user(uuid.uuid4())
    acl_redis.admin().acl_setuser(stray, enabled=True, passwords=["+x" * 8])
    call_command("provision_broker_users", "--prune-only", stdout=open("/dev/null", "w"))
    users = {
        str(u) for u in redis.Redis.from_url(acl_redis.url(), decode_responses=True).acl_users()
    }
    assert stray not in users and node_user(n2.node.pk) not in users
    assert node_user(n1.node.pk) in users


def _service_with_secret(tenant: Tenant) -> Container:
    data = {"image": "busybox", "command": ["sleep", "100000"], "memory_mib": 32}
    data["secrets"] = {"API_KEY": SECRET_VALUE}
    service = deploy.create_service(tenant, name="web", data=data, replicas=1, actor=SYSTEM)
    assert placement.schedule_pending() == 1
    container = service.containers.select_related("node", "tenant").get()
    assert container.node is not None
    return container


def test_secrets_are_served_over_http_only_to_the_node_running_the_container(
    acl_redis: AclRedis, make_tenant: Callable[..., tuple[Tenant, User]]
) -> None:
    tenant, _ = make_tenant("acme")
    n1, n2 = join("n1"), join("n2")
    nodes.set_node_state(n2.node, NodeState.CORDONED, actor=SYSTEM)
    container = _service_with_secret(tenant)
    assert container.node == n1.node
    shared = redis.Redis.from_url(_shared_broker_url())
    try:
        # What placement sent (the control plane's real broker): no secret, a task id
        # under the node's prefix, the container to fetch secrets for.
        raw = shared.lrange(n1.node.queue, 0, -1)
        assert len(raw) == 1 and SECRET_VALUE.encode() not in raw[0]
        envelope = json.loads(raw[0])
        body = base64.b64decode(envelope["body"])
        assert SECRET_VALUE.encode() not in body
        assert envelope["headers"]["id"].startswith(task_id_prefix(n1.node.pk))
        assert json.loads(body)[1]["spec"]["secrets_from"] == str(container.pk)
    finally:
        shared.delete(n1.node.queue)

    client = APIClient()
    path = protocol.CONTAINER_SECRETS_PATH.format(container_id=container.pk)
    ok = client.get(path, **n1.headers())
    assert ok.status_code == 200 and ok.json() == {"env": {"API_KEY": SECRET_VALUE}}
    assert ok["Cache-Control"] == "no-store"
    for response in (
        client.get(path, **n2.headers()),  # another node
        client.get(path, **n1.headers(credential=n2.credential)),  # n1's id, n2's credential
        client.get(path, **n1.headers(credential="bnc_guess")),
        client.get(path),  # no credential at all
        client.get(
            protocol.CONTAINER_SECRETS_PATH.format(container_id=uuid.uuid4()), **n1.headers()
        ),
    ):
        assert response.status_code == 403, response.content
        assert SECRET_VALUE not in response.content.decode()
    Container.objects.filter(pk=container.pk).update(state=ContainerState.REMOVED)
    assert client.get(path, **n1.headers()).status_code == 403  # not once it is gone


def test_a_node_reports_only_for_itself_over_http(acl_redis: AclRedis) -> None:
    n1, n2 = join("n1"), join("n2")
    client = APIClient()
    as_n2 = protocol.NodeReport(
        node_id=str(n2.node.pk), credential=n1.credential, sent_at="2026-01-01T00:00:00+00:00"
    )
    body = protocol.to_dict(as_n2)
    refused_report = client.post(protocol.NODE_REPORT_PATH, body, format="json", **n1.headers())
    assert refused_report.status_code == 403
    assert client.post(protocol.NODE_REPORT_PATH, body, format="json").status_code == 403
    forged = {**body, "node_id": str(n1.node.pk)}
    assert (
        client.post(
            protocol.NODE_REPORT_PATH, forged, format="json", **n1.headers(credential="bnc_x")
        ).status_code
        == 403
    )
    n2.node.refresh_from_db()
    assert n2.node.last_report in (None, {})
    # Build reports: the same rule (and a build of another node is ignored by the service).
    build_id = str(uuid.uuid4())
    build = protocol.BuildReport(
        build_id=build_id,
        node_id=str(n2.node.pk),
        credential=n1.credential,
        seq=1,
        log="",
        log_size=0,
    )
    build_path = protocol.BUILD_REPORT_PATH.format(build_id=build_id)
    build_body = protocol.to_dict(build)
    assert client.post(build_path, build_body, format="json", **n1.headers()).status_code == 403
    other_path = protocol.BUILD_REPORT_PATH.format(build_id=uuid.uuid4())
    own_build = {**build_body, "node_id": str(n1.node.pk)}
    assert client.post(other_path, own_build, format="json", **n1.headers()).status_code == 400
    mine = client.post(protocol.NODE_REPORT_PATH, forged, format="json", **n1.headers())
    assert mine.status_code == 200, mine.content
    n1.node.refresh_from_db()
    assert n1.node.last_report["sent_at"] == "2026-01-01T00:00:00+00:00"


def _shared_broker_url() -> str:
    from config.celery import app

    return str(app.conf.broker_url)


@pytest.fixture
def node_agent(live_server: Any, acl_redis: AclRedis, settings: Any) -> Iterator[AgentProcess]:
    """A real node agent (own state directory) that joined the live control plane."""
    settings.BERTH_REGISTRY_DIR = STATE / "no-registry"
    token = secrets.token_hex(3)
    root = STATE / f"broker-{token}"
    root.mkdir(parents=True)
    env = {
        **os.environ,
        "DATABASE_URL": _database_url(),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "BERTH_ROOT": str(root / "state"),
        "BERTH_RUN_ROOT": str(root / "run"),
        "BERTH_AGENT_NAME": f"bb{token}",
    }
    agent = AgentProcess("n1", root, env)
    try:
        agent.cli("bootstrap")
        _, secret = nodes.create_join_token(actor=SYSTEM)
        agent.cli("join", live_server.url, secret, "--name", "n1")
        yield agent
    finally:
        agent.kill()
        remove_all_containers(agent)
        shutil.rmtree(root, ignore_errors=True)


def test_the_real_agent_worker_works_within_its_broker_user(
    node_agent: AgentProcess,
    acl_redis: AclRedis,
    make_tenant: Callable[..., tuple[Tenant, User]],
) -> None:
    tenant, _ = make_tenant("acme")
    identity = json.loads((Path(node_agent.env["BERTH_ROOT"]) / "node.json").read_text())
    node = Node.objects.get(pk=identity["node_id"])
    assert urlsplit(identity["broker_url"]).username == node_user(node.pk)
    container = _service_with_secret(tenant)
    redis.Redis.from_url(_shared_broker_url()).delete(node.queue)
    # The control plane's side, on the test's Redis as its admin user: the same payload
    # and task-id rule as dispatch.send.
    # Not the current app: shared tasks (the control plane's .delay()) stay on config.celery.
    control = Celery(
        "control-under-test",
        broker=acl_redis.url(),
        backend=acl_redis.url(),
        set_as_current=False,
    )
    control.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])

    def send(task: str, **kwargs: Any) -> Any:
        task_id = f"{task_id_prefix(node.pk)}{uuid.uuid4()}"
        return control.send_task(task, kwargs=kwargs, queue=node.queue, task_id=task_id)

    try:
        _apply_and_exec(node_agent, acl_redis, node, container, send)
    finally:
        control.close()


def _apply_and_exec(
    node_agent: AgentProcess,
    acl_redis: AclRedis,
    node: Node,
    container: Container,
    send: Callable[..., Any],
) -> None:
    applied = send(
        protocol.AGENT_APPLY_CONTAINER,
        op_id=placement.apply_op_id(container),
        spec=placement.agent_spec(container),
    )
    # The raw message in Redis carries no secret.
    (raw,) = acl_redis.admin().lrange(node.queue, 0, -1)
    assert SECRET_VALUE.encode() not in raw
    assert SECRET_VALUE.encode() not in base64.b64decode(json.loads(raw)["body"])

    node_agent.start()
    # A worker run in this process earlier (other tests) leaves Celery thinking any
    # get() is inside a task; this test is the control plane, waiting is its job.
    result = applied.get(timeout=120, disable_sync_subtasks=False)
    assert result.get("state") == "running", result
    # Its reports arrive over HTTP: the container is seen running.
    wait_for(
        lambda: Container.objects.get(pk=container.pk).state == ContainerState.RUNNING,
        timeout=30,
        what="the node's report of the running container",
    )
    node.refresh_from_db()
    assert node.last_report and node.last_report["containers"] >= 1
    # The container got its secret (fetched by the node over HTTP).
    env = send(
        protocol.AGENT_EXEC,
        tenant=container.tenant.slug,
        name=container.agent_name,
        argv=["env"],
    ).get(timeout=60, disable_sync_subtasks=False)
    assert f"API_KEY={SECRET_VALUE}" in env["output"]
    # Everything the worker wrote is its own; nothing reached the control queue; the
    # exec result (with the secret) is not in the agent's log.
    admin = acl_redis.admin()
    admin_text = redis.Redis.from_url(acl_redis.url(), decode_responses=True)
    results = [str(k) for k in admin_text.keys("celery-task-meta-*")]
    assert results and all(
        k.startswith(f"celery-task-meta-{task_id_prefix(node.pk)}") for k in results
    )
    assert admin.llen("control") == 0
    assert SECRET_VALUE not in node_agent.log.read_text(errors="replace")
