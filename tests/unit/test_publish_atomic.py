"""Publishing is atomic: a fault at any step leaves nothing visible, racing builds of different models
under one name cannot both win, files get normal permissions, and killed publishes' stages are found
and cleaned only when their owner is gone."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from builders.model_config import parse_config
from builders.repository import (
    clean_leftovers,
    find_repository_leftovers,
    is_version_number,
    list_versions,
    verify_repository,
)
from builders.staging import find_leftovers, open_stage
from core.atomic_file import write_atomic
from core.errors import ConflictError, RepositoryError
from harness.models import make_linear_model, tree_snapshot
from harness.publish_faults import NAME, publish_linear
from server.cli import main


def visible(repo: Path) -> dict[str, bytes]:
    """The repository as Triton and kiln serve see it (the commit lock file is not part of it)."""
    return {k: v for k, v in tree_snapshot(repo).items() if k != ".kiln-publish.lock"}


@pytest.fixture
def steps(tmp_path: Path, linear_model: Path) -> list[str]:
    """Every step of a publish (of a second version, so config.pbtxt is rewritten too)."""
    repo = tmp_path / "steps-repo"
    publish_linear(repo, linear_model)
    recorded: list[str] = []
    publish_linear(repo, linear_model, hook=recorded.append, max_batch_size=4)
    return recorded


def test_steps_cover_every_write(steps: list[str]) -> None:
    assert steps[0] == "preparing the model directory"
    for expected in ("creating the stage directory", "copying model.onnx", "writing kiln.json", "writing config.pbtxt"):
        assert expected in steps
    assert steps[-1] == "renaming the stage to version 2"
    assert steps.index("writing config.pbtxt") < steps.index("renaming the stage to version 2")


@pytest.mark.parametrize("first", [True, False], ids=["first-version", "next-version"])
def test_disk_full_at_every_step_changes_nothing(
    tmp_path: Path, linear_model: Path, steps: list[str], first: bool
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    if not first:
        publish_linear(repo, linear_model)
    for index, step in enumerate(steps, start=1):
        before = visible(repo)
        calls = 0

        def full(name: str, at: int = index) -> None:
            nonlocal calls
            calls += 1
            if calls == at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with pytest.raises(RepositoryError) as caught:
            publish_linear(repo, linear_model, hook=full, max_batch_size=4)
        message = str(caught.value)
        shown = step.replace("version 2", f"version {1 if first else 2}")
        assert f"failed while {shown}: no space left on the device; nothing was published" in message
        assert visible(repo) == before, step
        assert verify_repository(repo) == []
        assert find_repository_leftovers(repo) == []
    assert publish_linear(repo, linear_model).version == (1 if first else 2)


def test_other_errors_name_the_step_and_reason(tmp_path: Path, linear_model: Path) -> None:
    def broken(step: str) -> None:
        if step == "copying model.onnx":
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    with pytest.raises(RepositoryError, match=r"failed while copying model.onnx: Input/output error; nothing was"):
        publish_linear(tmp_path / "repo", linear_model, hook=broken)
    assert list((tmp_path / "repo").iterdir()) == [tmp_path / "repo" / ".kiln-publish.lock"]


def test_racing_builds_of_different_models_under_one_name_one_loses(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    narrow = make_linear_model(tmp_path / "narrow.onnx", in_features=4)
    wide = make_linear_model(tmp_path / "wide.onnx", in_features=6)
    barrier = threading.Barrier(2)
    outcomes: dict[int, object] = {}

    def race(width: int, artifact: Path) -> None:
        def meet(step: str) -> None:
            if step == "waiting for the repository lock":
                barrier.wait(timeout=10)  # both are staged before either commits

        try:
            outcomes[width] = publish_linear(repo, artifact, hook=meet, width=width).version
        except ConflictError as err:
            outcomes[width] = err

    threads = [threading.Thread(target=race, args=a) for a in ((4, narrow), (6, wide))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    winners = [w for w, o in outcomes.items() if o == 1]
    losers = [o for o in outcomes.values() if isinstance(o, ConflictError)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert "already has version(s) [1]" in str(losers[0])
    config = parse_config((repo / NAME / "config.pbtxt").read_text())
    assert list(config.input[0].dims) == [winners[0]]
    assert list_versions(repo / NAME) == [1]
    assert verify_repository(repo) == []
    assert find_repository_leftovers(repo) == []


def test_another_platform_under_the_same_name_is_refused(tmp_path: Path, linear_model: Path) -> None:
    repo = tmp_path / "repo"
    publish_linear(repo, linear_model)
    cfg = repo / NAME / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("onnxruntime_onnx", "tensorrt_plan"))
    before = tree_snapshot(repo)
    with pytest.raises(ConflictError, match="for 'tensorrt_plan'; this build is for 'onnxruntime_onnx'"):
        publish_linear(repo, linear_model)
    assert tree_snapshot(repo) == before


def test_published_files_get_normal_permissions(tmp_path: Path, linear_model: Path) -> None:
    old = os.umask(0o022)
    try:
        published = publish_linear(tmp_path / "repo", linear_model)
        write_atomic(tmp_path / "state.json", b"{}")
    finally:
        os.umask(old)
    for path in (published.path.parent / "config.pbtxt", published.path / "model.onnx", published.path / "kiln.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(published.path.stat().st_mode) == 0o755


def test_a_stage_in_flight_is_never_a_leftover(tmp_path: Path, linear_model: Path) -> None:
    repo = tmp_path / "repo"
    publish_linear(repo, linear_model)
    live = open_stage(repo / NAME)
    try:
        assert find_leftovers(repo / NAME) == []
        assert publish_linear(repo, linear_model).version == 2
        assert clean_leftovers(repo) == []
        assert live.path.is_dir() and live.owner.is_file()
    finally:
        live.close()
    assert not live.path.exists() and not live.owner.exists()


def test_stages_of_dead_publishers_are_reported_then_cleaned(
    tmp_path: Path, linear_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    publish_linear(repo, linear_model)
    dead = open_stage(repo / NAME)
    os.close(dead.fd)  # what the kernel does when its process is killed: the lock goes
    (dead.path / "model.onnx").write_bytes(b"half")
    old_kiln = repo / NAME / ".staging-0123abcd"  # an older Kiln's stage, without owner file
    old_kiln.mkdir()
    found = find_repository_leftovers(repo)
    assert sorted(f.path.name for f in found) == sorted([dead.path.name, old_kiln.name])
    assert any(f"pid {os.getpid()} on" in f.describe() for f in found)
    assert verify_repository(repo) == []  # nothing of them is visible
    assert main(["repo", "verify", "--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    assert f"NOTE {NAME}: {dead.path.name} is left over from an interrupted publish" in out
    assert "remove with --clean" in out
    assert publish_linear(repo, linear_model).version == 2  # the next publish removes them
    assert find_repository_leftovers(repo) == []
    assert sorted(p.name for p in (repo / NAME).iterdir()) == ["1", "2", "config.pbtxt"]


def test_verify_clean_removes_an_interrupted_first_publish(tmp_path: Path, linear_model: Path) -> None:
    repo = tmp_path / "repo"
    publish_linear(repo, linear_model)
    model_dir = repo / "new-model"
    model_dir.mkdir()
    (model_dir / "config.pbtxt").write_text((repo / NAME / "config.pbtxt").read_text().replace(NAME, "new-model"))
    os.close(open_stage(model_dir).fd)
    assert verify_repository(repo) == []
    assert main(["repo", "verify", "--repo", str(repo), "--clean"]) == 0
    assert not model_dir.exists()
    assert sorted(p.name for p in repo.iterdir()) == [".kiln-publish.lock", NAME]


@pytest.mark.parametrize("text", ["1", "2", "10", "123456789012345678"])
def test_version_numbers(text: str) -> None:
    assert is_version_number(text)


FULL_WIDTH_ONE = "\uff11"
ARABIC_INDIC_THREE = "\u0663"


@pytest.mark.parametrize(
    "text",
    ["", "0", "01", " 1", "1 ", FULL_WIDTH_ONE, ARABIC_INDIC_THREE, "0_1", "1_0", "+1", "-1", "1.0", "1\n", "9" * 19],
)
def test_not_version_numbers(text: str) -> None:
    assert not is_version_number(text)


def test_a_full_width_digit_directory_is_not_a_version(tmp_path: Path, linear_model: Path) -> None:
    repo = tmp_path / "repo"
    publish_linear(repo, linear_model)
    (repo / NAME / FULL_WIDTH_ONE).mkdir()
    (repo / NAME / "0_2").mkdir()
    assert list_versions(repo / NAME) == [1]
    assert publish_linear(repo, linear_model).version == 2
