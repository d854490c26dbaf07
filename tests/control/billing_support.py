"""Fixtures for the billing tests: localstripe in a subprocess, Stripe settings pointing at
it, webhook payloads signed with the real Stripe scheme, and delivery of localstripe's own
events to Berth's webhook view.

Loaded by the billing test modules with ``pytest_plugins``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import requests
from django.core.management import call_command
from django.test import Client

from billing.models import PlanPrice
from config.celery import app as celery_app
from tests.control.billing_helpers import (
    SECRET_KEY,
    WEBHOOK_SECRET,
    free_port,
    post_event,
)

LAUNCHER = Path(__file__).resolve().parents[1] / "localstripe_ext" / "server.py"


@pytest.fixture(scope="session")
def localstripe_url() -> Iterator[str]:
    """A localstripe (with Berth's extensions) on a free 127.0.0.1 port for the session."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(LAUNCHER), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                requests.get(f"{url}/v1/customers", auth=(SECRET_KEY, ""), timeout=1)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"localstripe did not start: {err}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def stripe_settings(settings: Any) -> Any:
    """Stripe settings for tests that never reach a Stripe server (webhooks only)."""
    settings.STRIPE_SECRET_KEY = SECRET_KEY
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.STRIPE_API_BASE = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    return settings


@pytest.fixture
def localstripe(localstripe_url: str, stripe_settings: Any) -> str:
    """Point billing at localstripe, emptied before each test."""
    requests.delete(f"{localstripe_url}/_config/data", timeout=5).raise_for_status()
    requests.delete(
        f"{localstripe_url}/_ext/meter_events", auth=(SECRET_KEY, ""), timeout=5
    ).raise_for_status()
    stripe_settings.STRIPE_API_BASE = localstripe_url
    return localstripe_url


@pytest.fixture
def eager_celery() -> Iterator[None]:
    """Run tasks in-process when they are enqueued (after commit)."""
    old = celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates
    celery_app.conf.task_always_eager = True
    celery_app.conf.task_eager_propagates = True
    yield
    celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates = old


@pytest.fixture
def deliver_stripe_events(
    localstripe: str, client: Client, django_capture_on_commit_callbacks: Callable[..., Any]
) -> Callable[..., list[str]]:
    """Post localstripe's events, oldest first, signed, to the webhook view; return types.

    localstripe's own delivery posts them to a URL after a delay; fetching and posting them
    here runs the same payloads through the same signature check, deterministically.
    """
    seen: set[str] = set()

    def deliver(types: set[str] | None = None) -> list[str]:
        events = requests.get(
            f"{localstripe}/v1/events", params={"limit": 100}, auth=(SECRET_KEY, ""), timeout=5
        ).json()["data"]
        delivered = []
        for event in events:  # localstripe lists them in the order they happened
            if event["id"] in seen or (types is not None and event["type"] not in types):
                continue
            seen.add(event["id"])
            payload = json.dumps(event).encode()
            with django_capture_on_commit_callbacks(execute=True):
                response = post_event(client, payload)
            assert response.status_code == 200, response.content
            delivered.append(event["type"])
        return delivered

    return deliver


@pytest.fixture
def stripe_plans(localstripe: str, db: None) -> dict[str, PlanPrice]:
    """The paid plans' products and prices in localstripe (``sync_stripe_plans``; the plans
    themselves are seeded for every database test)."""
    call_command("sync_stripe_plans", stdout=StringIO())
    return {p.plan.code: p for p in PlanPrice.objects.filter(plan__isnull=False) if p.plan}
