"""Stage directories of publishes in flight, the locks that say whether their owner lives, and the
repository's commit lock.

A publish stages a version in ``<model>/.staging-<token>/`` (Triton ignores non-numeric names) and
holds an exclusive ``flock`` on ``<model>/.staging-<token>.owner`` for as long as it runs; the
kernel drops that lock when the process dies, however it dies. A stage whose owner file can be
locked by someone else is therefore stale: its publisher was killed. Creating and removing stages
and committing a version (config.pbtxt, rename) happen under one short exclusive lock on
``<repo>/.kiln-publish.lock``, so two publishers never decide on a model's state at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.errors import RepositoryError

LOCK_NAME = ".kiln-publish.lock"
STAGE_PREFIX = ".staging-"
OWNER_SUFFIX = ".owner"
LOCK_TIMEOUT_S = 60.0


@contextlib.contextmanager
def repository_lock(root: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the repository's commit lock (exclusive, between processes and threads alike)."""
    try:
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise RepositoryError(
            f"cannot open the repository's lock file {str(root / LOCK_NAME)!r}: {err.strerror}; "
            "check that --repo is a writable directory"
        ) from err
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RepositoryError(
                        f"another publish has held {str(root / LOCK_NAME)!r} for over {timeout_s:g} s; "
                        "wait for it to finish, or find the process holding it (fuser)"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@dataclass
class Stage:
    """A stage directory and the locked owner file that marks it as in use."""

    path: Path
    owner: Path
    fd: int

    def close(self) -> None:
        """Remove the stage (if not renamed into place) and its owner file, releasing the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.owner.unlink()
        os.close(self.fd)


def open_stage(model_dir: Path) -> Stage:
    """Create and lock a fresh owner file, then its stage directory (call under the repository lock)."""
    token = uuid.uuid4().hex
    path = model_dir / f"{STAGE_PREFIX}{token}"
    owner = model_dir / f"{STAGE_PREFIX}{token}{OWNER_SUFFIX}"
    fd = os.open(owner, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        path.mkdir()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            owner.unlink()
        os.close(fd)
        raise
    return Stage(path, owner, fd)


@dataclass(frozen=True)
class Leftover:
    """A stage directory (or a lone owner file) whose publisher is gone."""

    model: str
    path: Path
    owner: str

    def describe(self) -> str:
        return f"{self.model}: {self.path.name} is left over from an interrupted publish ({self.owner})"


def find_leftovers(model_dir: Path) -> list[Leftover]:
    """Stages in ``model_dir`` whose owner no longer holds its lock (nothing in flight is listed)."""
    tokens = sorted({p.name.removesuffix(OWNER_SUFFIX) for p in _entries(model_dir) if p.name.startswith(STAGE_PREFIX)})
    found = []
    for token in tokens:
        owner = _stale_owner(model_dir / f"{token}{OWNER_SUFFIX}")
        if owner is not None:
            found.append(Leftover(model_dir.name, model_dir / token, owner))
    return found


def remove_leftover(leftover: Leftover) -> None:
    """Delete a stale stage and its owner file (call under the repository lock)."""
    owner = leftover.path.with_name(leftover.path.name + OWNER_SUFFIX)
    if _stale_owner(owner) is None:
        return  # its publisher is alive after all
    shutil.rmtree(leftover.path, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        owner.unlink()


def _entries(model_dir: Path) -> list[Path]:
    try:
        return list(model_dir.iterdir())
    except OSError:
        return []


def _stale_owner(owner: Path) -> str | None:
    """The recorded owner of a stage if it is stale, None while its publisher holds the lock."""
    try:
        fd = os.open(owner, os.O_RDWR)
    except FileNotFoundError:
        return "no owner file: an older Kiln or an interrupted clean-up"
    except OSError as err:
        return f"owner file unreadable: {err.strerror}"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        text = os.read(fd, 200).decode("utf-8", "replace").strip() or "owner unknown"
        return f"{text}, which no longer runs"
    finally:
        os.close(fd)
