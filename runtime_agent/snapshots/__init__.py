"""Unpacked layers shared read-only, and per-container overlayfs snapshots."""
