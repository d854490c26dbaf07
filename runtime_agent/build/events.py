"""What a build reports while it runs: the Python API yields these, the CLI prints them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runtime_agent.errors import AgentError


@dataclass(frozen=True)
class BuildEvent:
    """One thing that happened during a build.

    kinds: ``step`` (an instruction starts), ``cached`` (it was satisfied from the
    cache), ``output`` (a RUN step's output), ``layer`` (a step finished; ``digest`` is
    the state's short id), ``warning``, ``done`` (``digest`` is the image's config digest,
    ``reference`` the tag) and ``error``.
    """

    kind: str
    message: str = ""
    step: int | None = None
    total: int | None = None
    stage: str | None = None
    digest: str | None = None
    reference: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        """Docker's classic ``docker build`` log lines."""
        if self.kind == "step":
            return f"Step {self.step}/{self.total} : {self.message}\n"
        if self.kind == "cached":
            return " ---> Using cache\n"
        if self.kind == "layer":
            return f" ---> {self.digest}\n"
        if self.kind == "output":
            return self.message
        if self.kind == "warning":
            return f"[Warning] {self.message}\n"
        if self.kind == "done":
            lines = f"Successfully built {self.digest}\n"
            if self.reference:
                lines += f"Successfully tagged {self.reference}\n"
            return lines
        if self.kind == "error":
            return f"{self.message}\n"
        return f"{self.message}\n"


class BuildFailed(AgentError):
    """A build step failed; carries the instruction, its exit code and its output."""

    code = "build_failed"

    def __init__(
        self,
        message: str,
        *,
        instruction: str = "",
        exit_code: int | None = None,
        output: str = "",
        **details: object,
    ) -> None:
        super().__init__(message, instruction=instruction, exit_code=exit_code, **details)
        self.instruction = instruction
        self.exit_code = exit_code
        self.output = output
