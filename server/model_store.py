"""The models ``kiln serve`` holds: loaded from a Triton repository, versioned, batched, unloadable.

``ModelStore`` reads ``<repo>/<model>/config.pbtxt`` through ``builders.repository``, picks the
versions its ``version_policy`` names, creates ``instance_group`` count runners per version and
one ``Batcher`` each. A model being loaded answers UNAVAILABLE; a model that failed to load keeps
its reason (shown by RepositoryIndex) and does not stop the others.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import onnx
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
from core.errors import InvalidInputError, KilnError, NotFoundError, RepositoryError, UnavailableError
from runtime.layout import DEFAULT_FILENAMES
from runtime.runner import Runner, RunnerFactory, RunnerSpec, create_runner
from server.batching import Arrays, Batcher, BatchPolicy, Timing
from server.statistics import VersionStats
from server.validation import check_inputs

logger = logging.getLogger(__name__)


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class StoreOptions:
    intra_op_threads: int = 1
    dynamic_batching: bool | None = None  # None: as config.pbtxt says
    runner_factory: RunnerFactory = create_runner


class ServedVersion:
    """One loaded version: its runners (one per instance), worker threads and batcher."""

    def __init__(self, name: str, version: int, config: mc.ModelConfig, runners: list[Runner], dynamic: bool | None):
        self.name, self.version, self.config = name, version, config
        self.inputs, self.outputs = config_tensors(config)
        self.stats = VersionStats()
        self._runners: list[Runner] = runners
        self._idle: queue.SimpleQueue[Runner] = queue.SimpleQueue()
        for runner in runners:
            self._idle.put(runner)
        self._executor = ThreadPoolExecutor(len(runners), thread_name_prefix=f"kiln-{name}-{version}")
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


class ModelStore:
    """Loaded models by name; all methods run on the server's event loop."""

    def __init__(self, repo: Path | str, options: StoreOptions | None = None) -> None:
        self.root = repository_root(repo)
        self.options = options or StoreOptions()
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
            raise NotFoundError(
                f"model {name!r} has no version {version!r} being served; served versions are "
                f"{sorted(record.versions)} (its version_policy decides which)"
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

    async def load(self, name: str) -> ModelRecord:
        """Load (or reload) a model; the old versions serve until the new ones are ready."""
        check_model_name(name)  # never a path outside the repository
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            entry = read_model(self.root, name)
            old = self._records.get(name)
            if old is None or old.state is not ModelState.READY:
                self._records[name] = ModelRecord(name, ModelState.LOADING, config=entry.config)
            try:
                versions = await self._load_versions(entry)
            except KilnError as err:
                if old is not None and old.state is ModelState.READY:
                    raise  # the old versions keep serving
                self._records[name] = ModelRecord(name, ModelState.UNAVAILABLE, str(err), entry.config)
                raise
            self._records[name] = ModelRecord(name, ModelState.READY, "", entry.config, versions)
            if old is not None:
                await _close_all(old)
            logger.info("loaded model %s versions %s", name, sorted(versions))
            return self._records[name]

    async def unload(self, name: str) -> None:
        """Stop taking requests for a model, finish the queued ones, release its sessions."""
        record = self._records.get(name)
        if record is None:
            raise NotFoundError(f"model {name!r} is not loaded; RepositoryIndex lists the models")
        async with self._locks.setdefault(name, asyncio.Lock()):
            record.state = ModelState.UNLOADING
            await _close_all(record)
            self._records[name] = ModelRecord(name, ModelState.UNAVAILABLE, "unloaded", record.config)

    async def close(self) -> None:
        for record in list(self._records.values()):
            await _close_all(record)

    async def _load_versions(self, entry: ModelEntry) -> dict[int, ServedVersion]:
        if entry.config is None:
            raise RepositoryError(f"model {entry.name!r}: {entry.config_error}; fix or republish it")
        config = _named(entry.config, entry.name)
        chosen = select_versions(entry, config)
        if chosen and (not config.input or not config.output):
            config = _complete_io_from_artifact(entry, config, chosen[-1])
        loop = asyncio.get_running_loop()
        built: dict[int, ServedVersion] = {}
        try:
            for version in chosen:
                runners = await loop.run_in_executor(None, self._create_runners, entry, config, version)
                built[version] = ServedVersion(entry.name, version, config, runners, self.options.dynamic_batching)
        except BaseException:
            for served in built.values():
                await served.close()
            raise
        return built

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


def select_versions(entry: ModelEntry, config: mc.ModelConfig) -> list[int]:
    """The versions ``version_policy`` serves (Triton's default: the latest one)."""
    available = [v.version for v in entry.versions]
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
