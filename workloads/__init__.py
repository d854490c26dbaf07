"""Workloads: nodes, images, builds, services, containers, jobs, volumes, networks."""
