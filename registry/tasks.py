"""Periodic registry maintenance (thin, idempotent Celery tasks)."""

from __future__ import annotations

from celery import shared_task

from registry import services
from tenants.services import Actor


@shared_task
def apply_retention_task() -> dict[str, dict[str, list[str]]]:
    return services.apply_all_retention(actor=Actor.for_system("registry-retention"))


@shared_task
def garbage_collect_task(dry_run: bool = False) -> int:
    return services.run_garbage_collection(
        dry_run=dry_run, actor=Actor.for_system("registry-gc")
    ).pk


@shared_task
def scan_storage_task() -> dict[str, int]:
    """Count blobs pushed without a manifest and unfinished uploads in every tenant's
    storage use (the registry sends no notification for them)."""
    return services.scan_all_storage()
