"""Poll mode: notice new, changed and removed versions and models in a repository.

``RepositoryPoller.poll`` compares each model directory with what it saw last time (the config
file's size and mtime, every version directory's files, sizes and mtimes) and reloads a model
whose directory changed; the store reuses unchanged versions and never drops a serving one for a
version that fails. A version directory without ``kiln.json`` that changed since the last pass may
still be being copied by hand, so it waits until it looks the same on two passes; one with
``kiln.json`` is considered at once, since its checksums tell whether it is complete (and Kiln's
own publish is atomic). A model whose directory disappeared is unloaded, as Triton does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from builders.manifest import MANIFEST_NAME
from builders.repository import is_version_dir, list_models
from core.errors import KilnError

logger = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int], ...]


def version_fingerprint(path: Path) -> Fingerprint:
    """(file, size, mtime) of every file in a version directory: a change means new content."""
    if not path.is_dir():
        return ()
    items = []
    for file in sorted(path.rglob("*")):
        try:
            if file.is_file():
                stat = file.stat()
                items.append((file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
        except OSError:  # removed while we looked
            continue
    return tuple(items)


def model_snapshot(model_dir: Path) -> tuple[object, ...]:
    """What poll compares between passes: the config file's stat and every version's fingerprint."""
    try:
        stat = (model_dir / "config.pbtxt").stat()
        config: tuple[int, int] | None = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        config = None
    try:
        versions = tuple((p.name, version_fingerprint(p)) for p in sorted(model_dir.iterdir()) if is_version_dir(p))
    except OSError:
        versions = ()
    return (config, versions)


class PolledStore(Protocol):
    """What the poller needs from ``server.model_store.ModelStore``."""

    root: Path

    async def load(self, name: str, *, strict: bool = ..., among: set[int] | None = ...) -> Any: ...

    async def unload(self, name: str, reason: str = ...) -> None: ...

    def loaded_fingerprint(self, name: str, version: int) -> Fingerprint | None: ...

    def serving_models(self) -> list[str]: ...


class RepositoryPoller:
    """Poll mode over one store; ``poll`` runs on the store's event loop."""

    def __init__(self, store: PolledStore, models: Sequence[str] | None = None) -> None:
        self._store = store
        self._models = tuple(models) if models is not None else None
        self._seen: dict[str, tuple[object, ...]] = {}
        self._settling: dict[str, dict[int, Fingerprint]] = {}  # versions seen changing last pass

    def remember(self) -> None:
        """Note what the repository looks like now (call just before the start-up load)."""
        for name in self._names():
            self._seen[name] = model_snapshot(self._store.root / name)

    async def poll(self) -> list[str]:
        """One pass; returns the models it (re)loaded or unloaded."""
        touched: list[str] = []
        on_disk = set(self._names())
        for name in sorted(on_disk):
            snapshot = model_snapshot(self._store.root / name)
            if snapshot == self._seen.get(name) and name not in self._settling:
                continue
            among = self._settled_versions(name)
            self._seen[name] = snapshot
            try:
                await self._store.load(name, strict=False, among=among)
            except KilnError as err:
                logger.warning("poll: model %s did not load: %s", name, err)
            touched.append(name)
        for name in self._store.serving_models():
            if name not in on_disk and (self._models is None or name in self._models):
                await self._store.unload(name, "removed from the repository")
                self._seen.pop(name, None)
                touched.append(name)
        return touched

    def _names(self) -> list[str]:
        names = [entry.name for entry in list_models(self._store.root)]
        return [n for n in names if self._models is None or n in self._models]

    def _settled_versions(self, name: str) -> set[int]:
        """Versions to consider now; one without kiln.json that is still changing waits a pass."""
        model_dir = self._store.root / name
        previous = self._settling.pop(name, {})
        settled: set[int] = set()
        changing: dict[int, Fingerprint] = {}
        for path in sorted(p for p in model_dir.iterdir() if is_version_dir(p)):
            version, prints = int(path.name), version_fingerprint(path)
            stable = prints in (previous.get(version), self._store.loaded_fingerprint(name, version))
            if (path / MANIFEST_NAME).is_file() or stable:
                settled.add(version)
            else:
                changing[version] = prints
                logger.info(
                    "poll: %s version %d has no %s and may still be being copied; waiting a pass",
                    name,
                    version,
                    MANIFEST_NAME,
                )
        if changing:
            self._settling[name] = changing
        return settled
