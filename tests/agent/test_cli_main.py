"""The CLI's command table: every command loads exactly the module that defines it."""

from __future__ import annotations

import argparse
import importlib

import pytest

from runtime_agent.cli import main


def _registered(module_name: str) -> set[str]:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    importlib.import_module(module_name).register(subparsers)
    return set(subparsers.choices)


def test_fast_command_table_matches_the_modules() -> None:
    expected = {
        command: module for module in main.COMMAND_MODULES for command in _registered(module)
    }
    assert main.FAST_COMMANDS == expected


def test_a_command_builds_a_parser_with_only_its_module() -> None:
    parser = main.build_parser(["volume", "ls"])
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == _registered("runtime_agent.cli.volumes")


def test_unknown_command_is_a_usage_error_with_docker_exit_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    try:
        main.main(["no-such-command"])
    except SystemExit as exc:
        assert exc.code == main.EXIT_AGENT_ERROR
    else:
        raise AssertionError("an unknown command must fail")
    assert "invalid choice" in capsys.readouterr().err
