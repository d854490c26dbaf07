"""Executes a parsed Dockerfile into an image in the agent's store.

One thread per needed stage (a stage waits only for the stages it reads from, so
independent stages build in parallel); events flow through a queue to the caller's
iterator. Each step first looks in the tenant's cache; a miss executes it: RUN in a
container via ``StepRunner``, COPY/ADD/WORKDIR as layer tars written directly, the rest
as config edits with an ``empty_layer`` history entry. The image is committed (and
tagged) only after every stage succeeded, so a failed build leaves no tag behind.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import os
import posixpath
import queue
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from runtime_agent.build import dockerfile as df
from runtime_agent.build.cache import BuildCache, digest_json
from runtime_agent.build.context import BuildContext, _glob_match, _has_glob
from runtime_agent.build.events import BuildEvent, BuildFailed
from runtime_agent.build.layers import FsIndex, LayerBudget, LayerWriter, index_for, lookup_ids
from runtime_agent.build.shell import process_word, process_words
from runtime_agent.build.steps import BuildLimits, RunRequest, StepRunner
from runtime_agent.errors import AgentError, FailedPrecondition, InvalidArgument, NotFound
from runtime_agent.images import media

if TYPE_CHECKING:
    from runtime_agent.agent import Agent
    from runtime_agent.archive import ArchiveLimits

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_SHELL = ["/bin/sh", "-c"]
OUTPUT_TAIL = 64 * 1024
INDEX_MEMO = 64  # parsed image trees kept in memory (a worker builds many images)
SCRATCH_PREFIX = ".build-scratch-"  # a step's scratch dir on a tenant's layer filesystem
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_duration(text: str, what: str) -> int:
    """Go ``time.ParseDuration`` (as HEALTHCHECK flags use it) -> nanoseconds."""
    pos, total = 0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += int(float(m.group(1)) * _UNITS[m.group(2)])
        pos = m.end()
    if pos != len(text) or not text:
        raise InvalidArgument(f"HEALTHCHECK: invalid duration for --{what}: {text!r}")
    return total


class _Spools:
    """Scratch files of one build step (what ``COPY --from`` reads out of an image's
    layers), in a private directory under what ``root()`` names: small ones stay in
    memory, larger ones spill there, never to the system's /tmp. ``close`` removes them
    all; the directory (and ``root()``, which may mount a filesystem) is made only when a
    file first needs it."""

    SPILL_BYTES = 8 << 20

    def __init__(self, root: Callable[[], Path]) -> None:
        self.root = root
        self.dir: Path | None = None
        self.files: list[IO[bytes]] = []

    def new(self) -> IO[bytes]:
        if self.dir is None:
            root = self.root()
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=root))
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(
            max_size=self.SPILL_BYTES, dir=str(self.dir)
        )
        self.files.append(spool)
        return spool

    def close(self) -> None:
        for spool in self.files:
            spool.close()
        self.files.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


@dataclass
class _Item:
    """One filesystem entry to place in a COPY/ADD layer."""

    rel: str  # relative to the copied root ("" = the root)
    kind: str
    mode: int
    size: int = 0
    linkname: str = ""
    mtime: float = 0.0
    opener: Callable[[], IO[bytes]] | None = None


@dataclass
class _State:
    """An image being built: full OCI config, layer descriptors, and its identity."""

    config: dict[str, Any]
    layers: list[dict[str, Any]]
    cmd_set: bool = False
    index: FsIndex | None = None

    @property
    def id(self) -> str:
        return digest_json({"config": self.config, "layers": [x["digest"] for x in self.layers]})

    @property
    def run(self) -> dict[str, Any]:
        return self.config.setdefault("config", {})

    def clone(self) -> _State:
        return _State(copy.deepcopy(self.config), list(self.layers), self.cmd_set, self.index)

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.run.get("Env") or []:
            key, _, value = item.partition("=")
            out[key] = value
        return out

    def set_env(self, key: str, value: str) -> None:
        env = list(self.run.get("Env") or [])
        for i, item in enumerate(env):
            if item.partition("=")[0] == key:
                env[i] = f"{key}={value}"
                break
        else:
            env.append(f"{key}={value}")
        self.run["Env"] = env

    def history(self, created_by: str, *, empty: bool) -> None:
        entry: dict[str, Any] = {"created": _now(), "created_by": created_by}
        if empty:
            entry["empty_layer"] = True
        self.config.setdefault("history", []).append(entry)


@dataclass
class _Job:
    """One build's shared state across its stage threads."""

    tenant: str
    ctx: BuildContext
    file: df.Dockerfile
    build_args: dict[str, str]
    meta: dict[str, str]
    no_cache: bool
    limits: BuildLimits
    cache: BuildCache
    events: queue.Queue[BuildEvent | None]
    step_numbers: dict[int, int]  # stage index -> number of its FROM step
    total: int
    results: dict[int, _State] = field(default_factory=dict)
    done: dict[int, threading.Event] = field(default_factory=dict)
    failed: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    used_args: set[str] = field(default_factory=set)
    deadline: float = 0.0
    budget: LayerBudget | None = None  # bytes its COPY/ADD layers may hold, all stages


