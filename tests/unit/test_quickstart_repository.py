from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConflictError
from server.quickstart import MARKER, prepare_repository


def test_quickstart_replaces_only_its_own_repository(tmp_path: Path) -> None:
    repo = tmp_path / "qs"
    prepare_repository(repo)
    (repo / "old-model").mkdir()
    prepare_repository(repo)  # made by quickstart: replaced
    assert sorted(p.name for p in repo.iterdir()) == [MARKER]
    (repo / MARKER).unlink()
    (repo / "user-model").mkdir()
    with pytest.raises(ConflictError, match="was not made by kiln quickstart"):
        prepare_repository(repo)
    assert (repo / "user-model").is_dir()


def test_empty_existing_directory_is_used(tmp_path: Path) -> None:
    prepare_repository(tmp_path)
    assert (tmp_path / MARKER).exists()
