"""Step 6 of a build: publish a version into the Triton model repository, atomically.

A version is staged in a hidden directory inside the model directory (same filesystem; Triton
ignores non-numeric directory names), every file and directory is fsynced, and the stage is
renamed to the next free version number. ``rename`` refuses an existing non-empty target, so two
concurrent publishers end up with two distinct versions, and a failure at any step leaves no
version visible and never touches existing ones. config.pbtxt is replaced with ``os.replace``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from builders.inspection import ModelInfo
from builders.manifest import MANIFEST_NAME, build_manifest, file_checksums
from builders.model_config import ServingOptions, config_tensors, config_text, parse_config, render_config
from builders.repository import CONFIG_NAME, Published, check_model_name, list_versions, repository_root
from builders.request import BuildRequest
from builders.version_policy import decide_policy
from core.atomic_file import write_atomic
from core.errors import ConflictError, KilnError, RepositoryError

logger = logging.getLogger(__name__)

StageHook = Callable[[str], None]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _prepare_model_dir(repo: Path, name: str) -> tuple[Path, bool]:
    """The model directory, and whether this call created it (to remove it again on failure)."""
    model_dir = repo / name
    try:
        repo.mkdir(parents=True, exist_ok=True)
        created = not model_dir.exists()
        model_dir.mkdir(exist_ok=True)
    except OSError as err:
        raise RepositoryError(
            f"cannot create model directory {str(model_dir)!r}: {err.strerror}; check --repo"
        ) from err
    if not os.access(model_dir, os.W_OK):
        raise RepositoryError(f"model directory {str(model_dir)!r} is not writable; check permissions or --repo")
    return model_dir, created


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

    ``hook(stage)`` is called between steps (``"staged"``, ``"synced"``) so tests can inject
    failures; it is never needed in production.
    """
    check_model_name(name)
    root = repository_root(repo, must_exist=False)
    model_dir, created = _prepare_model_dir(root, name)
    check_same_io(model_dir, config)
    stage = model_dir / f".staging-{uuid.uuid4().hex}"
    published = False
    try:
        stage.mkdir()
        for rel, src in files.items():
            dest = stage / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        manifest = dict(manifest, files=file_checksums(stage))
        if hook:
            hook("staged")
        for path in stage.rglob("*"):
            if path.is_file():
                _fsync_file(path)
        _fsync_dir(stage)
        if hook:
            hook("synced")
        version = _claim_version(model_dir, stage, manifest)
        published = True
    except OSError as err:
        raise RepositoryError(f"publishing {name!r} into {str(root)!r} failed: {err}; nothing was published") from err
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        if created and not published:
            _remove_if_empty(model_dir)
    config_bytes = config_text(config).encode()
    write_atomic(model_dir / CONFIG_NAME, config_bytes)
    final = model_dir / str(version)
    logger.info("published %s version %d at %s", name, version, final)
    return Published(name, version, final, json.loads((final / MANIFEST_NAME).read_text()))


def _io_signature(config: mc.ModelConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    inputs, outputs = config_tensors(config)
    return (
        tuple(sorted(f"{s.name}:{s.dtype}{list(s.shape)}" for s in inputs)),
        tuple(sorted(f"{s.name}:{s.dtype}{list(s.shape)}" for s in outputs)),
    )


def check_same_io(model_dir: Path, config: mc.ModelConfig) -> None:
    """Refuse a version whose inputs/outputs differ from the published ones (they share config.pbtxt)."""
    versions = list_versions(model_dir)
    path = model_dir / CONFIG_NAME
    if not versions or not path.is_file():
        return
    try:
        published = parse_config(path.read_text(), str(path))
    except (KilnError, OSError):
        return  # an unreadable config is replaced; `kiln repo verify` reports the versions it breaks
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
        pass  # not empty: a concurrent publisher is using it


def _claim_version(model_dir: Path, stage: Path, manifest: dict[str, Any]) -> int:
    """Rename the stage to the next free version; retry when a concurrent publisher won it."""
    for _ in range(1000):
        existing = list_versions(model_dir)
        version = (existing[-1] + 1) if existing else 1
        manifest_path = stage / MANIFEST_NAME
        manifest_path.write_text(json.dumps(dict(manifest, version=version), indent=2, sort_keys=True) + "\n")
        _fsync_file(manifest_path)
        _fsync_dir(stage)
        target = model_dir / str(version)
        try:
            if target.exists():
                continue
            os.rename(stage, target)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise
        _fsync_dir(model_dir)
        return version
    raise RepositoryError(f"could not allocate a version in {str(model_dir)!r} after 1000 attempts")


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
