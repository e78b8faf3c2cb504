"""Atomic file replacement, shared by the repository, calibration files and the server's state.

Readers see the old content or the new, never a mix, and after a crash the file is one or the
other: write a temporary file in the same directory, fsync it, rename it over the target, fsync
the directory. The parent directory must exist; errors are OSError for callers to translate.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably; the file gets 0666 less the umask
    (0644 usually), like any file a program creates, not mkstemp's 0600."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
