"""``inspect -f``, ``ps --format`` and ``images --format``: docker's Go templates.

The template tests need nothing; the CLI tests run real containers; the last one runs
the same templates through docker's own CLI on a docker container and compares.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from runtime_agent.cli.template import Template, TemplateError, go_string
from runtime_agent.images.bootstrap import busybox_rootfs_tar, find_busybox
from tests.agent.test_runtime_fixtures import Cli, needs_runtime

INSPECTED: dict[str, Any] = {
    "Name": "/web",
    "State": {"Status": "exited", "Running": False, "ExitCode": 3, "Pid": 0},
    "Config": {"Cmd": ["sh", "-c", "exit 3"], "Labels": {"team": "a", "tier": "b"}},
    "Mounts": [{"Source": "/v1", "RW": True}, {"Source": "/v2", "RW": False}],
    "HostConfig": {"Memory": 33554432, "NanoCpus": 0.5e9},
}


def render(source: str, value: Any = None) -> str:
    return Template.parse(source).render(INSPECTED if value is None else value)


@pytest.mark.parametrize(
    ("source", "output"),
    [
        ("{{.State.ExitCode}}", "3"),
        ("{{.State.Running}} {{.Name}}", "false /web"),
        ("{{json .Config.Cmd}}", '["sh","-c","exit 3"]'),
        ("{{.Config.Cmd}}", "[sh -c exit 3]"),  # Go's %v of a list
        ("{{.Config.Labels}}", "map[team:a tier:b]"),
        ('{{index .Config.Labels "tier"}}', "b"),
        ('{{index .Config.Labels "none"}}', "<nil>"),  # a missing map key
        ("{{range .Mounts}}{{.Source}}:{{.RW}} {{end}}", "/v1:true /v2:false "),
        ("{{range .Config.Labels}}{{.}},{{end}}", "a,b,"),  # map values, in key order
        ("{{if .State.Running}}up{{else}}down {{.State.ExitCode}}{{end}}", "down 3"),
        ("{{with .State}}{{.Status}}{{end}}", "exited"),
        ("{{.Name | upper}}", "/WEB"),
        ('{{join .Config.Cmd "|"}}', "sh|-c|exit 3"),
        ("{{len .Mounts}}", "2"),
        ("{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}", "500000000 33554432"),
        ("a {{- .Name -}} b", "a/webb"),
        (r"{{.Name}}\t{{.State.Status}}", "/web\texited"),
        ('{{`raw`}} {{"q\\"s"}}', 'raw q"s'),
    ],
)
def test_template_renders_as_go_does(source: str, output: str) -> None:
    assert render(source) == output


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{.State.Nope}}", "can't evaluate field Nope"),
        ("{{if .Name}}x", "has no {{end}}"),
        ("{{end}}", "unexpected {{end}}"),
        ("{{nosuch .Name}}", "nosuch is not a function"),
        ("{{}}", "empty action"),
    ],
)
def test_bad_templates_say_what_is_wrong(source: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message.replace("{", r"\{").replace("}", r"\}")):
        render(source)


def test_go_string_prints_values_as_fmt_does() -> None:
    assert go_string(None) == "<nil>"
    assert go_string(True) == "true"
    assert go_string(2.0) == "2"
    assert go_string(0.25) == "0.25"
    assert go_string({"b": [1, None], "a": {}}) == "map[a:map[] b:[1 <nil>]]"


F = TypeVar("F", bound=Callable[..., None])


def needs_containers(test: F) -> F:
    for mark in needs_runtime:
        test = mark(test)
    return test


@needs_containers
def test_inspect_ps_and_images_format(cli: Cli) -> None:
    assert cli("bootstrap").returncode == 0
    assert (
        cli("run", "--name", "done", "-l", "team=a", "busybox", "sh", "-c", "exit 3").returncode
        == 3
    )
    assert cli("run", "-d", "--name", "up", "busybox", "sleep", "60").returncode == 0

    shown = cli("inspect", "-f", "{{.Name}} {{.State.Status}} {{.State.ExitCode}}", "done", "up")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "/done exited 3\n/up running 0\n"

    rows = cli("ps", "-a", "--format", "{{.Names}}:{{.State}}:{{.Labels}}")
    assert sorted(rows.stdout.split()) == ["done:exited:team=a", "up:running:"]
    table = cli("ps", "--format", r"table {{.Names}}\t{{.Command}}").stdout.splitlines()
    assert table == ["NAMES     COMMAND", 'up        "sleep 60"']

    images = cli("images", "--format", "{{.Repository}}:{{.Tag}}")
    assert images.stdout == "busybox:latest\n"
    image = cli("image", "inspect", "-f", "{{json .Config.Cmd}} {{.Os}}", "busybox")
    assert image.stdout == '["sh"] linux\n'
    assert cli("volume", "create", "data").returncode == 0
    volume = cli("volume", "inspect", "-f", "{{.Name}} {{.Driver}}", "data")
    assert volume.stdout == "data local\n"

    def names(*filters: str) -> list[str]:
        flags = [part for f in filters for part in ((f,) if f == "-a" else ("--filter", f))]
        listed = cli("ps", *flags, "--format", "{{.Names}}")
        assert listed.returncode == 0, listed.stderr
        return sorted(listed.stdout.split())

    assert names() == ["up"]
    assert names("status=exited") == ["done"]  # a status filter needs no -a, as docker's
    assert names("status=exited", "status=running") == ["done", "up"]  # alternatives
    assert names("label=team=a") == []  # done has the label, but is not running
    assert names("label=team", "status=exited") == ["done"]
    assert names("exited=3") == []  # without -a, as docker's
    assert names("exited=3", "-a") == ["done"]
    assert names("exited=0", "-a") == []
    assert names("name=^u") == ["up"]
    assert names("name=o", "status=running") == []  # different keys all apply
    up_id = cli("inspect", "-f", "{{.Id}}", "up").stdout.strip()
    assert names(f"id={up_id[:6]}") == ["up"]
    assert names("status=dead") == []
    refused = cli("ps", "--filter", "colour=red")
    assert refused.returncode == 125 and "invalid filter 'colour=red'" in refused.stderr
    refused = cli("ps", "--filter", "status=sleepy")
    assert refused.returncode == 125 and "invalid filter 'status=sleepy'" in refused.stderr

    bad = cli("inspect", "-f", "{{.State.Nope}}", "up")
    assert bad.returncode == 125
    assert "can't evaluate field Nope" in bad.stderr
    assert bad.stdout == ""
    unbalanced = cli("ps", "--format", "{{if .Names}}")
    assert unbalanced.returncode == 125 and "has no {{end}}" in unbalanced.stderr


def _docker(*args: str, code: int = 0) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, check=False)
    assert proc.returncode == code, f"docker {' '.join(args)}: {proc.stderr}"
    return proc.stdout


@needs_containers
def test_same_templates_same_output_as_docker(cli: Cli, tmp_path: Path) -> None:
    """The templates CI scripts use, through docker's CLI on a docker container and
    through berth-agent on a Berth one, both running the same busybox."""
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        pytest.skip("no Docker engine")
    assert cli("bootstrap").returncode == 0
    image = f"berthtest-{secrets.token_hex(4)}/busybox:latest"
    rootfs = tmp_path / "rootfs.tar"
    with open(rootfs, "wb") as out:
        busybox_rootfs_tar(find_busybox(), out)
    _docker("import", str(rootfs), image)
    name = f"berthtest-{secrets.token_hex(4)}"
    try:
        _docker("run", "--name", name, "-l", "team=a", image, "sh", "-c", "exit 3", code=3)
        assert (
            cli("run", "--name", name, "-l", "team=a", "busybox", "sh", "-c", "exit 3").returncode
            == 3
        )
        for template in (
            "{{.State.Status}} {{.State.ExitCode}} {{.State.Running}} {{.State.OOMKilled}}",
            '{{json .Config.Cmd}} {{.Config.Labels}} {{index .Config.Labels "team"}}',
            "{{.Name}} {{if .State.Running}}up{{else}}down{{end}} {{len .Id}}",
        ):
            berth = cli("inspect", "-f", template, name)
            assert berth.stdout == _docker("inspect", "-f", template, name), template
        listed = "{{.Names}} {{.State}} {{.Labels}} {{.Command}}"
        ours = cli("ps", "-a", "--format", listed).stdout
        assert ours == _docker("ps", "-a", "--filter", f"name={name}", "--format", listed)
        for filters in (
            ["status=exited"],
            ["status=running"],
            ["label=team=a"],
            ["label=team=b"],
            ["exited=3", "label=team"],
            ["exited=3", "-a"],
            ["exited=0", "-a"],
        ):
            flags = [
                part
                for f in [f"name=^{name}$", *filters]
                for part in ((f,) if f == "-a" else ("--filter", f))
            ]
            ours = cli("ps", *flags, "--format", "{{.Names}}").stdout
            assert ours == _docker("ps", *flags, "--format", "{{.Names}}"), filters
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        subprocess.run(["docker", "rmi", image], capture_output=True, check=False)
