"""The models ``kiln serve`` holds: loaded from a Triton repository, versioned, batched, unloadable.

``ModelStore`` reads ``<repo>/<model>/config.pbtxt`` through ``builders.repository``, picks the
versions its ``version_policy`` names, creates ``instance_group`` count runners per version and
one ``Batcher`` each. A model being loaded answers UNAVAILABLE; a model that failed to load keeps
its reason (shown by RepositoryIndex) and does not stop the others.

A reload builds only the versions that are new or changed (files, or the config apart from its
version policy) and keeps serving the others; the old ones close after the swap and drain their
queued requests first. Model control follows Triton: ``none`` (load at start, the repository API
refuses), ``poll`` (``poll()`` notices new, changed and removed versions and models), ``explicit``
(RepositoryModelLoad/Unload, with Triton's ``config`` override parameter). A version that fails
to load (corrupt artifact, checksum mismatch) never disturbs the versions being served.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import onnx
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from builders.inspection import graph_inputs, value_spec
from builders.model_config import complete_io, config_tensors
from builders.repository import (
    ModelEntry,
    check_model_name,
    is_version_number,
    read_model,
    repository_root,
    verify_version,
)
from core.errors import ConflictError, InvalidInputError, KilnError, NotFoundError, RepositoryError, UnavailableError
from runtime.layout import DEFAULT_FILENAMES
from runtime.runner import DEFAULT_INTRA_OP_THREADS, Runner, RunnerFactory, RunnerSpec, create_runner
from server.batching import Arrays, Batcher, BatchPolicy, Timing
from server.llm.endpoint import DecoderEndpoint, is_decoupled, load_endpoint
from server.repository_watch import Fingerprint, version_fingerprint
from server.statistics import VersionStats
from server.validation import check_inputs

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


CONTROL_MODES = ("none", "poll", "explicit")


@dataclass(frozen=True)
class StoreOptions:
    intra_op_threads: int = DEFAULT_INTRA_OP_THREADS
    dynamic_batching: bool | None = None  # None: as config.pbtxt says
    runner_factory: RunnerFactory = create_runner
    model_control_mode: str = "none"  # Triton's --model-control-mode
    models: tuple[str, ...] | None = None  # the models polled (None: every model in the repository)


class ServedVersion:
    """One loaded version: its runners (one per instance), worker threads and batcher."""

    def __init__(
        self,
        name: str,
        version: int,
        config: mc.ModelConfig,
        runners: list[Runner],
        dynamic: bool | None,
        decoder: DecoderEndpoint | None = None,
    ):
        self.name, self.version, self.config = name, version, config
        self.decoder = decoder  # a decoupled decoder: answered token by token on ModelStreamInfer
        self.inputs, self.outputs = config_tensors(config)
        self.stats = VersionStats()
        self._runners: list[Runner] = runners
        self._idle: queue.SimpleQueue[Runner] = queue.SimpleQueue()
        for runner in runners:
            self._idle.put(runner)
        self._executor = ThreadPoolExecutor(len(runners), thread_name_prefix=f"kiln-{name}-{version}")
        self.fingerprint: Fingerprint = ()  # of its files when loaded; a change reloads it
        self.config_key = serving_key(config)
        self.policy = BatchPolicy.from_config(config, dynamic=dynamic)
        self.batcher = Batcher(self._run, self._executor, len(runners), self.policy, self.stats.record_execution)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    def check(self, inputs: Arrays, requested: tuple[str, ...]) -> None:
        """Refuse a request whose inputs or requested outputs do not fit this model."""
        check_inputs(self.name, self.inputs, self.output_names, self.config.max_batch_size, inputs, requested)

    async def infer(self, inputs: Arrays) -> tuple[Arrays, Timing]:
        """Run one checked request through the batcher, recording Triton-style statistics."""
        start = _now()
        samples = _sample_count(inputs) if self.config.max_batch_size > 0 else 1
        try:
            outputs, timing = await self.batcher.submit(inputs)
        except KilnError:
            self.stats.record_request(
                ok=False, samples=samples, total_ns=_now() - start, queue_ns=0, compute_ns=(0, 0, 0)
            )
            raise
        self.stats.record_request(
            ok=True, samples=samples, total_ns=_now() - start, queue_ns=timing.queue_ns, compute_ns=timing.compute_ns
        )
        return outputs, timing

    async def call_in_worker(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on this version's worker threads, outside the batcher (a decoder's steps)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def submit_to_worker(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` on this version's worker threads (from any thread); ``fn`` reports its own result.

        Raises RuntimeError once the version is closing (its workers take nothing new).
        """
        self._executor.submit(fn)

    def run_unbatched(self, inputs: Arrays) -> Arrays:
        """One run on an idle instance, on the calling (worker) thread."""
        return self._run(inputs)

    def _run(self, inputs: Arrays) -> Arrays:
        runner = self._idle.get()
        try:
            return runner.run(inputs)
        finally:
            self._idle.put(runner)

    async def close(self) -> None:
        await self.batcher.close()
        self._executor.shutdown(wait=True)
        for runner in self._runners:
            runner.close()


