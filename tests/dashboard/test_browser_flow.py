"""The dashboard in headless Chromium against a real Berth (one agent running real
containers): sign up → token → deploy → running with logs → scale → batch job → invite a
viewer who accepts → the viewer cannot deploy → billing shows plan and seats.
Screenshots of the main pages go to artifacts/screenshots/ on every run."""

from __future__ import annotations

import io
import re
import tarfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core import mail
from playwright.sync_api import Browser, FilePayload, Page, expect

from billing import services as billing
from tenants.models import Tenant
from tenants.services import Actor
from tests.dashboard.conftest import PASSWORD
from workloads.models import Service

pytestmark = [pytest.mark.browser, pytest.mark.privileged, pytest.mark.timeout(600)]

COMMAND = (
    "sh -c 'echo hello from $HOSTNAME; i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done'"
)


def _context_tar() -> bytes:
    dockerfile = b"FROM busybox\nRUN echo built by berth > /built.txt\n"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
    return buffer.getvalue()


def _submit(page: Page, button: str) -> None:
    page.get_by_role("button", name=button, exact=True).click()


def test_team_flow_in_a_real_browser(
    one_node: Any, page: Page, browser: Browser, screenshot: Callable[..., Path]
) -> None:
    base = one_node.url
    expect.set_options(timeout=15_000)
    page.set_viewport_size({"width": 1280, "height": 900})

    # Sign up; a bad slug is refused inline and the rest of what was typed stays.
    page.goto(f"{base}/signup/")
    # Keyboard first: Tab reaches the skip link, which moves focus to the content.
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.get_by_label("Email").fill("ada@lovelace.example")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_label("Organisation name").fill("Lovelace Labs")
    page.get_by_label("Organisation slug").fill("Not A Slug")
    _submit(page, "Sign up")
    expect(page.get_by_text("Use lowercase letters")).to_be_visible()
    expect(page.get_by_label("Organisation name")).to_have_value("Lovelace Labs")
    expect(page.get_by_label("Organisation slug")).to_have_attribute("aria-invalid", "true")
    screenshot("signup-error")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_label("Organisation slug").fill("lovelace")
    _submit(page, "Sign up")
    # The address is confirmed by the emailed link (the live server shares this process's
    # locmem outbox).
    expect(page.get_by_role("heading", name="Check your email")).to_be_visible()
    body = str(mail.outbox[-1].body)
    link = re.search(r"http://\S+/signup/verify/\S+/", body)
    assert link is not None, body
    page.goto(link.group(0))
    expect(page).to_have_url(f"{base}/t/lovelace/")
    expect(page.get_by_role("heading", name="Lovelace Labs overview")).to_be_visible()

    # An API token: the secret is shown once and works against the API.
    page.get_by_role("link", name="API tokens").click()
    page.get_by_label("Name").fill("ci")
    page.get_by_label("Scope").select_option("write")
    _submit(page, "Create token")
    secret = page.locator("#new-token").inner_text().strip()
    assert re.fullmatch(r"brt_[a-z0-9]{8}_\S+", secret)
    screenshot("tokens")
    request = urllib.request.Request(  # noqa: S310 (the live server's http URL)
        f"{base}/api/v1/me/", headers={"Authorization": f"Bearer {secret}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        assert response.status == 200
    page.reload()
    expect(page.locator("#new-token")).to_have_count(0)

    # Deploy a service and watch it run, with its logs, live (htmx polling).
    page.get_by_role("link", name="Services").click()
    page.get_by_role("link", name="Deploy a service").click()
    page.get_by_label("Name").fill("web")
    page.get_by_label("Image").fill("busybox")
    page.get_by_label("Command").fill(COMMAND)
    page.get_by_label("Replicas").fill("1")
    page.get_by_label("CPU (millicores)").fill("100")
    page.get_by_label("Memory (MiB)").fill("32")
    page.get_by_label("Environment").fill("GREETING=hi")
    page.get_by_label("Secrets").fill("API_KEY=s3cret")
    _submit(page, "Deploy")
    expect(page).to_have_url(f"{base}/t/lovelace/services/web/")
    replicas = page.get_by_test_id("replicas")
    expect(replicas.locator(".state.running")).to_have_count(1, timeout=90_000)
    logs = page.locator("#service-logs pre.logs")
    expect(logs).to_contain_text("hello from", timeout=30_000)
    expect(logs).to_contain_text("tick", timeout=30_000)
    expect(page.get_by_text("API_KEY")).to_be_visible()
    expect(page.get_by_text("s3cret")).to_have_count(0)

    # Scale to two replicas; both run.
    page.get_by_role("spinbutton", name="Replicas").fill("2")
    _submit(page, "Scale")
    expect(page.get_by_text("Scaled web to 2 replica(s).")).to_be_visible()
    expect(replicas.locator(".state.running")).to_have_count(2, timeout=90_000)
    # Graphs come from the stored readings the node reports every second.
    page.reload()
    expect(page.locator("#service-charts polyline[points*=',']").first).to_be_attached(
        timeout=30_000
    )
    expect(page.locator("#service-logs pre.logs")).to_contain_text("tick", timeout=30_000)
    screenshot("service")

    # A batch job: submit, see it finish with its output.
    page.get_by_role("link", name="Batch jobs").click()
    page.get_by_role("link", name="Submit a job").click()
    page.get_by_label("Image").fill("busybox")
    page.get_by_label("Command").fill("sh -c 'echo job says $BERTH_JOB_INDEX'")
    page.get_by_label("CPU (millicores)").fill("100")
    page.get_by_label("Memory (MiB)").fill("16")
    _submit(page, "Submit")
    expect(page.get_by_test_id("job-state")).to_have_text("succeeded", timeout=90_000)
    page.reload()
    expect(page.locator("pre.logs")).to_contain_text("job says 0", timeout=30_000)
    screenshot("job")

    # A build from an uploaded context, its log live until it ends.
    page.get_by_role("link", name="Builds").click()
    page.get_by_label("Build context (tar)").set_input_files(
        files=[FilePayload(name="ctx.tar", mimeType="application/x-tar", buffer=_context_tar())]
    )
    page.get_by_label("Tag").fill("hello:v1")
    _submit(page, "Upload and build")
    expect(page.get_by_test_id("build-state")).to_have_text("succeeded", timeout=120_000)
    expect(page.locator("pre.logs")).to_contain_text("Successfully tagged hello:v1")
    screenshot("build")

    # A volume and a network.
    page.get_by_role("link", name="Volumes & networks").click()
    page.get_by_label("Size (GiB)").fill("1")
    page.locator("#vol-h").locator("..").get_by_label("Name:").fill("data")
    _submit(page, "Create volume")
    expect(page.get_by_text("Volume data created (1 GiB).")).to_be_visible()
    screenshot("storage")

    # More seats (a platform admin comps the Team plan: Free has one seat), then invite.
    tenant = Tenant.objects.get(slug="lovelace")
    billing.change_plan(
        tenant, "team", seats=3, without_subscription=True, actor=Actor.for_system("test")
    )
    page.get_by_role("link", name="Members").click()
    page.get_by_label("Email").fill("grace@hopper.example")
    page.get_by_label("Role:", exact=True).select_option("viewer")
    _submit(page, "Send invitation")
    expect(page.get_by_text("Invitation sent to grace@hopper.example.")).to_be_visible()
    shown = page.locator("#invitation-link").inner_text()
    link = re.search(r"(http\S+/invitations/inv_\S+)", shown)
    assert link is not None, shown
    screenshot("members")

    # The invited viewer accepts in their own browser session ...
    viewer_context = browser.new_context(viewport={"width": 390, "height": 844})
    viewer = viewer_context.new_page()
    viewer.goto(link.group(1).rstrip("/") + "/")
    expect(viewer.get_by_role("heading", name="Join Lovelace Labs")).to_be_visible()
    viewer.get_by_label("Password").fill(PASSWORD)
    viewer.get_by_role("button", name="Accept invitation").click()
    expect(viewer).to_have_url(f"{base}/t/lovelace/")
    # ... sees the service but no way to change it ...
    viewer.goto(f"{base}/t/lovelace/services/web/")
    expect(viewer.get_by_test_id("replicas").locator(".state.running")).to_have_count(2)
    for name in ("Deploy", "Scale", "Restart", "Stop", "Delete"):
        expect(viewer.get_by_role("button", name=name, exact=True)).to_have_count(0)
    viewer.goto(f"{base}/t/lovelace/services/")
    expect(viewer.get_by_role("link", name="Deploy a service")).to_have_count(0)
    screenshot("viewer-services-mobile", viewer)
    # ... and is refused when posting anyway (with a valid CSRF token).
    status = viewer.evaluate(
        """async () => {
            const csrf = document.cookie.split('; ')
                .find(c => c.startsWith('csrftoken=')).split('=')[1];
            const body = new URLSearchParams({replicas: '5', csrfmiddlewaretoken: csrf});
            const r = await fetch('/t/lovelace/services/web/scale/', {method: 'POST', body});
            return r.status;
        }"""
    )
    assert status == 403
    assert Service.objects.get(tenant=tenant, name="web").replicas == 2
    viewer_context.close()

    # Billing shows the plan and the seats.
    page.get_by_role("link", name="Billing").click()
    expect(page.get_by_test_id("plan")).to_contain_text("Team")
    expect(page.get_by_test_id("seats")).to_have_text("3 seats, 2 used")
    expect(page.get_by_test_id("plan")).to_contain_text("$15.00 per seat per month")
    screenshot("billing")
    page.get_by_role("link", name="Overview").click()
    expect(page.locator("meter").first).to_be_attached()
    screenshot("overview")
    page.get_by_role("link", name="Audit log").click()
    expect(page.get_by_text("invitation.accept")).to_be_visible()
    screenshot("audit")

    # A session that expires while a page polls: the next poll sends the browser to log
    # in, and logging in comes back to the page it was on.
    page.goto(f"{base}/t/lovelace/services/web/")
    page.context.clear_cookies()
    expect(page).to_have_url(re.compile(r"/login/\?next=%2Ft%2Flovelace%2Fservices%2Fweb%2F$"))
    page.get_by_label("Email").fill("ada@lovelace.example")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{base}/t/lovelace/services/web/")
