"""The Dockerfile corpus (tests/agent/dockerfiles/*): each case builds under Berth to the
expected file tree and config, and its image runs. Privileged (RUN steps use runc)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime_agent.agent import Agent
from runtime_agent.build.steps import BuildLimits
from tests.agent.dockerfiles.support import (
    build,
    build_cgroups_removed,  # noqa: F401 - fixture
    check_expected,
    corpus_cases,
    corpus_context,
    image_tree,
    make_base,
    run_image,
)

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("build_cgroups_removed")]

T = "corpus"


@pytest.mark.parametrize("case", corpus_cases())
def test_corpus_case_builds_expected_image(agent: Agent, tmp_path: Path, case: str) -> None:
    make_base(agent, T, tmp_path)
    ctx, expected = corpus_context(case, tmp_path / case)
    args = {"BASE": "busybox:latest", **expected.get("build_args", {})}
    events = build(
        agent, T, ctx, tag=f"{case}:test", build_args=args, limits=BuildLimits(network=None)
    )
    assert events[-1].kind == "done"
    image = agent.images.resolve(T, f"{case}:test")
    check_expected(image_tree(agent, T, f"{case}:test"), image.container_config, expected)
    if "run" in expected:
        code, output = run_image(agent, T, f"{case}:test", expected["run"]["cmd"] or None)
        assert (code, output) == (0, expected["run"]["output"])
    # and a second build is entirely cached, to the same image
    again = build(
        agent, T, ctx, tag=f"{case}:test", build_args=args, limits=BuildLimits(network=None)
    )
    assert again[-1].digest == events[-1].digest
    assert not any(e.kind == "output" for e in again)