class Builder:
    """``Builder(agent).build(...)`` yields ``BuildEvent``s and commits the image."""

    def __init__(self, agent: Agent, runner: StepRunner | None = None) -> None:
        self.agent = agent
        self._runner = runner
        self._base_index: dict[str, FsIndex] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def runner(self) -> StepRunner:
        if self._runner is None:
            from runtime_agent.build.run import ContainerStepRunner

            self._runner = ContainerStepRunner(self.agent)
        return self._runner

    def cache(self, tenant: str) -> BuildCache:
        return BuildCache(self.agent.config.build_cache_dir, tenant, self.agent.content)

    def recover(self) -> list[str]:
        """Remove what builds interrupted by an agent crash left: their RUN steps'
        snapshots, runc containers and bundles, and unpacked contexts. Call at agent start,
        before any build runs. Returns what was removed."""
        import json
        import subprocess

        removed: list[str] = []
        config = self.agent.config
        for info in self.agent.snapshots.list():
            if info.key.startswith("build-"):
                self.agent.snapshots.remove(info.key)
                removed.append(f"snapshot {info.key}")
        runc = [config.runc, "--root", str(config.runc_root)]
        listed = subprocess.run([*runc, "list", "--format", "json"], capture_output=True,
                                text=True, check=False)  # fmt: skip
        for container in json.loads(listed.stdout or "null") or []:
            if str(container.get("id", "")).startswith(f"{config.name}-build-"):
                subprocess.run([*runc, "delete", "--force", container["id"]],
                               capture_output=True, check=False)  # fmt: skip
                removed.append(f"runc {container['id']}")
        scratch = [*config.build_cache_dir.glob(SCRATCH_PREFIX + "*")]
        # COPY --from scratch on the tenants' (mounted) layer filesystems
        scratch += config.snapshots_dir.glob(f"tenants/*/fs/{SCRATCH_PREFIX}*")
        for leftover in (config.run_root / "build", config.build_cache_dir / ".contexts"):
            if leftover.is_dir():
                scratch += leftover.iterdir()
        for entry in scratch:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
        return removed

    def prune_cache(self, tenant: str | None = None, *, all_entries: bool = False) -> int:
        """Drop cache entries whose layers were garbage-collected with the images (or all
        of a tenant's entries); run after ``ImageStore.gc``. Returns how many went."""
        root = self.agent.config.build_cache_dir
        tenants = (
            [tenant]
            if tenant
            else [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
            if root.is_dir()
            else []
        )
        return sum(self.cache(t).prune(all_entries=all_entries) for t in tenants)

    # ------------------------------------------------------------------ entry point
    def build(
        self,
        tenant: str,
        context: Path | str | BinaryIO | BuildContext,
        dockerfile: str | None = None,
        tag: str | None = None,
        build_args: dict[str, str] | None = None,
        target: str | None = None,
        no_cache: bool = False,
        *,
        limits: BuildLimits | None = None,
        dockerfile_text: str | None = None,
    ) -> Generator[BuildEvent, None, None]:
        """Build ``context`` (a directory, a tar stream or a ``BuildContext``).

        ``dockerfile`` is the Dockerfile's path inside the context (default
        ``Dockerfile``) unless ``dockerfile_text`` gives its contents. Yields events as
        the build goes; the last is ``done`` (with the image digest) or the iterator
        raises the error that stopped the build (after an ``error`` event).
        """
        from runtime_agent.images.reference import validate_tenant

        validate_tenant(tenant)
        limits = limits or BuildLimits()
        owned = not isinstance(context, BuildContext)
        if isinstance(context, BuildContext):
            ctx = context
        elif isinstance(context, (str, Path)):
            ctx = BuildContext.from_directory(Path(context), limits.context_bytes)
        else:
            tmp_root = self.agent.config.build_cache_dir / ".contexts"
            tmp_root.mkdir(parents=True, exist_ok=True)
            ctx = BuildContext.from_tar(
                context,
                limits.context_bytes,
                workdir=tmp_root,
                max_entries=self.agent.config.context_max_entries,
            )
        try:
            yield from self._build(
                tenant,
                ctx,
                dockerfile,
                dockerfile_text,
                tag,
                build_args or {},
                target,
                no_cache,
                limits,
            )
        finally:
            if owned:
                ctx.close()

    def _build(
        self,
        tenant: str,
        ctx: BuildContext,
        dockerfile: str | None,
        dockerfile_text: str | None,
        tag: str | None,
        build_args: dict[str, str],
        target: str | None,
        no_cache: bool,
        limits: BuildLimits,
    ) -> Generator[BuildEvent, None, None]:
        name = dockerfile or "Dockerfile"
        if dockerfile_text is None:
            path = ctx.full_path(name)
            if not path.is_file():
                raise NotFound(f"Cannot locate specified Dockerfile: {name}")
            dockerfile_text = path.read_text()
        parsed = df.parse(dockerfile_text, name)
        if tag is not None:
            from runtime_agent.images.reference import parse_reference

            parse_reference(tag)
        os_name, arch = media.host_platform()
        platform = f"{os_name}/{arch}"
        meta = {
            "BUILDPLATFORM": platform,
            "TARGETPLATFORM": platform,
            "TARGETOS": os_name,
            "TARGETARCH": arch,
            "BUILDOS": os_name,
            "BUILDARCH": arch,
        }
        used: set[str] = set()
        for instr in parsed.meta_args:
            for arg in instr.args:
                key, has_default, default = arg.partition("=")
                used.add(key)
                if key in build_args:
                    meta[key] = build_args[key]
                elif has_default:
                    meta[key] = process_word(default, meta, parsed.escape)
        final = parsed.stage(target) if target else parsed.stages[-1]
        needed = self._needed(parsed, final, meta)
        numbers: dict[int, int] = {}
        total = len(parsed.meta_args)  # docker numbers the ARGs before FROM as steps too
        for stage in parsed.stages:
            if stage.index in needed:
                numbers[stage.index] = total + 1
                total += 1 + len(stage.instructions)
        job = _Job(
            tenant,
            ctx,
            parsed,
            build_args,
            meta,
            no_cache,
            limits,
            self.cache(tenant),
            queue.Queue(),
            numbers,
            total,
            used_args=used,
            deadline=time.monotonic() + limits.build_timeout,
            budget=LayerBudget(
                self.agent.config.build_layers_max_bytes, "BERTH_BUILD_LAYERS_MAX_BYTES"
            ),
        )
        for index in needed:
            job.done[index] = threading.Event()
        for number, instr in enumerate(parsed.meta_args, start=1):
            yield BuildEvent("step", instr.original.strip(), number, total)
        threads = [
            threading.Thread(
                target=self._stage_thread,
                args=(job, parsed.stages[i]),
                name=f"build-stage-{i}",
                daemon=True,
            )
            for i in sorted(needed)
        ]
        for t in threads:
            t.start()
        remaining = len(threads)
        try:
            while remaining:
                event = job.events.get()
                if event is None:
                    remaining -= 1
                    continue
                yield event
        finally:
            # A caller that stops iterating cancels the build: stages stop after their
            # current step, before the context they read from goes away.
            if remaining:
                job.failed.set()
            for t in threads:
                t.join()
        if job.error is not None:
            yield BuildEvent("error", str(job.error))
            raise job.error
        unused = sorted(set(build_args) - job.used_args)
        if unused:
            yield BuildEvent("warning", f"One or more build-args {unused} were not consumed")
        result = job.results[final.index]
        config = copy.deepcopy(result.config)
        # The last step's time, as docker does: a fully cached rebuild is the same image.
        history = config.get("history") or []
        config["created"] = (history[-1].get("created") if history else None) or _now()
        image = self.agent.images.commit(tenant, tag, config, result.layers)
        yield BuildEvent("done", digest=image.config_digest, reference=tag and image.reference)

    def _needed(self, parsed: df.Dockerfile, final: df.Stage, meta: dict[str, str]) -> set[int]:
        needed: set[int] = set()
        pending = [final]
        while pending:
            stage = pending.pop()
            if stage.index in needed:
                continue
            needed.add(stage.index)
            base = process_word(stage.base, meta, parsed.escape)
            dep = parsed.find_stage(base, stage.index)
            if dep is not None:
                pending.append(dep)
            for instr in stage.instructions:
                ref = instr.flags.get("from")
                if instr.cmd == "COPY" and ref is not None:
                    ref = process_word(ref, meta, parsed.escape)
                    dep = parsed.find_stage(ref, stage.index)
                    if dep is not None:
                        pending.append(dep)
                    elif ref.isdigit() or ref.lower() in {s.name for s in parsed.stages}:
                        raise instr.error(f"stage {ref!r} is not defined before this stage")
        return needed

    # ------------------------------------------------------------------ stages
    def _stage_thread(self, job: _Job, stage: df.Stage) -> None:
        try:
            job.results[stage.index] = self._run_stage(job, stage)
        except BaseException as exc:  # reported through the job, re-raised by build()
            if job.error is None:
                job.error = exc
            job.failed.set()
        finally:
            job.done[stage.index].set()
            job.events.put(None)

    def _wait_for(self, job: _Job, index: int) -> _State:
        job.done[index].wait()
        if index not in job.results:
            raise FailedPrecondition(f"stage {index} failed")
        return job.results[index]

    def _emit(self, job: _Job, event: BuildEvent) -> None:
        """Queue an event, tagged with the step and stage of the calling stage thread."""
        if event.step is None and getattr(self._local, "step", None) is not None:
            event = dataclasses.replace(event, step=self._local.step, total=job.total)
        if event.stage is None and getattr(self._local, "stage", None) is not None:
            event = dataclasses.replace(event, stage=self._local.stage)
        job.events.put(event)

    def _run_stage(self, job: _Job, stage: df.Stage) -> _State:
        number = job.step_numbers[stage.index]
        label = stage.label
        self._local.step, self._local.stage = number, label
        esc = job.file.escape
        base = process_word(stage.base, job.meta, esc)
        dep = job.file.find_stage(base, stage.index)
        if dep is not None:
            self._wait_for(job, dep.index)
        self._emit(job, BuildEvent("step", stage.instr.original.strip(), number, job.total, label))
        if not base:
            raise stage.instr.error("base name should not be blank (check ARG values)")
        if stage.platform:
            platform = process_word(stage.platform, job.meta, esc)
            if platform != job.meta["TARGETPLATFORM"]:
                raise stage.instr.error(
                    f"--platform={platform} is not supported: this node builds "
                    f"{job.meta['TARGETPLATFORM']} only"
                )
        if dep is not None:
            state = self._wait_for(job, dep.index).clone()
            state.cmd_set = False
        else:
            state = self._base_state(job, base, stage.instr)
        self._emit(job, BuildEvent("layer", stage=label, digest=state.id[7:19]))
        args: dict[str, str] = {}
        triggers = list(state.run.get("OnBuild") or [])
        if triggers:
            state.run["OnBuild"] = None
        instructions: list[tuple[df.Instruction, bool]] = []
        for text in triggers:
            parsed = df.parse(f"FROM scratch\n{text}\n", f"{base} ONBUILD")
            instructions.extend((i, True) for i in parsed.stages[0].instructions)
        instructions.extend((i, False) for i in stage.instructions)
        step = number
        for instr, is_trigger in instructions:
            if job.failed.is_set():
                raise FailedPrecondition("build cancelled: another stage failed")
            if time.monotonic() > job.deadline:
                raise BuildFailed(
                    f"build exceeded its time limit of {job.limits.build_timeout:.0f}s",
                    instruction=instr.original,
                )
            if not is_trigger:
                step += 1
                self._local.step = step
                self._emit(job, BuildEvent("step", instr.original.strip(), step, job.total, label))
            else:
                self._emit(job, BuildEvent("output", f"# Executing ONBUILD {instr.original}\n"))
            try:
                state = self._step(job, stage, state, args, instr)
            except BuildFailed:
                raise
            except AgentError as exc:
                if str(exc).startswith(instr.filename):
                    raise
                # e.g. an unbalanced quote found while expanding: say where it is
                raise type(exc)(f"{instr.where}: {exc}", **exc.details) from exc
            self._emit(job, BuildEvent("layer", stage=label, digest=state.id[7:19]))
        return state

    def _base_state(self, job: _Job, base: str, instr: df.Instruction) -> _State:
        if base == "scratch":
            config: dict[str, Any] = {
                "architecture": media.host_platform()[1],
                "os": "linux",
                "config": {"Env": [f"PATH={DEFAULT_PATH}"]},
                "history": [],
            }
            return _State(config, [], index=FsIndex(limits=self.agent.config.layer_limits))
        try:
            image = self.agent.images.resolve(job.tenant, base)
        except NotFound as exc:
            raise NotFound(f"{instr.where}: FROM {base}: {exc}") from exc
        config = copy.deepcopy(image.config)
        config.pop("rootfs", None)
        config.pop("created", None)
        history = [h for h in config.get("history") or [] if isinstance(h, dict)]
        if len([h for h in history if not h.get("empty_layer")]) != len(image.layers):
            history = [{"created_by": f"layer of {base}"} for _ in image.layers]
        config["history"] = history
        run = config.setdefault("config", {}) or {}
        config["config"] = run
        env = run.get("Env") or []
        if not any(e.startswith("PATH=") for e in env):
            run["Env"] = [*env, f"PATH={DEFAULT_PATH}"]
        layers = [
            {"mediaType": d["mediaType"], "digest": d["digest"], "size": d["size"]}
            for d in image.layers
        ]
        state = _State(config, layers)
        return state

    def _index(self, state: _State) -> FsIndex:
        if state.index is None:
            key = digest_json([x["digest"] for x in state.layers])
            with self._lock:
                cached = self._base_index.get(key)
            if cached is None:
                cached = index_for(self.agent.content, state.layers, self.agent.config.layer_limits)
                with self._lock:
                    if len(self._base_index) >= INDEX_MEMO:
                        self._base_index.pop(next(iter(self._base_index)))
                    self._base_index[key] = cached
            state.index = cached
        return state.index

    # ------------------------------------------------------------------ one step
    def _step(
        self,
        job: _Job,
        stage: df.Stage,
        state: _State,
        args: dict[str, str],
        instr: df.Instruction,
    ) -> _State:
        env = {**args, **state.env()}
        esc = job.file.escape
        cmd = instr.cmd
        new = state.clone()
        if cmd == "ARG":
            return self._arg(job, new, args, instr, env)
        if cmd in ("ENV", "LABEL"):
            pairs = []
            for k, v in zip(instr.args[0::2], instr.args[1::2], strict=True):
                key = process_word(k, env, esc)
                value = process_word(v, env, esc)
                if not key:
                    raise instr.error("key can not be blank")
                pairs.append((key, value))
                # Every word sees the environment from before this instruction (docker).
                if cmd == "ENV":
                    new.set_env(key, value)
                else:
                    labels = dict(new.run.get("Labels") or {})
                    labels[key] = value
                    new.run["Labels"] = labels
            text = " ".join(f"{k}={_quote(v)}" for k, v in pairs)
            return self._meta(job, state, new, f"{cmd} {text}")
        if cmd in ("WORKDIR",):
            return self._workdir(job, state, new, instr, env)
        if cmd == "USER":
            new.run["User"] = process_word(instr.args[0], env, esc)
            return self._meta(job, state, new, f"USER {new.run['User']}")
        if cmd == "EXPOSE":
            ports = dict(new.run.get("ExposedPorts") or {})
            for word in instr.args:
                for port in process_words(word, env, esc):
                    for p in _expand_port(port, instr):
                        ports[p] = {}
            new.run["ExposedPorts"] = ports
            return self._meta(job, state, new, "EXPOSE " + " ".join(sorted(ports)))
        if cmd == "VOLUME":
            vols = dict(new.run.get("Volumes") or {})
            for word in instr.args:
                path = process_word(word, env, esc)
                if not path:
                    raise instr.error("VOLUME specified can not be an empty string")
                vols[path] = {}
            new.run["Volumes"] = vols
            return self._meta(job, state, new, "VOLUME " + str(list(instr.args)))
        if cmd == "STOPSIGNAL":
            signal = process_word(instr.args[0], env, esc)
            if not re.fullmatch(r"(SIG)?[A-Z0-9+-]+|\d+", signal):
                raise instr.error(f"invalid signal: {signal}")
            new.run["StopSignal"] = signal
            return self._meta(job, state, new, f"STOPSIGNAL {signal}")
        if cmd in ("CMD", "ENTRYPOINT"):
            command = self._command(new, instr)
            key = "Cmd" if cmd == "CMD" else "Entrypoint"
            new.run[key] = command
            if cmd == "CMD":
                new.cmd_set = True
            elif not state.cmd_set:
                new.run["Cmd"] = None
            return self._meta(job, state, new, f"{cmd} {_json_list(command)}")
        if cmd == "SHELL":
            new.run["Shell"] = list(instr.args)
            return self._meta(job, state, new, f"SHELL {_json_list(list(instr.args))}")
        if cmd == "HEALTHCHECK":
            new.run["Healthcheck"] = self._healthcheck(new, instr)
            return self._meta(job, state, new, "HEALTHCHECK " + " ".join(instr.args))
        if cmd == "MAINTAINER":
            new.config["author"] = process_word(" ".join(instr.args), env, esc)
            return self._meta(job, state, new, f"MAINTAINER {new.config['author']}")
        if cmd == "ONBUILD":
            triggers = list(new.run.get("OnBuild") or [])
            triggers.append(instr.args[0])
            new.run["OnBuild"] = triggers
            return self._meta(job, state, new, f"ONBUILD {instr.args[0]}")
        if cmd == "RUN":
            return self._run(job, stage, state, new, args, instr)
        if cmd in ("COPY", "ADD"):
            # What COPY --from spools out of an image goes when the step ends, on every path.
            spools = _Spools(functools.partial(self._scratch_root, job.tenant))
            try:
                return self._copy(job, stage, state, new, instr, env, spools)
            finally:
                spools.close()
        raise instr.error("unsupported instruction")

    def _cached(
        self,
        job: _Job,
        state: _State,
        signature: Any,
        make: Callable[[], _State],
    ) -> _State:
        key = job.cache.key(state.id, signature)
        if not job.no_cache:
            entry = job.cache.get(key)
            if entry is not None:
                self._emit(job, BuildEvent("cached"))
                return _State(entry["config"], entry["layers"], entry.get("cmd_set", False))
        result = make()
        job.cache.put(
            key, {"config": result.config, "layers": result.layers, "cmd_set": result.cmd_set}
        )
        return result

    def _meta(self, job: _Job, state: _State, new: _State, text: str) -> _State:
        """A config-only step: cached like docker's so the parent chain stays stable."""

        def make() -> _State:
            new.history(f"/bin/sh -c #(nop)  {text}", empty=True)
            new.index = state.index
            return new

        result = self._cached(job, state, {"meta": text, "config": new.run}, make)
        result.index = state.index
        return result

    def _arg(
        self,
        job: _Job,
        new: _State,
        args: dict[str, str],
        instr: df.Instruction,
        env: dict[str, str],
    ) -> _State:
        shown = []
        for raw in instr.args:
            key, has_default, default = raw.partition("=")
            job.used_args.add(key)
            if key in job.build_args:
                args[key] = job.build_args[key]
            elif has_default:
                args[key] = process_word(default, env, job.file.escape)
            elif key in job.meta:
                args[key] = job.meta[key]
            shown.append(raw)
        state = new
        return self._meta(job, state, state.clone(), "ARG " + " ".join(shown))

    def _command(self, state: _State, instr: df.Instruction) -> list[str]:
        if instr.json:
            return list(instr.args)
        shell = list(state.run.get("Shell") or DEFAULT_SHELL)
        return [*shell, " ".join(instr.args)]

    def _healthcheck(self, state: _State, instr: df.Instruction) -> dict[str, Any]:
        if instr.args[0].upper() == "NONE":
            return {"Test": ["NONE"]}
        rest = instr.args[1:]
        if instr.json:
            test = ["CMD", *rest]
        else:
            test = ["CMD-SHELL", " ".join(rest)]
        check: dict[str, Any] = {"Test": test}
        for flag, key in (
            ("interval", "Interval"),
            ("timeout", "Timeout"),
            ("start-period", "StartPeriod"),
            ("start-interval", "StartInterval"),
        ):
            if flag in instr.flags:
                value = parse_duration(instr.flags[flag], flag)
                if value and value < 10**6:
                    raise instr.error(f"--{flag} cannot be less than 1ms")
                if value:
                    check[key] = value
        if "retries" in instr.flags:
            try:
                retries = int(instr.flags["retries"])
            except ValueError:
                raise instr.error("--retries must be an integer") from None
            if retries < 0:
                raise instr.error("--retries cannot be negative")
            if retries:
                check["Retries"] = retries
        return check

    # ------------------------------------------------------------------ WORKDIR
    def _workdir(
        self,
        job: _Job,
        state: _State,
        new: _State,
        instr: df.Instruction,
        env: dict[str, str],
    ) -> _State:
        path = process_word(" ".join(instr.args), env, job.file.escape)
        if not path.startswith("/"):
            path = posixpath.join(state.run.get("WorkingDir") or "/", path)
        path = posixpath.normpath(path)
        new.run["WorkingDir"] = path

        def make() -> _State:
            index = self._index(state)
            if index.is_dir(path):
                new.history(f"/bin/sh -c #(nop) WORKDIR {path}", empty=True)
                new.index = index
                return new
            writer = LayerWriter(self.agent.content, index.copy(), time.time())
            try:
                writer.ensure_parents(path + "/x")
                layer = writer.commit()
            except BaseException:
                writer.abort()
                raise
            return self._with_layer(state, new, layer, f"/bin/sh -c #(nop) WORKDIR {path}")

        return self._cached(job, state, {"workdir": path}, make)

    def _with_layer(
        self, parent: _State, new: _State, layer: dict[str, Any] | None, created_by: str
    ) -> _State:
        new.history(created_by, empty=layer is None)
        if layer is None:
            new.index = parent.index
            return new
        new.layers = [*parent.layers, layer]
        index = self._index(parent).copy()
        index.apply_layer(self.agent.content, layer["digest"])
        new.index = index
        return new

    # ------------------------------------------------------------------ RUN
    def _run(
        self,
        job: _Job,
        stage: df.Stage,
        state: _State,
        new: _State,
        args: dict[str, str],
        instr: df.Instruction,
    ) -> _State:
        shell = list(state.run.get("Shell") or DEFAULT_SHELL)
        if instr.json:
            argv = list(instr.args)
        elif (instr.heredocs and [a for a in instr.args] == [f"<<{instr.heredocs[0].name}"]) or (
            instr.heredocs and len(instr.args) == 1 and instr.args[0].startswith("<<")
        ):
            argv = [*shell, instr.heredocs[0].content]
        elif instr.heredocs:
            script = " ".join(instr.args)
            for doc in instr.heredocs:
                script += f"\n{doc.content}{doc.name}"
            argv = [*shell, script]
        else:
            argv = [*shell, " ".join(instr.args)]
        env_map = state.env()
        run_args = {k: v for k, v in sorted(args.items()) if k not in env_map}
        env = list(state.run.get("Env") or []) + [f"{k}={v}" for k, v in run_args.items()]
        prefix = f"|{len(run_args)} " + " ".join(f"{k}={v}" for k, v in run_args.items()) + " "
        created_by = (prefix if run_args else "") + " ".join(argv)
        signature = {"run": argv, "args": run_args}

        def make() -> _State:
            tail = bytearray()

            def on_output(data: bytes) -> None:
                tail.extend(data)
                del tail[:-OUTPUT_TAIL]
                self._emit(
                    job, BuildEvent("output", data.decode(errors="replace"), stage=stage.label)
                )

            remaining = job.deadline - time.monotonic()
            limits = job.limits
            if remaining < limits.step_timeout:
                limits = BuildLimits(**{**limits.__dict__, "step_timeout": max(remaining, 1.0)})
            request = RunRequest(
                job.tenant,
                f"build-{secrets.token_hex(8)}",
                list(state.layers),
                argv,
                env,
                str(state.run.get("User") or ""),
                str(state.run.get("WorkingDir") or "/"),
                limits,
                on_output,
            )
            result = self.runner.run_step(request)
            output = tail.decode(errors="replace")
            if result.timed_out:
                raise BuildFailed(
                    f"{instr.where}: {instr.original.strip()!r} exceeded the build's time limit "
                    f"of {limits.step_timeout:.0f}s",
                    instruction=instr.original,
                    exit_code=result.exit_code,
                    output=output,
                )
            if result.oom_killed:
                raise BuildFailed(
                    f"{instr.where}: {instr.original.strip()!r} ran out of memory (limit "
                    f"{limits.memory_bytes} bytes) and was killed",
                    instruction=instr.original,
                    exit_code=result.exit_code,
                    output=output,
                )
            if result.exit_code != 0:
                raise BuildFailed(
                    f"{instr.where}: The command '{' '.join(argv)}' returned a non-zero code: "
                    f"{result.exit_code}",
                    instruction=instr.original,
                    exit_code=result.exit_code,
                    output=output,
                )
            return self._with_layer(
                state,
                new,
                result.layer,
                created_by,
            )

        return self._cached(job, state, signature, make)

    # ------------------------------------------------------------------ COPY / ADD
    def _scratch_root(self, tenant: str) -> Path:
        """Where a build step's scratch files go: the tenant's own size-capped layer
        filesystem (what its RUN steps write is capped there too), or the agent's build
        cache directory on a node without one; never the system's /tmp."""
        if self.agent.config.tenant_layer_bytes > 0:
            return self.agent.snapshots.tenant_fs(tenant)
        return self.agent.config.build_cache_dir

    def _copy(
        self,
        job: _Job,
        stage: df.Stage,
        state: _State,
        new: _State,
        instr: df.Instruction,
        env: dict[str, str],
        spools: _Spools,
    ) -> _State:
        esc = job.file.escape
        flags = {k: process_word(v, env, esc) for k, v in instr.flags.items()}
        words = [process_word(a, env, esc) for a in instr.args]
        heredoc_names = {f"<<{d.name}": d for d in instr.heredocs}
        heredoc_names.update({f"<<-{d.name}": d for d in instr.heredocs})
        if len(words) < 2:
            raise instr.error("requires at least two arguments")
        *srcs, dest = words
        if not dest:
            raise instr.error("destination can not be empty")
        is_add = instr.cmd == "ADD"
        source_ref = flags.get("from")
        if source_ref is not None and is_add:
            raise instr.error("ADD does not support --from")
        workdir = state.run.get("WorkingDir") or "/"
        dest_dir_hint = dest.endswith("/") or dest.endswith("/.") or dest == "."
        dest_abs = dest if dest.startswith("/") else posixpath.join(workdir, dest)
        dest_abs = posixpath.normpath(dest_abs)
        # Resolve sources to (name, items) now: their digests are part of the cache key.
        groups: list[tuple[str, list[_Item], bool]] = []  # (basename, items, is_archive)
        signature_sources: list[Any] = []
        tree_id = "context"
        if source_ref is not None:
            dep = job.file.find_stage(source_ref, stage.index)
            if dep is not None:
                other = self._wait_for(job, dep.index)
                tree_id = other.id
                index = self._index(other)
            else:
                try:
                    image = self.agent.images.resolve(job.tenant, source_ref)
                except NotFound as exc:
                    raise NotFound(f"{instr.where}: COPY --from={source_ref}: {exc}") from exc
                tree_id = image.manifest_digest
                index = self._index(_State({}, [dict(d) for d in image.layers]))
            for src in srcs:
                matches = self._image_matches(index, src, workdir="/")
                if not matches:
                    raise NotFound(
                        f"{instr.where}: COPY --from={source_ref}: {src}: no such file or directory"
                    )
                for path in matches:
                    groups.append(
                        (
                            posixpath.basename(path) or "/",
                            self._image_items(index, path, spools),
                            False,
                        )
                    )
                    signature_sources.append(path)
        else:
            for src in srcs:
                if src in heredoc_names:
                    doc = heredoc_names[src]
                    data = doc.content.encode()
                    groups.append(
                        (
                            doc.name,
                            [
                                _Item(
                                    "",
                                    "file",
                                    0o644,
                                    len(data),
                                    mtime=0,
                                    opener=functools.partial(io.BytesIO, data),
                                )
                            ],
                            False,
                        )
                    )
                    signature_sources.append(["heredoc", doc.name, doc.content])
                    continue
                if is_add and re.match(r"^https?://", src):
                    name, items, digest = self._download(src, instr, flags.get("checksum"))
                    groups.append((name, items, False))
                    signature_sources.append(["url", src, digest])
                    continue
                try:
                    matches = job.ctx.resolve_sources(src)
                except AgentError as exc:
                    raise type(exc)(f"{instr.where}: {exc}") from exc
                for rel in matches:
                    items = self._context_items(job.ctx, rel)
                    archive = (
                        is_add and items[0].kind == "file" and _is_archive(job.ctx.full_path(rel))
                    )
                    groups.append((posixpath.basename(rel) or "/", items, archive))
                    signature_sources.append([rel, job.ctx.digest(rel), archive])
        if len(groups) > 1 and not dest_dir_hint:
            raise instr.error(
                f"When using {instr.cmd} with more than one source file, the destination must "
                "be a directory and end with a /"
            )
        signature = {
            "copy": instr.cmd,
            "from": tree_id,
            "sources": signature_sources,
            "dest": dest_abs,
            "dest_hint": dest_dir_hint,
            "chown": flags.get("chown"),
            "chmod": flags.get("chmod"),
        }
        shown = " ".join(f"--{k}={v}" for k, v in sorted(flags.items()))
        created_by = f"/bin/sh -c #(nop) {instr.cmd} {shown + ' ' if shown else ''}" + (
            f"{digest_json(signature_sources)[:19]} in {dest_abs} "
        )

        def make() -> _State:
            index = self._index(state)
            if "chown" in flags:
                uid, gid = lookup_ids(index, self.agent.content, flags["chown"])
            else:
                uid, gid = 0, 0
            chmod = int(flags["chmod"], 8) if "chmod" in flags else None
            writer = LayerWriter(self.agent.content, index.copy(), time.time(), job.budget)
            try:
                for basename, items, archive in groups:
                    self._place(
                        writer,
                        index,
                        items,
                        basename,
                        dest_abs,
                        dest_dir_hint,
                        uid,
                        gid,
                        chmod,
                        archive,
                        job.ctx,
                    )
                layer = writer.commit()
            except BaseException:
                writer.abort()
                raise
            return self._with_layer(state, new, layer, created_by)

        return self._cached(job, state, signature, make)

    def _place(
        self,
        writer: LayerWriter,
        index: FsIndex,
        items: list[_Item],
        basename: str,
        dest: str,
        dest_hint: bool,
        uid: int,
        gid: int,
        chmod: int | None,
        archive: bool,
        ctx: BuildContext,
    ) -> None:
        root = items[0]
        if archive:
            assert root.opener is not None
            target = index.resolve(dest)
            writer.ensure_parents(target + "/x")
            with root.opener() as fh:
                _extract_archive(writer, fh, target, self.agent.config.add_archive_limits)
            return
        if root.kind == "dir":
            target = index.resolve(dest)
            writer.ensure_parents(target, uid, gid)
            existing = index.get(target)
            if existing is not None and existing.kind == "dir":
                writer.add_dir(
                    target, chmod or root.mode, existing.uid, existing.gid, mtime=root.mtime
                )
            else:
                writer.add_dir(target, chmod or root.mode, uid, gid, mtime=root.mtime)
            for item in items[1:]:
                path = posixpath.join(target, item.rel)
                # An ignored directory can still hold re-included files: create it.
                writer.ensure_parents(path, uid, gid)
                self._put(writer, path, item, uid, gid, chmod)
            return
        if dest_hint or index.is_dir(dest):
            target = posixpath.join(index.resolve(dest), basename)
        else:
            target = posixpath.join(
                index.resolve(posixpath.dirname(dest)), posixpath.basename(dest)
            )
        writer.ensure_parents(target, uid, gid)
        self._put(writer, target, root, uid, gid, chmod)

    @staticmethod
    def _put(
        writer: LayerWriter, path: str, item: _Item, uid: int, gid: int, chmod: int | None
    ) -> None:
        mode = chmod if chmod is not None else item.mode
        if item.kind == "dir":
            writer.add_dir(path, mode, uid, gid, mtime=item.mtime)
        elif item.kind == "symlink":
            writer.add_symlink(path, item.linkname, uid, gid, mtime=item.mtime)
        elif item.kind == "file":
            assert item.opener is not None
            with item.opener() as fh:
                writer.add_file(path, fh, item.size, mode, uid, gid, mtime=item.mtime)

    @staticmethod
    def _context_items(ctx: BuildContext, rel: str) -> list[_Item]:
        full = ctx.full_path(rel)
        st = os.stat(full)  # a named source is followed if it is a symlink (as docker does)

        def item(path: Path, sub: str, st: os.stat_result) -> _Item:
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                return _Item(sub, "dir", mode, mtime=st.st_mtime)
            if stat.S_ISLNK(st.st_mode):
                return _Item(sub, "symlink", 0o777, linkname=os.readlink(path), mtime=st.st_mtime)
            if stat.S_ISREG(st.st_mode):
                return _Item(
                    sub,
                    "file",
                    mode,
                    st.st_size,
                    mtime=st.st_mtime,
                    opener=functools.partial(_open_binary, path),
                )
            return _Item(sub, "other", mode)

        root = item(full, "", st)
        if root.kind != "dir":
            return [root]
        items = [root]
        for sub in ctx.walk(rel):
            path = ctx.full_path(sub)
            relsub = sub[len(rel) + 1 :] if rel else sub
            it = item(path, relsub, os.lstat(path))
            if it.kind != "other":
                items.append(it)
        return items

    @staticmethod
    def _image_matches(index: FsIndex, src: str, workdir: str) -> list[str]:
        path = src if src.startswith("/") else posixpath.join(workdir, src)
        path = posixpath.normpath(path)
        if _has_glob(path):
            return sorted(p for p in index.entries if p != "/" and _glob_match(path, p))
        resolved = index.resolve(path)
        return [resolved] if resolved in index.entries else []

    def _image_items(self, index: FsIndex, path: str, spools: _Spools) -> list[_Item]:
        """The entries under ``path`` of an image (COPY --from): files spooled from its
        layers into ``spools`` (the step's scratch on the tenant's filesystem), each
        layer read through the extractor core's caps (a layer bomb stops at the node's
        layer limits instead of filling the build scratch)."""
        from runtime_agent.archive import members, open_tar

        content = self.agent.content
        limits = self.agent.config.layer_limits
        root_entry = index.entries[path]
        prefix = path.rstrip("/") + "/"
        chosen = [(path, root_entry)]
        if root_entry.kind == "dir":
            chosen += sorted((p, e) for p, e in index.entries.items() if p.startswith(prefix))
        wanted: dict[str, set[str]] = {}
        for _p, e in chosen:
            if e.kind == "file":
                wanted.setdefault(e.layer, set()).add(e.member)
        # Each layer is read once; contents spill to disk past a few MiB.
        blobs: dict[tuple[str, str], tuple[IO[bytes], int]] = {}
        for layer, names in wanted.items():
            with (
                content.open(layer) as raw,
                media.open_uncompressed(raw) as stream,
                open_tar(stream, limits, compressed=False) as (tar, _stream),
            ):
                if tar is None:
                    continue  # an empty layer
                for info, _parts in members(tar, limits):
                    if info.name in names and info.isfile():
                        fh = tar.extractfile(info)
                        if fh is not None:
                            spooled = spools.new()
                            shutil.copyfileobj(fh, spooled)
                            blobs[(layer, info.name)] = (spooled, info.size)
        items = []
        for p, e in chosen:
            rel = "" if p == path else p[len(prefix) :]
            if e.kind == "file":
                spool, size = blobs.get((e.layer, e.member), (io.BytesIO(), 0))
                items.append(
                    _Item(rel, "file", e.mode, size, opener=functools.partial(_rewound, spool))
                )
            elif e.kind in ("dir", "symlink"):
                items.append(_Item(rel, e.kind, e.mode, linkname=e.linkname))
        return items

    def _download(
        self, url: str, instr: df.Instruction, checksum: str | None
    ) -> tuple[str, list[_Item], str]:
        """``ADD <url>``: fetched for the tenant through the node's guarded fetcher (public
        addresses only, every redirect re-checked, size and time capped; docs/agent.md)."""
        import email.utils
        import urllib.parse

        from runtime_agent.fetch import fetch, policy_for_node

        config = self.agent.config
        try:
            fetched = fetch(
                url,
                policy_for_node(config),
                max_bytes=config.fetch_max_bytes,
                timeout=config.fetch_timeout_seconds,
            )
        except AgentError as exc:
            raise type(exc)(f"{instr.where}: ADD {url}: {exc}", **exc.details) from exc
        modified = fetched.headers.get("Last-Modified")
        mtime = 0.0
        if modified:
            try:
                mtime = email.utils.parsedate_to_datetime(modified).timestamp()
            except (TypeError, ValueError):
                mtime = 0.0
        name = posixpath.basename(urllib.parse.urlparse(url).path) or "index.html"
        if checksum is not None and checksum != fetched.digest:
            fetched.file.close()
            raise BuildFailed(
                f"{instr.where}: ADD {url}: content digest {fetched.digest} does not match "
                f"--checksum={checksum}",
                instruction=instr.original,
            )
        item = _Item(
            "",
            "file",
            0o600,
            fetched.size,
            mtime=mtime,
            opener=functools.partial(_rewound, fetched.file),
        )
        return name, [item], fetched.digest


def _rewound(fh: IO[bytes]) -> IO[bytes]:
    fh.seek(0)
    return fh


def _open_binary(path: Path) -> IO[bytes]:
    return open(path, "rb")


def _quote(value: str) -> str:
    return f'"{value}"' if (" " in value or not value) else value


def _json_list(value: list[str]) -> str:
    import json

    return json.dumps(value)


def _expand_port(spec: str, instr: df.Instruction) -> list[str]:
    port, _, proto = spec.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in ("tcp", "udp", "sctp"):
        raise instr.error(f"invalid proto: {proto}")
    low, _, high = port.partition("-")
    if not low.isdigit() or (high and not high.isdigit()):
        raise instr.error(f"invalid containerPort: {port}")
    lo, hi = int(low), int(high or low)
    if not (0 < lo <= hi <= 65535):
        raise instr.error(f"invalid port range: {port}")
    return [f"{p}/{proto}" for p in range(lo, hi + 1)]


def _is_archive(path: Path) -> bool:
    import bz2
    import gzip
    import lzma

    with open(path, "rb") as fh:
        head = fh.read(512 + 8)
    for opener in (gzip.decompress, bz2.decompress, lzma.decompress):
        try:
            with open(path, "rb") as fh:
                if opener is gzip.decompress and head[:2] == b"\x1f\x8b":
                    head = gzip.GzipFile(fileobj=fh).read(520)
                elif opener is bz2.decompress and head[:3] == b"BZh":
                    head = bz2.BZ2File(fh).read(520)
                elif opener is lzma.decompress and head[:6] == b"\xfd7zXZ\x00":
                    head = lzma.LZMAFile(fh).read(520)
        except (OSError, EOFError, lzma.LZMAError):
            return False
    return len(head) >= 262 and head[257:262] == b"ustar"


def _extract_archive(
    writer: LayerWriter, fh: IO[bytes], dest: str, limits: ArchiveLimits | None = None
) -> None:
    """ADD of a local tar: its entries land under ``dest`` with their own owners and modes.

    The archive is read by the agent's one extractor core (``runtime_agent.archive``):
    gzip/bzip2/xz detected from magic bytes, the unpacked size and member count capped
    by ``limits`` (default: the node's ADD archive caps) before anything is written,
    names split into safe components. Entries go into the layer tar, never onto the
    node; a directory on the way that is a symlink in the image is resolved inside the
    image, as a container would see it. A hard link must name a regular file this archive
    wrote earlier (a later member of that name replaces the link, never writes through
    it); device nodes and FIFOs are skipped.
    """
    import tarfile

    from runtime_agent.archive import clean_member_path, members, open_tar
    from runtime_agent.config import AgentConfig
    from runtime_agent.errors import InvalidArchive

    limits = limits or AgentConfig().add_archive_limits
    files: dict[tuple[str, ...], str] = {}  # archive name -> layer path, regular files
    with open_tar(fh, limits) as (tar, _stream):
        if tar is None:
            return  # an empty archive
        for info, parts in members(tar, limits):
            if not parts:
                continue
            parent = writer.index.resolve(posixpath.join(dest, *parts[:-1]))
            path = posixpath.join(parent, parts[-1])
            files.pop(tuple(parts), None)
            writer.ensure_parents(path)
            mode = info.mode & 0o7777
            if info.isdir():
                writer.add_dir(path, mode, info.uid, info.gid, mtime=info.mtime)
            elif info.issym():
                writer.add_symlink(path, info.linkname, info.uid, info.gid, mtime=info.mtime)
            elif info.isreg():
                data = tar.extractfile(info)
                writer.add_file(path, data, info.size, mode, info.uid, info.gid, mtime=info.mtime)
                files[tuple(parts)] = path
            elif info.islnk():
                try:
                    target = files.get(tuple(clean_member_path(info.linkname, limits.what)))
                except InvalidArchive:
                    target = None  # climbs out of the archive: no file of it either
                entry = writer.index.entries.get(target) if target is not None else None
                if target is None or entry is None or entry.kind != "file":
                    raise InvalidArchive(
                        f"ADD: hard link {info.name!r} points at {info.linkname!r}, which is "
                        "not a file in this archive"
                    )
                link = tarfile.TarInfo(path.lstrip("/"))
                link.type, link.linkname = tarfile.LNKTYPE, target.lstrip("/")
                link.mtime = writer.mtime
                writer._add(path, link, None, "file", True)
                writer.index.entries[path] = entry  # the same inode
                files[tuple(parts)] = target
