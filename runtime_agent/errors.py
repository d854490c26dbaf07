"""Typed errors of the node agent.

Each carries a message a user can act on. The CLI maps them to docker-like exit codes
(125 for the CLI's and the agent's own errors, 126/127 when a command can't run); the
Celery worker maps them to error codes in task results.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base class; ``code`` is stable and machine-readable."""

    code = "internal"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message


class InvalidArgument(AgentError):
    """The request is malformed: a bad flag value, a bad name, a bad reference."""

    code = "invalid_argument"


class NotFound(AgentError):
    """The named object (image, container, volume, network, blob) does not exist."""

    code = "not_found"


class AlreadyExists(AgentError):
    """An object with that name or key already exists."""

    code = "already_exists"


class FailedPrecondition(AgentError):
    """The object is in the wrong state for the operation (e.g. rm of a running container)."""

    code = "failed_precondition"


class ResourceExhausted(AgentError):
    """A limit was hit: a tenant cap, disk space, an address pool, a port."""

    code = "resource_exhausted"


class CommandNotRunnable(AgentError):
    """The container's command exists but cannot be executed (docker exit 126)."""

    code = "command_not_runnable"


class CommandNotFound(AgentError):
    """The container's command does not exist in the image (docker exit 127)."""

    code = "command_not_found"


class DigestMismatch(AgentError):
    """Content did not hash to the digest it was announced under."""

    code = "digest_mismatch"


class InvalidArchive(InvalidArgument):
    """An image archive or layer tarball is corrupt, unsupported or hostile."""

    code = "invalid_archive"
