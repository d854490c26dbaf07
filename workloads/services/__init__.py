"""Workload services: every write to nodes, services, containers and jobs goes through here."""
