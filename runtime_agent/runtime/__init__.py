"""Containers through runc: OCI config, conmon monitors, lifecycle, logs, exec, restarts."""
