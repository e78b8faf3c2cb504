"""Which versions of a model stay servable: the version policy a build writes and ``kiln repo policy``.

A new model gets ``--keep-versions`` (default 2: the newest and the one before, so a rollout can
canary between them and roll back). A build never changes the policy of a model that already
exists: it keeps what ``config.pbtxt`` says, refuses a ``--keep-versions`` that disagrees, and
warns when the policy would take the version serving today out of service the moment the new one
loads. Changing it is an explicit ``kiln repo policy NAME --keep-versions ...``, one atomic rewrite
of ``config.pbtxt`` (servers in poll mode pick it up; explicit-mode servers on their next load).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from builders.model_config import (
    DEFAULT_KEEP_VERSIONS,
    config_text,
    parse_config,
    parse_keep_versions,
    policy_of,
    served_by_policy,
    set_version_policy,
)
from builders.repository import CONFIG_NAME, check_model_name, list_versions, repository_root
from builders.staging import repository_lock
from core.atomic_file import write_atomic
from core.errors import ConflictError, KilnError, NotFoundError, RepositoryError


@dataclass(frozen=True)
class PolicyDecision:
    """The policy a build publishes with, the version it replaces, and what the user should know."""

    policy: str
    replaces: int | None
    warnings: tuple[str, ...] = ()


def _published_policy(model_dir: Path) -> str | None:
    path = model_dir / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return policy_of(parse_config(path.read_text(), str(path)))
    except (KilnError, OSError):
        return None  # an unreadable config is replaced by the build; `kiln repo verify` reports it


def decide_policy(repo: Path | str, name: str, keep_versions: str | None) -> PolicyDecision:
    """The policy for the next version of ``name``; ``keep_versions`` None means the flag was not given."""
    model_dir = Path(repo) / check_model_name(name)
    versions = list_versions(model_dir)
    requested = parse_keep_versions(keep_versions) if keep_versions is not None else None
    current = _published_policy(model_dir) if versions else None
    if current is None:
        return PolicyDecision(requested or parse_keep_versions(DEFAULT_KEEP_VERSIONS), None)
    if requested is not None and requested != current:
        raise ConflictError(
            f"model {name!r} already has versions {versions} with version policy {current}; a build does not "
            f"change it (got --keep-versions {keep_versions}). Change it first with "
            f"'kiln repo policy {name} --keep-versions {keep_versions}', or drop the flag"
        )
    latest = versions[-1]
    upcoming = latest + 1
    warnings: list[str] = []
    if upcoming not in served_by_policy(current, [*versions, upcoming]):
        warnings.append(
            f"model {name!r} has version policy {current}, which will not serve the version this build "
            f"publishes ({upcoming}); include it with 'kiln repo policy {name} --keep-versions ...'"
        )
    elif latest not in served_by_policy(current, [*versions, upcoming]):
        warnings.append(
            f"model {name!r} has version policy {current}: once version {upcoming} loads, version {latest} stops "
            f"being served everywhere at once (no canary, nothing to roll back to). Keep both with "
            f"'kiln repo policy {name} --keep-versions 2'"
        )
    return PolicyDecision(current, latest, tuple(warnings))


@dataclass(frozen=True)
class PolicyChange:
    model: str
    old: str
    new: str
    versions: tuple[int, ...]
    served: tuple[int, ...]
    path: Path


def read_policy(repo: Path | str, name: str) -> PolicyChange:
    """The current policy of ``name`` and the versions it serves (``old == new``)."""
    model_dir, config, versions = _model(repo, name)
    policy = policy_of(config)
    served = tuple(served_by_policy(policy, versions))
    return PolicyChange(name, policy, policy, tuple(versions), served, model_dir / CONFIG_NAME)


def change_policy(repo: Path | str, name: str, keep_versions: str) -> PolicyChange:
    """Rewrite ``config.pbtxt`` of ``name`` with a new policy, atomically; nothing else in it changes.
    Under the repository's commit lock, so a publish running meanwhile cannot undo the change."""
    policy = parse_keep_versions(keep_versions)
    with repository_lock(repository_root(repo)):
        return _write_policy(repo, name, keep_versions, policy)


def _write_policy(repo: Path | str, name: str, keep_versions: str, policy: str) -> PolicyChange:
    model_dir, config, versions = _model(repo, name)
    if policy.startswith("specific:"):
        missing = [v for v in (int(x) for x in policy.removeprefix("specific:").split(",")) if v not in versions]
        if missing:
            raise NotFoundError(
                f"--keep-versions {keep_versions}: model {name!r} has no versions {missing} (it has {versions}); "
                "a server would refuse to load it. Name published versions"
            )
    path = model_dir / CONFIG_NAME
    try:
        write_atomic(path, config_text(set_version_policy(config, policy)).encode())
    except OSError as err:
        raise RepositoryError(f"cannot rewrite {str(path)!r}: {err}; nothing was changed") from err
    served = tuple(served_by_policy(policy, versions))
    return PolicyChange(name, policy_of(config), policy, tuple(versions), served, path)


def _model(repo: Path | str, name: str) -> tuple[Path, mc.ModelConfig, list[int]]:
    model_dir = repository_root(repo) / check_model_name(name)
    path = model_dir / CONFIG_NAME
    if not path.is_file():
        raise NotFoundError(f"model {name!r} has no {CONFIG_NAME} in {str(model_dir)!r}; build it first")
    return model_dir, parse_config(path.read_text(), str(path)), list_versions(model_dir)
