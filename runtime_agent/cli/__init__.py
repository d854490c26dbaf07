"""berth-agent: the docker-like local CLI."""
