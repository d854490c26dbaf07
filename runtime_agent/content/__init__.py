"""Digest-addressed blob storage (the agent's content store)."""

from runtime_agent.content.store import BlobWriter, ContentStore, parse_digest

__all__ = ["BlobWriter", "ContentStore", "parse_digest"]