@dataclass
class ModelRecord:
    name: str
    state: ModelState
    reason: str = ""
    config: mc.ModelConfig | None = None
    versions: dict[int, ServedVersion] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # versions that did not load, and why


class ModelStore:
    """Loaded models by name; all methods run on the server's event loop."""

    def __init__(self, repo: Path | str, options: StoreOptions | None = None) -> None:
        self.root = repository_root(repo)
        self.options = options or StoreOptions()
        if self.options.model_control_mode not in CONTROL_MODES:
            raise InvalidInputError(
                f"model control mode {self.options.model_control_mode!r} is not one of {list(CONTROL_MODES)}"
            )
        self._records: dict[str, ModelRecord] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def records(self) -> list[ModelRecord]:
        return [self._records[n] for n in sorted(self._records)]

    def record(self, name: str) -> ModelRecord | None:
        return self._records.get(name)

    def get(self, name: str, version: str = "") -> ServedVersion:
        """The version that serves a request; NOT_FOUND and UNAVAILABLE say why not, INVALID_ARGUMENT
        a version that is not a version number (only ASCII digits are: not ' 1', a full-width '1', '0_1' or '+1')."""
        if version and not is_version_number(version):
            shown = version if len(version) <= 40 else version[:37] + "..."
            raise InvalidInputError(
                f"model version {shown!r} is not a version number; send ASCII decimal digits such as '1' "
                "(no sign, space, '_' or leading zero), or an empty version for the latest"
            )
        record = self._records.get(name)
        if record is None or (record.state is ModelState.UNAVAILABLE and not record.versions):
            if record is None and not self.has_model(name):
                raise NotFoundError(f"model {name!r} is not in the repository; see RepositoryIndex")
            reason = f" ({record.reason})" if record is not None and record.reason else ""
            raise UnavailableError(f"model {name!r} is not loaded{reason}; load it with RepositoryModelLoad")
        if record.state is ModelState.LOADING and not record.versions:
            raise UnavailableError(f"model {name!r} is loading; retry when ModelReady is true")
        if record.state is ModelState.UNLOADING:
            raise UnavailableError(f"model {name!r} is unloading; load it again with RepositoryModelLoad")
        if not version:
            return record.versions[max(record.versions)]
        served = record.versions.get(int(version))
        if served is None:
            failed = record.failed.get(int(version))
            why = f"; it failed to load: {failed}" if failed else ""
            raise NotFoundError(
                f"model {name!r} has no version {version!r} being served{why}; served versions are "
                f"{sorted(record.versions)} (its version_policy decides which: to keep the previous version "
                f"servable, 'kiln repo policy {name} --keep-versions 2')"
            )
        return served

    def has_model(self, name: str) -> bool:
        """Whether ``name`` is a model directory of the repository (loaded or not)."""
        try:
            check_model_name(name)
        except KilnError:
            return False
        return (self.root / name).is_dir()

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether a request for this model and version would be served (a malformed version raises)."""
        try:
            self.get(name, version)
        except InvalidInputError:
            raise
        except KilnError:
            return False
        return True

    # -- the repository API (RepositoryModelLoad / Unload) -----------------------------------
    async def request_load(self, name: str, parameters: dict[str, str] | None = None) -> ModelRecord:
        """RepositoryModelLoad: only in explicit mode; ``config`` (JSON) overrides config.pbtxt, as in Triton."""
        self._check_explicit("RepositoryModelLoad", name)
        params = dict(parameters or {})
        override_text = params.pop("config", None)
        if params:
            raise InvalidInputError(
                f"RepositoryModelLoad parameters {sorted(params)} are not supported by kiln serve (only 'config', "
                "a JSON ModelConfig); edit config.pbtxt in the repository and load again"
            )
        if not self.has_model(name):
            raise NotFoundError(f"model {name!r} is not in the repository; see RepositoryIndex")
        override = parse_config_override(name, override_text) if override_text is not None else None
        return await self.load(name, override=override)

    async def request_unload(self, name: str) -> None:
        """RepositoryModelUnload: only in explicit mode."""
        self._check_explicit("RepositoryModelUnload", name)
        await self.unload(name)

    def _check_explicit(self, method: str, name: str) -> None:
        mode = self.options.model_control_mode
        if mode != "explicit":
            raise ConflictError(
                f"{method} of {name!r} refused: kiln serve runs with --model-control-mode {mode}, where the "
                "repository API cannot load or unload models (as in Triton); restart it with "
                "--model-control-mode explicit, or publish/remove versions and let poll mode pick them up"
            )

    # -- loading -------------------------------------------------------------------------------
    async def load(
        self,
        name: str,
        *,
        override: mc.ModelConfig | None = None,
        strict: bool = True,
        among: set[int] | None = None,
    ) -> ModelRecord:
        """Load (or reload) a model; the versions serving keep serving until the new set is ready.

        Unchanged versions are reused. ``strict``: any version that fails fails the load and
        changes nothing. Otherwise (poll) the versions that load are added, the failed ones are
        recorded in ``ModelRecord.failed`` and nothing that serves is dropped. ``among`` limits
        the versions considered (poll leaves out directories still being written).
        """
        check_model_name(name)  # never a path outside the repository
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            entry = read_model(self.root, name)
            old = self._records.get(name)
            serving = dict(old.versions) if old is not None and old.state is ModelState.READY else {}
            if not serving:
                self._records[name] = ModelRecord(name, ModelState.LOADING, config=entry.config)
            try:
                config, chosen = self._plan(entry, override, among)
            except KilnError as err:
                self._failed(name, old, serving, entry.config, str(err), {})
                raise
            prints = {v: version_fingerprint(entry.path / str(v)) for v in chosen}
            reused = {
                v: s
                for v, s in serving.items()
                if v in prints and s.config_key == serving_key(config) and s.fingerprint == prints[v]
            }
            built, failed = await self._build(entry, config, [v for v in chosen if v not in reused], prints)
            if failed and (strict or not (serving or built)):
                for served in built.values():
                    await served.close()
                message = "; ".join(failed.values())
                self._failed(name, old, serving, config, message, failed)
                raise RepositoryError(message)
            versions = {**serving, **built} if failed else {**reused, **built}
            self._records[name] = ModelRecord(name, ModelState.READY, "", config, versions, failed)
            for version, served in serving.items():
                if versions.get(version) is not served:
                    await served.close()  # drains what it has queued; new requests already go elsewhere
            logger.info(
                "model %s serves versions %s%s",
                name,
                sorted(versions),
                f" (failed: {sorted(failed)})" if failed else "",
            )
            return self._records[name]

    def _plan(
        self, entry: ModelEntry, override: mc.ModelConfig | None, among: set[int] | None
    ) -> tuple[mc.ModelConfig, list[int]]:
        """The config to serve with and the versions its policy chooses."""
        if override is None and entry.config is None:
            raise RepositoryError(f"model {entry.name!r}: {entry.config_error}; fix or republish it")
        config = _named(override if override is not None else entry.config, entry.name)
        chosen = select_versions(entry, config, among)
        if chosen and (not config.input or not config.output):
            config = _complete_io_from_artifact(entry, config, chosen[-1])
        return config, chosen

    def _failed(
        self,
        name: str,
        old: ModelRecord | None,
        serving: dict[int, ServedVersion],
        config: mc.ModelConfig | None,
        reason: str,
        failed: dict[int, str],
    ) -> None:
        """Record a failed load: the versions serving stay as they were."""
        if serving and old is not None:
            old.failed = {**old.failed, **failed}
            logger.warning(
                "model %s: new versions did not load (%s); versions %s keep serving", name, reason, sorted(serving)
            )
            return
        self._records[name] = ModelRecord(name, ModelState.UNAVAILABLE, reason, config, {}, failed)

    async def unload(self, name: str, reason: str = "unloaded") -> None:
        """Stop taking requests for a model, finish the queued ones, release its sessions."""
        record = self._records.get(name)
        if record is None:
            raise NotFoundError(f"model {name!r} is not loaded; RepositoryIndex lists the models")
        async with self._locks.setdefault(name, asyncio.Lock()):
            record.state = ModelState.UNLOADING
            await _close_all(record)
            self._records[name] = ModelRecord(name, ModelState.UNAVAILABLE, reason, record.config)

    def loaded_fingerprint(self, name: str, version: int) -> Fingerprint | None:
        """The files a served version was loaded from (None: not served)."""
        record = self._records.get(name)
        served = record.versions.get(version) if record is not None else None
        return served.fingerprint if served is not None else None

    def serving_models(self) -> list[str]:
        return [r.name for r in self.records() if r.state is ModelState.READY]

    async def close(self) -> None:
        for record in list(self._records.values()):
            await _close_all(record)

    async def _build(
        self, entry: ModelEntry, config: mc.ModelConfig, wanted: list[int], prints: dict[int, Fingerprint]
    ) -> tuple[dict[int, ServedVersion], dict[int, str]]:
        """Load each wanted version on its own: (the ones that loaded, the reasons of the others)."""
        loop = asyncio.get_running_loop()
        built: dict[int, ServedVersion] = {}
        failed: dict[int, str] = {}
        try:
            for version in wanted:
                try:
                    runners = await loop.run_in_executor(None, self._create_runners, entry, config, version)
                    decoder = await loop.run_in_executor(None, self._decoder, entry, config, version, runners)
                except KilnError as err:
                    failed[version] = f"version {version}: {err}"
                    logger.warning("model %s version %d did not load: %s", entry.name, version, err)
                    continue
                served = ServedVersion(entry.name, version, config, runners, self.options.dynamic_batching, decoder)
                served.fingerprint = prints[version]
                built[version] = served
        except BaseException:
            for served in built.values():
                await served.close()
            raise
        return built, failed

    def _decoder(
        self, entry: ModelEntry, config: mc.ModelConfig, version: int, runners: list[Runner]
    ) -> DecoderEndpoint | None:
        if not is_decoupled(config):
            return None
        try:
            return load_endpoint(entry.name, config, entry.path / str(version) / artifact_name(config))
        except BaseException:
            for runner in runners:
                runner.close()
            raise

    def _create_runners(self, entry: ModelEntry, config: mc.ModelConfig, version: int) -> list[Runner]:
        info = next(v for v in entry.versions if v.version == version)
        if info.manifest is not None:
            problems = verify_version(entry, info)
            if problems:
                raise RepositoryError(
                    f"model {entry.name!r} version {version} fails verification: {'; '.join(problems)}"
                )
        filename = artifact_name(config)
        platform = config.platform or ("onnxruntime_onnx" if config.backend == "onnxruntime" else config.backend)
        threads = _intra_op_threads(config, self.options.intra_op_threads)
        runners: list[Runner] = []
        try:
            for index in range(instance_count(config)):
                spec = RunnerSpec(entry.name, version, platform, info.path / filename, threads, index)
                runners.append(self.options.runner_factory(spec))
        except BaseException:
            for runner in runners:
                runner.close()
            raise
        return runners


def parse_config_override(name: str, text: str) -> mc.ModelConfig:
    """Triton's ``config`` load parameter: a ModelConfig as JSON."""
    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as err:
        raise InvalidInputError(
            f"RepositoryModelLoad of {name!r}: parameter 'config' is not a JSON ModelConfig ({err}); "
            "send the config as Triton's JSON form, e.g. from ModelConfig"
        ) from err
    return config


