"""Reading a Triton model repository: models, versions, manifests, and verification.

The layout is standard Triton (``<repo>/<model>/config.pbtxt``, ``<repo>/<model>/<v>/...``), so
this reader is shared by ``kiln repo``, ``kiln serve`` and the gateway.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from builders.manifest import MANIFEST_NAME, file_checksums, read_manifest
from builders.model_config import mismatches, parse_config
from builders.staging import Leftover, find_leftovers, remove_leftover, repository_lock
from core.errors import InvalidInputError, KilnError, NotFoundError, RepositoryError

CONFIG_NAME = "config.pbtxt"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_RE = re.compile(r"^[1-9][0-9]{0,17}\Z", re.ASCII)


@dataclass(frozen=True)
class Published:
    """One version as ``publish_version`` left it: visible, complete, checksummed."""

    model: str
    version: int
    path: Path
    manifest: dict[str, Any]


def is_version_number(text: str) -> bool:
    """Triton's rule for a version: ASCII decimal digits, not starting with 0 (no sign, space,
    '_' or other scripts' digits, all of which ``int()`` would accept)."""
    return bool(_VERSION_RE.match(text))


def is_version_dir(path: Path) -> bool:
    """A version directory: its name is a version number."""
    return is_version_number(path.name) and path.is_dir()


def check_model_name(name: str) -> str:
    """Return the name if it is a safe single path component, else raise with what is allowed."""
    if not _NAME_RE.match(name or "") or name in (".", ".."):
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise InvalidInputError(
            f"model name {shown!r} is not allowed: use 1-128 characters from letters, digits, '.', '_' "
            "and '-', starting with a letter or digit (no '/', no '..')"
        )
    return name


@dataclass(frozen=True)
class VersionInfo:
    version: int
    path: Path
    manifest: dict[str, Any] | None


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    config: mc.ModelConfig | None
    config_error: str | None
    versions: tuple[VersionInfo, ...] = field(default=())

    @property
    def latest(self) -> int | None:
        return self.versions[-1].version if self.versions else None


def repository_root(repo: Path | str, *, must_exist: bool = True) -> Path:
    """Validate the repository path; it may not be a file."""
    root = Path(repo)
    if root.exists() and not root.is_dir():
        raise RepositoryError(f"repository path {str(root)!r} is a file; pass a directory with --repo")
    if must_exist and not root.exists():
        raise NotFoundError(f"model repository {str(root)!r} does not exist; build a model into it first")
    return root


