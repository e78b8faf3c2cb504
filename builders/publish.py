"""Step 6 of a build: publish a version into the Triton model repository, atomically.

A version becomes visible complete, with a config that describes it, or not at all. It is staged
in a hidden directory inside the model directory (same filesystem; Triton ignores non-numeric
names) whose owner holds a lock on it (``builders.staging``), every file is fsynced, and then,
under the repository's commit lock: the inputs/outputs are checked against the published config
(a racing build of another model under the same name loses with ConflictError), the manifest is
written, config.pbtxt is replaced atomically, and the stage is renamed to the next version. A
failure (a full disk, a kill) at any step leaves no version visible, existing versions untouched
and the old config back in place; stages of killed publishes are removed by the next publish and
reported by ``kiln repo verify``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from builders.inspection import ModelInfo
from builders.manifest import MANIFEST_NAME, build_manifest, file_checksums
from builders.model_config import ServingOptions, config_tensors, config_text, parse_config, render_config
from builders.repository import CONFIG_NAME, Published, check_model_name, list_versions, repository_root
from builders.request import BuildRequest
from builders.staging import find_leftovers, open_stage, remove_leftover, repository_lock
from builders.version_policy import decide_policy
from core.atomic_file import write_atomic
from core.errors import ConflictError, KilnError, RepositoryError

logger = logging.getLogger(__name__)

StageHook = Callable[[str], None]
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class _Steps:
    """The step a publish is at (named in error messages), announced to the test hook before it runs."""

    def __init__(self, hook: StageHook | None) -> None:
        self.hook = hook
        self.current = "preparing the model directory"

    def __call__(self, step: str) -> None:
        self.current = step
        if self.hook is not None:
            self.hook(step)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def publish_version(
    repo: Path | str,
    name: str,
    files: dict[str, Path],
    config: mc.ModelConfig,
    manifest: dict[str, Any],
    *,
    hook: StageHook | None = None,
) -> Published:
    """Copy ``files`` (name in version dir -> source path) into a new version of model ``name``.

    The version becomes visible complete or not at all: it is staged and synced, then under the
    repository lock its inputs/outputs are checked against the published config, config.pbtxt is
    replaced and the stage renamed into place (a failure before the rename restores the old
    config). ``hook(step)`` is called before each step so tests can inject faults (ENOSPC,
    SIGKILL); production never passes one.
    """
    check_model_name(name)
    root = repository_root(repo, must_exist=False)
    steps = _Steps(hook)
    model_dir = root / name
    created = False
    version: int | None = None
    try:
        steps("preparing the model directory")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RepositoryError(
                f"cannot create model directory {str(model_dir)!r}: {err.strerror}; check --repo"
            ) from err
        with repository_lock(root):
            created = _prepare_model_dir(model_dir)
            check_same_io(model_dir, config)
            for leftover in find_leftovers(model_dir):
                logger.info("removing %s", leftover.describe())
                remove_leftover(leftover)
            steps("creating the stage directory")
            stage = open_stage(model_dir)
        try:
            manifest = _fill_stage(stage.path, files, manifest, steps)
            steps("waiting for the repository lock")
            with repository_lock(root):
                version = _commit(model_dir, stage.path, config, manifest, steps)
        finally:
            stage.close()
        final = model_dir / str(version)
        logger.info("published %s version %d at %s", name, version, final)
        return Published(name, version, final, json.loads(_manifest_text(manifest, version)))
    except OSError as err:
        raise RepositoryError(_failure_message(name, root, steps.current, err)) from err
    finally:
        if created and version is None:
            with contextlib.suppress(OSError), repository_lock(root):
                _remove_if_empty(model_dir)


def _prepare_model_dir(model_dir: Path) -> bool:
    """Create the model directory if needed; whether this call created it (to remove it on failure)."""
    try:
        created = not model_dir.exists()
        model_dir.mkdir(exist_ok=True)
    except OSError as err:
        raise RepositoryError(
            f"cannot create model directory {str(model_dir)!r}: {err.strerror}; check --repo"
        ) from err
    if not os.access(model_dir, os.W_OK):
        raise RepositoryError(f"model directory {str(model_dir)!r} is not writable; check permissions or --repo")
    return created


def _fill_stage(stage: Path, files: dict[str, Path], manifest: dict[str, Any], steps: _Steps) -> dict[str, Any]:
    """Copy the files into the stage and sync them; the manifest with their checksums."""
    for rel, src in files.items():
        steps(f"copying {rel}")
        dest = stage / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    steps("computing checksums")
    manifest = dict(manifest, files=file_checksums(stage))
    steps("syncing the staged files")
    for path in stage.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    _fsync_dir(stage)
    return manifest


def _commit(model_dir: Path, stage: Path, config: mc.ModelConfig, manifest: dict[str, Any], steps: _Steps) -> int:
    """Under the repository lock: check, write manifest and config, rename the stage to the next version."""
    check_same_io(model_dir, config)  # again: a racing publish of another model may have won meanwhile
    versions = list_versions(model_dir)
    version = versions[-1] + 1 if versions else 1
    while os.path.lexists(model_dir / str(version)):
        version += 1  # a stray file or directory by that name that is not a version
    steps(f"writing {MANIFEST_NAME}")
    manifest_path = stage / MANIFEST_NAME
    manifest_path.write_text(_manifest_text(manifest, version))
    _fsync_file(manifest_path)
    _fsync_dir(stage)
    steps(f"writing {CONFIG_NAME}")
    config_path = model_dir / CONFIG_NAME
    old = _read_bytes(config_path)
    new = config_text(config).encode()
    if new != old:
        write_atomic(config_path, new)
    try:
        steps(f"renaming the stage to version {version}")
        os.rename(stage, model_dir / str(version))
    except BaseException:
        if new != old:
            _restore_config(config_path, old)
        raise
    try:
        _fsync_dir(model_dir)
    except OSError as err:  # the version is in place and complete; only its durability is unconfirmed
        logger.warning(
            "version %d of %s is published but syncing %s failed: %s", version, model_dir.name, model_dir, err
        )
    return version


def _manifest_text(manifest: dict[str, Any], version: int) -> str:
    return json.dumps(dict(manifest, version=version), indent=2, sort_keys=True) + "\n"


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _restore_config(path: Path, old: bytes | None) -> None:
    """Put back the config a failed publish replaced (its inputs/outputs matched, so this is tidiness)."""
    try:
        if old is None:
            path.unlink(missing_ok=True)
        else:
            write_atomic(path, old)
    except OSError as err:
        logger.warning("could not restore %s after a failed publish: %s", path, err)


def _failure_message(name: str, root: Path, step: str, err: OSError) -> str:
    if err.errno in _NO_SPACE:
        return (
            f"publishing {name!r} into {str(root)!r} failed while {step}: no space left on the device; "
            "nothing was published and existing versions are unchanged. Free space there and build again"
        )
    reason = err.strerror or str(err)
    return f"publishing {name!r} into {str(root)!r} failed while {step}: {reason}; nothing was published"


def _io_signature(config: mc.ModelConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    inputs, outputs = config_tensors(config)
    return (
        tuple(sorted(f"{s.name}:{s.dtype}{list(s.shape)}" for s in inputs)),
        tuple(sorted(f"{s.name}:{s.dtype}{list(s.shape)}" for s in outputs)),
    )


def _runtime(config: mc.ModelConfig) -> str:
    return config.platform or config.backend


def check_same_io(model_dir: Path, config: mc.ModelConfig) -> None:
    """Refuse a version whose platform or inputs/outputs differ from the published ones (they share
    config.pbtxt). Called again under the repository lock, so of two racing builds one loses."""
    versions = list_versions(model_dir)
    path = model_dir / CONFIG_NAME
    if not versions or not path.is_file():
        return
    try:
        published = parse_config(path.read_text(), str(path))
    except (KilnError, OSError):
        return  # an unreadable config is replaced; `kiln repo verify` reports the versions it breaks
    if _runtime(published) != _runtime(config):
        raise ConflictError(
            f"model {model_dir.name!r} already has version(s) {versions} for {_runtime(published)!r}; this build "
            f"is for {_runtime(config)!r}. A Triton model's versions share one config.pbtxt, so publish this "
            "model under another --name"
        )
    old, new = _io_signature(published), _io_signature(config)
    if old != new:
        raise ConflictError(
            f"model {model_dir.name!r} already has version(s) {versions} with inputs {list(old[0])} and outputs "
            f"{list(old[1])}; this build has inputs {list(new[0])} and outputs {list(new[1])}. A Triton model's "
            "versions share one config.pbtxt, so publish this model under another --name"
        )


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty: a concurrent publisher is using it, or it was not empty to begin with


def publish_artifact(
    request: BuildRequest,
    info: ModelInfo,
    artifact: Path,
    batch: int,
    *,
    build_extra: dict[str, Any],
    calibration: dict[str, Any] | None = None,
    validation: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
    serving: ServingOptions | None = None,
    tools: dict[str, str] | None = None,
) -> Published:
    """Render config and manifest for an artifact and publish it as a new version."""
    serving = serving or ServingOptions(
        max_batch_size=batch,
        instances=request.instances,
        kind="KIND_GPU" if request.target == "tensorrt" else "KIND_CPU",
    )
    policy = decide_policy(request.repo, request.triton_name, request.keep_versions)  # keeps an existing one
    serving = dataclasses.replace(serving, version_policy=policy.policy)
    config = render_config(request.triton_name, request.target, info.inputs, info.outputs, serving)
    manifest = build_manifest(
        model_name=request.triton_name,
        source_path=request.model,
        source_sha256=info.sha256,
        precision=request.precision,
        target=request.target,
        artifact=artifact.name,
        files={},
        build={"max_batch_size": batch, "instances": request.instances, **build_extra},
        calibration=calibration,
        validation=validation,
        tools=tools,
        replaces=policy.replaces,
    )
    files = {artifact.name: artifact, **(extra_files or {})}
    return publish_version(request.repo, request.triton_name, files, config, manifest)