def serving_key(config: mc.ModelConfig) -> bytes:
    """What a loaded version depends on in its config: everything but the version policy."""
    key = mc.ModelConfig()
    key.CopyFrom(config)
    key.ClearField("version_policy")
    return key.SerializeToString(deterministic=True)


def select_versions(entry: ModelEntry, config: mc.ModelConfig, among: set[int] | None = None) -> list[int]:
    """The versions ``version_policy`` serves (Triton's default: the latest one), of those in ``among``."""
    available = [v.version for v in entry.versions if among is None or v.version in among]
    if not available:
        raise NotFoundError(f"model {entry.name!r} has no versions in the repository; publish one with kiln build")
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return available
    if kind == "specific":
        wanted = sorted(int(v) for v in policy.specific.versions)
        missing = [v for v in wanted if v not in available]
        if missing:
            raise NotFoundError(
                f"model {entry.name!r}: version_policy names versions {missing} that are not in the "
                f"repository (available: {available}); publish them or fix config.pbtxt"
            )
        return wanted
    count = int(policy.latest.num_versions) if kind == "latest" else 1
    return available[-max(count, 1) :]


def instance_count(config: mc.ModelConfig) -> int:
    return max(1, sum(int(g.count) or 1 for g in config.instance_group))


def _intra_op_threads(config: mc.ModelConfig, default: int) -> int:
    if "intra_op_thread_count" in config.parameters:
        text = config.parameters["intra_op_thread_count"].string_value
        if text.isdigit() and int(text) > 0:
            return int(text)
    return default