def list_versions(model_dir: Path) -> list[int]:
    """Published version numbers of a model directory, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if is_version_dir(p))


def read_model(root: Path, name: str) -> ModelEntry:
    """One model of the repository, with its parsed config and manifests."""
    model_dir = root / name
    if not model_dir.is_dir():
        raise NotFoundError(f"model {name!r} is not in repository {str(root)!r}")
    config: mc.ModelConfig | None = None
    error: str | None = None
    try:
        config = parse_config((model_dir / CONFIG_NAME).read_text(), str(model_dir / CONFIG_NAME))
    except FileNotFoundError:
        error = f"{model_dir / CONFIG_NAME} is missing"
    except KilnError as err:
        error = str(err)
    versions = []
    for v in list_versions(model_dir):
        vdir = model_dir / str(v)
        try:
            manifest: dict[str, Any] | None = read_manifest(vdir)
        except RepositoryError:
            manifest = None
        versions.append(VersionInfo(v, vdir, manifest))
    return ModelEntry(name, model_dir, config, error, tuple(versions))


def list_models(repo: Path | str) -> list[ModelEntry]:
    """All models in a repository, sorted by name (hidden and staging dirs skipped)."""
    root = repository_root(repo)
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [read_model(root, n) for n in names]


def verify_version(entry: ModelEntry, version: VersionInfo) -> list[str]:
    """Problems with one version: manifest, checksums, artifact I/O vs config."""
    problems: list[str] = []
    where = f"{entry.name}/{version.version}"
    if version.manifest is None:
        problems.append(
            f"{where}: {MANIFEST_NAME} missing or unreadable (not published by Kiln, or damaged): "
            "checksums cannot be verified"
        )
        artifact_name = (entry.config.default_model_filename if entry.config else "") or "model.onnx"
        problems.extend(_config_vs_artifact(entry, version, artifact_name))
        return problems
    recorded = version.manifest.get("files", {})
    actual = file_checksums(version.path)
    for rel, info in recorded.items():
        got = actual.get(rel)
        if got is None:
            problems.append(f"{where}: file {rel!r} listed in {MANIFEST_NAME} is missing")
        elif got["sha256"] != info.get("sha256"):
            recorded_sha = str(info.get("sha256"))[:12]
            problems.append(f"{where}: file {rel!r} checksum {got['sha256'][:12]} != recorded {recorded_sha}")
    for rel in actual:
        if rel not in recorded:
            problems.append(f"{where}: file {rel!r} is not listed in {MANIFEST_NAME}")
    problems.extend(_config_vs_artifact(entry, version, version.manifest.get("artifact", "model.onnx")))
    return problems


def _config_vs_artifact(entry: ModelEntry, version: VersionInfo, artifact: str) -> list[str]:
    if entry.config is None or not artifact.endswith(".onnx") or not (version.path / artifact).exists():
        return []
    if entry.config.model_transaction_policy.decoupled:  # a decoder: kiln serve checks its KV layout instead
        return []
    where = f"{entry.name}/{version.version}"
    return [f"{where}: {p}" for p in _artifact_mismatches(entry.config, version.path / artifact)]


def _artifact_mismatches(config: mc.ModelConfig, artifact: Path) -> list[str]:
    import onnx

    from builders.inspection import graph_inputs, value_spec

    try:
        model = onnx.load(str(artifact), load_external_data=False)
    except Exception as err:  # a corrupt artifact is a verification finding, not a crash
        return [f"artifact {artifact.name} does not load: {err}"]
    inputs = tuple(value_spec(v) for v in graph_inputs(model))
    outputs = tuple(value_spec(v) for v in model.graph.output)
    return _missing_external_data(model, artifact) + mismatches(config, inputs, outputs)


def _missing_external_data(model: Any, artifact: Path) -> list[str]:
    """External data files the artifact names that are not inside its version directory."""
    from builders.inspection import external_data_files

    folder = artifact.parent.resolve()
    problems = []
    for name in external_data_files(model):
        path = (folder / name).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            problems.append(
                f"artifact {artifact.name} needs external data file {name!r}, which is not in {str(folder)!r}"
            )
    return problems


def verify_repository(repo: Path | str) -> list[str]:
    """Every problem found in a repository; empty means it verifies.

    Stages left by killed publishes are not problems (nothing of them is visible; see
    ``find_repository_leftovers``), and neither is the model directory an interrupted first
    publish leaves with no version in it.
    """
    problems: list[str] = []
    for entry in list_models(repo):
        interrupted = not entry.versions and bool(find_leftovers(entry.path))
        if entry.config_error and not interrupted:
            problems.append(f"{entry.name}: {entry.config_error}")
        elif entry.config is not None and entry.config.name and entry.config.name != entry.name:
            problems.append(f"{entry.name}: config.pbtxt names the model {entry.config.name!r}")
        if not entry.versions and not interrupted:
            problems.append(f"{entry.name}: no versions")
        for version in entry.versions:
            problems.extend(verify_version(entry, version))
    return problems


def find_repository_leftovers(repo: Path | str) -> list[Leftover]:
    """Stages of publishes that were killed, in every model directory (ones in flight are not listed)."""
    root = repository_root(repo)
    found: list[Leftover] = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.extend(find_leftovers(model_dir))
    return found


def clean_leftovers(repo: Path | str) -> list[Leftover]:
    """Remove the stages of killed publishes, and model directories that held nothing else; returns them."""
    root = repository_root(repo)
    with repository_lock(root):
        found = find_repository_leftovers(root)
        for leftover in found:
            remove_leftover(leftover)
        for model_dir in {leftover.path.parent for leftover in found}:
            _remove_interrupted_first_publish(model_dir)
    return found


def _remove_interrupted_first_publish(model_dir: Path) -> None:
    """A model directory with no version and nothing but config.pbtxt is what a first publish killed
    before its rename leaves; remove it (a directory with anything else in it is kept)."""
    if list_versions(model_dir) or {p.name for p in model_dir.iterdir()} - {CONFIG_NAME}:
        return
    with contextlib.suppress(OSError):
        (model_dir / CONFIG_NAME).unlink(missing_ok=True)
        model_dir.rmdir()
