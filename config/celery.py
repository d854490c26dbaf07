"""The Celery app, configured from Django settings (keys prefixed CELERY_)."""

from __future__ import annotations

import os

from celery import Celery

from runtime_agent import tasklog

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("berth")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# Task results carry tenants' data; Celery would log each one on success.
tasklog.install()