def artifact_name(config: mc.ModelConfig) -> str:
    """The file a version directory holds for this config (Triton's defaults per platform)."""
    return config.default_model_filename or DEFAULT_FILENAMES.get(config.platform or config.backend, "model.onnx")


def _complete_io_from_artifact(entry: ModelEntry, config: mc.ModelConfig, version: int) -> mc.ModelConfig:
    """Triton auto-completes a config without input/output sections from the ONNX model; so do we."""
    filename = artifact_name(config)
    artifact = entry.path / str(version) / filename
    if not filename.endswith(".onnx") or not artifact.exists():
        return config
    try:
        model = onnx.load(str(artifact), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and friends for corrupt files
        raise RepositoryError(
            f"model {entry.name!r}: cannot read {version}/{filename} to complete its config: {err}"
        ) from err
    inputs = tuple(value_spec(v) for v in graph_inputs(model))
    outputs = tuple(value_spec(v) for v in model.graph.output)
    return complete_io(config, inputs, outputs)


def _named(config: mc.ModelConfig, name: str) -> mc.ModelConfig:
    named = mc.ModelConfig()
    named.CopyFrom(config)
    if not named.name:
        named.name = name
    return named


def _sample_count(inputs: Arrays) -> int:
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _now() -> int:
    return time.perf_counter_ns()


async def _close_all(record: ModelRecord) -> None:
    for served in record.versions.values():
        await served.close()
