"""CDI device specs: loading JSON/YAML from spec dirs, resolving names into OCI edits,
errors for unknown devices and broken specs, and a real container that gets the device.

There is no GPU here, so the specs alias harmless nodes: /dev/zero, and
/dev/loop-control, which is outside the default device allow-list (opening it proves the
cgroup rule; without CAP_SYS_ADMIN the container can't do anything with it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from runtime_agent.config import AgentConfig
from runtime_agent.devices import CDIRegistry, UnknownDevice, list_devices, resolve
from runtime_agent.errors import InvalidArgument
from runtime_agent.runtime.security import apply_security_defaults
from tests.agent.test_security_runc import build_rootfs


def write_specs(tmp_path: Path, hook_marker: Path | None = None) -> tuple[Path, Path]:
    etc, run = tmp_path / "etc-cdi", tmp_path / "run-cdi"
    etc.mkdir()
    run.mkdir()
    (tmp_path / "vendor.conf").write_text("vendor config\n")
    spec: dict = {
        "cdiVersion": "0.6.0",
        "kind": "example.com/fake",
        "devices": [
            {
                "name": "zero",
                "containerEdits": {
                    "deviceNodes": [{"path": "/dev/fake0", "hostPath": "/dev/zero"}],
                    "env": ["FAKE_DEVICE=zero"],
                },
            },
            {
                "name": "loopctl",
                "containerEdits": {"deviceNodes": [{"path": "/dev/loop-control"}]},
            },
        ],
        "containerEdits": {
            "env": ["FAKE_DRIVER=1"],
            "mounts": [
                {
                    "hostPath": str(tmp_path / "vendor.conf"),
                    "containerPath": "/etc/fake-vendor.conf",
                    "options": ["ro", "nosuid", "nodev", "bind"],
                }
            ],
        },
    }
    if hook_marker is not None:
        spec["containerEdits"]["hooks"] = [
            {
                "hookName": "createRuntime",
                "path": "/bin/sh",
                "args": ["sh", "-c", f"echo hook-ran > {hook_marker}"],
            }
        ]
    (etc / "fake.yaml").write_text(yaml.safe_dump(spec))
    # A JSON spec in the later directory overrides "zero" only.
    override = {
        "cdiVersion": "0.6.0",
        "kind": "example.com/fake",
        "devices": [
            {
                "name": "zero",
                "containerEdits": {
                    "deviceNodes": [{"path": "/dev/fake0", "hostPath": "/dev/zero"}],
                    "env": ["FAKE_DEVICE=zero-from-run"],
                },
            }
        ],
    }
    (run / "fake-override.json").write_text(json.dumps(override))
    (run / "broken.json").write_text("{not json")
    return etc, run


def test_resolve_device_nodes_env_mounts(tmp_path: Path) -> None:
    etc, run = write_specs(tmp_path)
    registry = CDIRegistry([etc, run])
    assert registry.list_devices() == ["example.com/fake=loopctl", "example.com/fake=zero"]
    assert list_devices([etc, run]) == registry.list_devices()
    assert any("broken.json" in e for e in registry.errors)
    edits = registry.resolve(["example.com/fake=loopctl"])
    (device,) = edits.devices
    ctl = os.stat("/dev/loop-control")
    major, minor = os.major(ctl.st_rdev), os.minor(ctl.st_rdev)
    assert device["path"] == "/dev/loop-control" and device["type"] == "c"
    assert (device["major"], device["minor"]) == (major, minor)
    assert edits.device_rules == [
        {"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"}
    ]
    assert edits.env == ["FAKE_DRIVER=1"]  # spec-wide edits come along
    assert edits.mounts[0]["destination"] == "/etc/fake-vendor.conf"
    # /var/run/cdi's definition of "zero" wins over /etc/cdi's.
    zero = resolve(["example.com/fake=zero"], [etc, run])
    assert zero.env == ["FAKE_DEVICE=zero-from-run"]
    assert zero.devices[0]["path"] == "/dev/fake0"
    assert (zero.devices[0]["major"], zero.devices[0]["minor"]) == (1, 5)


def test_unknown_and_malformed_names(tmp_path: Path) -> None:
    etc, run = write_specs(tmp_path)
    registry = CDIRegistry([etc, run])
    with pytest.raises(UnknownDevice, match=r"example\.com/fake=nope.*known here"):
        registry.resolve(["example.com/fake=nope"])
    with pytest.raises(UnknownDevice, match=r"nvidia\.com/gpu=0"):
        registry.resolve(["nvidia.com/gpu=0"])
    for bad in ("gpu0", "nvidia.com/gpu", "nvidia.com=0", "/gpu=0", "a/b=c/d"):
        with pytest.raises(InvalidArgument):
            registry.resolve([bad])


def test_no_spec_dirs_means_no_devices(tmp_path: Path) -> None:
    registry = CDIRegistry([tmp_path / "missing"])
    assert registry.list_devices() == []
    assert list_devices([tmp_path / "missing"]) == []
    with pytest.raises(UnknownDevice, match="known here: none"):
        registry.resolve(["example.com/fake=zero"])


def test_apply_merges_into_a_spec(tmp_path: Path) -> None:
    etc, run = write_specs(tmp_path, hook_marker=tmp_path / "marker")
    spec: dict[str, Any] = {
        "process": {"env": ["PATH=/bin", "FAKE_DRIVER=0"]},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {},
    }
    apply_security_defaults(spec)
    CDIRegistry([etc, run]).apply(spec, ["example.com/fake=loopctl", "example.com/fake=zero"])
    assert spec["process"]["env"] == [
        "PATH=/bin",
        "FAKE_DRIVER=1",
        "FAKE_DEVICE=zero-from-run",
    ]
    assert [d["path"] for d in spec["linux"]["devices"]] == ["/dev/loop-control", "/dev/fake0"]
    rules = spec["linux"]["resources"]["devices"]
    assert rules[0] == {"allow": False, "access": "rwm"}  # deny-all stays first
    assert {"allow": True, "type": "c", "major": 10, "minor": 237, "access": "rwm"} in rules
    assert spec["hooks"]["createRuntime"][0]["path"] == "/bin/sh"
    assert [m["destination"] for m in spec["mounts"]] == ["/proc", "/etc/fake-vendor.conf"]


@pytest.mark.privileged
@pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc")
@pytest.mark.skipif(not Path("/dev/loop-control").exists(), reason="needs /dev/loop-control")
def test_container_gets_cdi_device_and_nothing_else(
    agent_config: AgentConfig, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    etc, run = write_specs(tmp_path, hook_marker=marker)
    registry = CDIRegistry([etc, run])
    script = (
        "if [ -e /dev/fake0 ]; then head -c 4 /dev/fake0 | od -An -tx1; else echo no-fake0; fi;"
        " echo env=$FAKE_DEVICE; cat /etc/fake-vendor.conf;"
        " mknod /tmp/ctl c 10 237; cat /tmp/ctl 2>&1; true"
    )
    results = {}
    for label, devices in (
        ("with", ["example.com/fake=zero", "example.com/fake=loopctl"]),
        ("without", []),
    ):
        bundle = agent_config.root / f"cdi-{label}"
        build_rootfs(bundle / "rootfs")
        for applet in ("head", "od", "true"):
            (bundle / "rootfs" / "bin" / applet).symlink_to("busybox")
        subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
        spec = json.loads((bundle / "config.json").read_text())
        spec["process"].update(terminal=False, args=["/bin/sh", "-c", script])
        spec["root"]["path"] = str(bundle / "rootfs")
        runc_id = f"{agent_config.name}-cdi-{label}"
        spec["linux"]["cgroupsPath"] = f"/{runc_id}"
        apply_security_defaults(spec)
        registry.apply(spec, devices)
        (bundle / "config.json").write_text(json.dumps(spec))
        try:
            results[label] = subprocess.run(
                [
                    "runc",
                    "--root",
                    str(agent_config.runc_root),
                    "run",
                    "--bundle",
                    str(bundle),
                    runc_id,
                ],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
            )
        finally:
            subprocess.run(
                ["runc", "--root", str(agent_config.runc_root), "delete", "-f", runc_id],
                capture_output=True,
            )
    with_out = results["with"].stdout
    assert "00 00 00 00" in with_out
    assert "env=zero-from-run" in with_out
    assert "vendor config" in with_out
    # The device cgroup admits loop-control (a read fails with EINVAL, not EPERM)...
    assert "Invalid argument" in with_out
    assert marker.read_text().strip() == "hook-ran"
    # ...while a container without the CDI device can create the node but not open it.
    without = results["without"].stdout
    assert "no-fake0" in without and "env=\n" in without
    assert "Operation not permitted" in without
    assert "Invalid argument" not in without
