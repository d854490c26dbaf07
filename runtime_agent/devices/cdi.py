"""CDI (Container Device Interface): hand devices to containers by name, as podman does.

Operators (or a vendor's tooling, e.g. nvidia-ctk) drop spec files into ``/etc/cdi`` and
``/var/run/cdi`` (JSON or YAML). Each spec has a ``kind`` (``vendor.com/class``), a list of
named devices and optional spec-wide edits::

    cdiVersion: 0.6.0
    kind: nvidia.com/gpu
    devices:
      - name: "0"
        containerEdits:
          deviceNodes: [{path: /dev/nvidia0}]
    containerEdits:            # applied once when any device of this spec is used
      env: [NVIDIA_VISIBLE_DEVICES=void]
      mounts: [{hostPath: /usr/lib/libcuda.so.1, containerPath: /usr/lib/libcuda.so.1,
                options: [ro, nosuid, nodev, bind]}]
      hooks: [{hookName: createContainer, path: /usr/bin/nvidia-ctk, args: [...]}]

A container asks for fully-qualified names ``vendor.com/class=name``; ``resolve`` turns them
into OCI edits (device nodes plus their device-cgroup allow rules, mounts, env, hooks,
additional GIDs) and ``apply`` merges those into a spec. Later directories take priority
over earlier ones (``/var/run/cdi`` over ``/etc/cdi``), as in the CDI reference library.
The spec directories are root-owned node configuration: tenants only pick names.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runtime_agent.errors import InvalidArgument, NotFound

DEFAULT_SPEC_DIRS: tuple[Path, ...] = (Path("/etc/cdi"), Path("/var/run/cdi"))

_VENDOR_RE = r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?"
_CLASS_RE = r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?"
_NAME_RE = r"[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?"
KIND_RE = re.compile(rf"^{_VENDOR_RE}/{_CLASS_RE}$")
QUALIFIED_RE = re.compile(rf"^(?P<kind>{_VENDOR_RE}/{_CLASS_RE})=(?P<name>{_NAME_RE})$")
DEVICE_NAME_RE = re.compile(rf"^{_NAME_RE}$")

HOOK_NAMES = frozenset(
    {"prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"}
)


class UnknownDevice(NotFound):
    """A requested CDI device is not defined by any spec on this node."""

    code = "unknown_device"


class InvalidCDISpec(InvalidArgument):
    """A CDI spec file on the node is malformed."""

    code = "invalid_cdi_spec"


@dataclass
class ContainerEdits:
    """OCI changes contributed by CDI devices, merged in request order."""

    env: list[str] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)  # linux.devices entries
    device_rules: list[dict[str, Any]] = field(default_factory=list)  # cgroup allow rules
    mounts: list[dict[str, Any]] = field(default_factory=list)
    hooks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    additional_gids: list[int] = field(default_factory=list)

    def merge(self, other: ContainerEdits) -> None:
        self.env += other.env
        self.devices += other.devices
        self.device_rules += other.device_rules
        self.mounts += other.mounts
        for hook, entries in other.hooks.items():
            self.hooks.setdefault(hook, []).extend(entries)
        self.additional_gids += [g for g in other.additional_gids if g not in self.additional_gids]


@dataclass
class CDISpec:
    path: Path
    kind: str
    devices: dict[str, dict[str, Any]]  # name -> containerEdits
    edits: dict[str, Any]  # spec-wide containerEdits


def parse_qualified_name(name: str) -> tuple[str, str]:
    """``vendor.com/class=name`` -> (kind, device name), or InvalidArgument."""
    match = QUALIFIED_RE.match(name)
    if not match:
        raise InvalidArgument(
            f"invalid CDI device name {name!r}: expected vendor.com/class=name "
            "(e.g. nvidia.com/gpu=0)"
        )
    return match.group("kind"), match.group("name")


def load_spec(path: Path) -> CDISpec:
    """Read and check one spec file (.json, .yaml or .yml)."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise InvalidCDISpec(f"cannot read CDI spec {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidCDISpec(f"CDI spec {path} is not a mapping")
    if "cdiVersion" not in data:
        raise InvalidCDISpec(f"CDI spec {path} has no cdiVersion")
    kind = data.get("kind")
    if not isinstance(kind, str) or not KIND_RE.match(kind):
        raise InvalidCDISpec(f"CDI spec {path} has an invalid kind {kind!r}")
    devices: dict[str, dict[str, Any]] = {}
    for entry in data.get("devices") or []:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not DEVICE_NAME_RE.match(name):
            raise InvalidCDISpec(f"CDI spec {path} has a device with an invalid name {name!r}")
        if name in devices:
            raise InvalidCDISpec(f"CDI spec {path} defines device {name!r} twice")
        edits = entry.get("containerEdits") or {}
        _check_edits(path, edits)
        devices[name] = edits
    if not devices:
        raise InvalidCDISpec(f"CDI spec {path} defines no devices")
    edits = data.get("containerEdits") or {}
    _check_edits(path, edits)
    return CDISpec(path=path, kind=kind, devices=devices, edits=edits)


def _check_edits(path: Path, edits: Any) -> None:
    if not isinstance(edits, dict):
        raise InvalidCDISpec(f"CDI spec {path}: containerEdits must be a mapping")
    for node in edits.get("deviceNodes") or []:
        if not isinstance(node, dict) or not str(node.get("path", "")).startswith("/"):
            raise InvalidCDISpec(f"CDI spec {path}: device node without an absolute path")
    for mount in edits.get("mounts") or []:
        if (
            not isinstance(mount, dict)
            or not mount.get("hostPath")
            or not mount.get("containerPath")
        ):
            raise InvalidCDISpec(f"CDI spec {path}: mount needs hostPath and containerPath")
    for hook in edits.get("hooks") or []:
        if not isinstance(hook, dict) or hook.get("hookName") not in HOOK_NAMES:
            raise InvalidCDISpec(f"CDI spec {path}: hook with unknown hookName")
        if not str(hook.get("path", "")).startswith("/"):
            raise InvalidCDISpec(f"CDI spec {path}: hook path must be absolute")
    for item in edits.get("env") or []:
        if not isinstance(item, str) or "=" not in item:
            raise InvalidCDISpec(f"CDI spec {path}: env entries must be KEY=VALUE strings")


def _device_node(path: Path, node: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One CDI deviceNode -> (OCI linux.devices entry, device cgroup allow rule).

    Type and numbers come from the spec or, when missing, from the host node
    (``hostPath`` or else ``path``), as the CDI library does.
    """
    container_path = node["path"]
    host_path = node.get("hostPath") or container_path
    kind = node.get("type")
    major, minor = node.get("major"), node.get("minor")
    mode = node.get("fileMode")
    if kind is None or major is None or minor is None or mode is None:
        try:
            st = os.stat(host_path)
        except OSError as exc:
            raise InvalidCDISpec(
                f"CDI spec {path}: device {host_path} does not exist on this node"
            ) from exc
        if stat.S_ISCHR(st.st_mode):
            host_kind = "c"
        elif stat.S_ISBLK(st.st_mode):
            host_kind = "b"
        else:
            raise InvalidCDISpec(f"CDI spec {path}: {host_path} is not a device node")
        kind = kind or host_kind
        major = os.major(st.st_rdev) if major is None else major
        minor = os.minor(st.st_rdev) if minor is None else minor
        mode = stat.S_IMODE(st.st_mode) if mode is None else mode
    if kind not in ("c", "b", "u", "p"):
        raise InvalidCDISpec(f"CDI spec {path}: bad device type {kind!r}")
    device: dict[str, Any] = {
        "path": container_path,
        "type": kind,
        "major": int(major),
        "minor": int(minor),
        "fileMode": int(mode),
    }
    for key in ("uid", "gid"):
        if node.get(key) is not None:
            device[key] = int(node[key])
    access = node.get("permissions") or "rwm"
    if not set(access) <= set("rwm"):
        raise InvalidCDISpec(f"CDI spec {path}: bad device permissions {access!r}")
    rule = {
        "allow": True,
        "type": "c" if kind == "u" else kind,
        "major": int(major),
        "minor": int(minor),
        "access": access,
    }
    return device, rule


def _to_oci(path: Path, edits: dict[str, Any]) -> ContainerEdits:
    out = ContainerEdits(env=list(edits.get("env") or []))
    for node in edits.get("deviceNodes") or []:
        device, rule = _device_node(path, node)
        out.devices.append(device)
        out.device_rules.append(rule)
    for mount in edits.get("mounts") or []:
        out.mounts.append(
            {
                "destination": mount["containerPath"],
                "source": mount["hostPath"],
                "type": mount.get("type") or "bind",
                "options": list(mount.get("options") or ["rbind", "rprivate"]),
            }
        )
    for hook in edits.get("hooks") or []:
        entry: dict[str, Any] = {"path": hook["path"]}
        for key in ("args", "env", "timeout"):
            if hook.get(key) is not None:
                entry[key] = hook[key]
        out.hooks.setdefault(hook["hookName"], []).append(entry)
    out.additional_gids = [int(g) for g in edits.get("additionalGids") or []]
    return out


class CDIRegistry:
    """The CDI devices defined on this node, read from the spec directories."""

    def __init__(self, spec_dirs: Sequence[Path] = DEFAULT_SPEC_DIRS) -> None:
        self.spec_dirs = tuple(Path(d) for d in spec_dirs)
        self.errors: list[str] = []
        self._devices: dict[str, tuple[CDISpec, str]] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read every spec; a broken file is recorded in ``errors``, not fatal."""
        self.errors = []
        devices: dict[str, tuple[CDISpec, str]] = {}
        for directory in self.spec_dirs:  # later directories override earlier ones
            if not directory.is_dir():
                continue
            seen_here: dict[str, Path] = {}
            for path in sorted(directory.iterdir()):
                if path.suffix not in (".json", ".yaml", ".yml") or not path.is_file():
                    continue
                try:
                    spec = load_spec(path)
                except InvalidCDISpec as exc:
                    self.errors.append(str(exc))
                    continue
                for name in spec.devices:
                    qualified = f"{spec.kind}={name}"
                    if qualified in seen_here:
                        self.errors.append(
                            f"CDI device {qualified} defined in both {seen_here[qualified]} "
                            f"and {path}; ignoring the latter"
                        )
                        continue
                    seen_here[qualified] = path
                    devices[qualified] = (spec, name)
        self._devices = devices

    def list_devices(self) -> list[str]:
        return sorted(self._devices)

    def resolve(self, names: Iterable[str]) -> ContainerEdits:
        """OCI edits for the requested devices; unknown names raise ``UnknownDevice``."""
        requested = list(dict.fromkeys(names))
        for name in requested:
            parse_qualified_name(name)
        missing = [n for n in requested if n not in self._devices]
        if missing:
            known = ", ".join(self.list_devices()) or "none"
            message = f"unknown CDI device(s) {', '.join(missing)} (known here: {known})"
            if self.errors:
                message += "; spec errors: " + "; ".join(self.errors)
            raise UnknownDevice(message, devices=missing)
        edits = ContainerEdits()
        specs_applied: set[Path] = set()
        for name in requested:
            spec, device = self._devices[name]
            if spec.path not in specs_applied:
                specs_applied.add(spec.path)
                edits.merge(_to_oci(spec.path, spec.edits))
            edits.merge(_to_oci(spec.path, spec.devices[device]))
        return edits

    def apply(self, spec: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
        """Resolve ``names`` and merge the edits into an OCI spec (in place, returned)."""
        names = list(names)
        if not names:
            return spec
        return apply_edits(spec, self.resolve(names))


def apply_edits(spec: dict[str, Any], edits: ContainerEdits) -> dict[str, Any]:
    """Merge CDI edits into an OCI spec: env (replacing same keys), devices with their
    cgroup allow rules, mounts (replacing same destinations), hooks, additional GIDs."""
    process = spec.setdefault("process", {})
    env = list(process.get("env") or [])
    for item in edits.env:
        key = item.split("=", 1)[0]
        env = [e for e in env if e.split("=", 1)[0] != key] + [item]
    process["env"] = env
    if edits.additional_gids:
        user = process.setdefault("user", {"uid": 0, "gid": 0})
        gids = list(user.get("additionalGids") or [])
        user["additionalGids"] = gids + [g for g in edits.additional_gids if g not in gids]
    linux = spec.setdefault("linux", {})
    paths = {d["path"] for d in edits.devices}
    linux["devices"] = [d for d in linux.get("devices") or [] if d.get("path") not in paths]
    linux["devices"] += edits.devices
    resources = linux.setdefault("resources", {})
    resources["devices"] = list(resources.get("devices") or []) + edits.device_rules
    targets = {m["destination"] for m in edits.mounts}
    spec["mounts"] = [m for m in spec.get("mounts") or [] if m["destination"] not in targets]
    spec["mounts"] += edits.mounts
    if edits.hooks:
        hooks = spec.setdefault("hooks", {})
        for hook_name, entries in edits.hooks.items():
            hooks.setdefault(hook_name, []).extend(entries)
    return spec


def resolve(names: Iterable[str], spec_dirs: Sequence[Path] = DEFAULT_SPEC_DIRS) -> ContainerEdits:
    """OCI edits for CDI device names, read from the node's spec directories."""
    return CDIRegistry(spec_dirs).resolve(names)


def list_devices(spec_dirs: Sequence[Path] = DEFAULT_SPEC_DIRS) -> list[str]:
    """Fully-qualified names of every CDI device defined on this node."""
    return CDIRegistry(spec_dirs).list_devices()
