"""Real faults while publishing: a publisher SIGKILLed at every step, and a real full disk (a private
tmpfs in a user and mount namespace, where the machine allows one) at every write."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from builders.model_config import parse_config
from builders.repository import find_repository_leftovers, list_versions, verify_repository
from harness.models import tree_snapshot
from harness.publish_faults import NAME, publish_linear, record_steps
from server.cli import main

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _published(repo: Path) -> dict[str, bytes]:
    """The published versions' files (what must never change)."""
    return {k: v for k, v in tree_snapshot(repo).items() if k.split("/")[1:2] in (["1"], ["2"])}


@pytest.mark.slow
def test_sigkill_at_every_publish_step_never_corrupts(
    tmp_path: Path, linear_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    steps = record_steps(tmp_path / "probe", linear_model)
    repo = tmp_path / "repo"
    publish_linear(repo, linear_model)
    kept = _published(repo)
    config = (repo / NAME / "config.pbtxt").read_bytes()
    for index, step in enumerate(steps, start=1):
        proc = subprocess.run(
            [sys.executable, "-m", "harness.publish_faults", "kill", str(repo), str(linear_model), str(index)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == -signal.SIGKILL, (step, proc.stderr)
        assert verify_repository(repo) == [], step
        assert main(["repo", "verify", "--repo", str(repo)]) == 0, step
        assert _published(repo) == kept, step
        assert (repo / NAME / "config.pbtxt").read_bytes() == config, step
        assert list_versions(repo / NAME) == [1], step  # killed before the rename: nothing new is visible
        leftovers = find_repository_leftovers(repo)
        if index > steps.index("creating the stage directory") + 1:
            assert [leftover.model for leftover in leftovers] == [NAME], step
            assert "which no longer runs" in leftovers[0].describe()
    assert "is left over from an interrupted publish" in capsys.readouterr().out
    assert publish_linear(repo, linear_model).version == 2  # and it cleans every leftover
    assert find_repository_leftovers(repo) == []
    assert verify_repository(repo) == []


def test_sigkill_during_the_first_publish_of_a_model(tmp_path: Path, linear_model: Path) -> None:
    steps = record_steps(tmp_path / "probe", linear_model)
    repo = tmp_path / "repo"
    index = steps.index("renaming the stage to version 1") + 1  # config.pbtxt is written, the version is not
    proc = subprocess.run(
        [sys.executable, "-m", "harness.publish_faults", "kill", str(repo), str(linear_model), str(index)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list_versions(repo / NAME) == []
    assert verify_repository(repo) == []
    assert len(find_repository_leftovers(repo)) == 1
    assert publish_linear(repo, linear_model).version == 1
    assert parse_config((repo / NAME / "config.pbtxt").read_text()).name == NAME
    assert verify_repository(repo) == [] and find_repository_leftovers(repo) == []


def test_sigkill_after_the_config_write_keeps_existing_versions_serving(tmp_path: Path, linear_model: Path) -> None:
    steps = record_steps(tmp_path / "probe", linear_model)
    repo = tmp_path / "repo"
    publish_linear(repo, linear_model)
    kept = _published(repo)
    index = steps.index("renaming the stage to version 1") + 1  # recorded on a fresh repository
    proc = subprocess.run(
        [sys.executable, "-m", "harness.publish_faults", "kill", str(repo), str(linear_model), str(index), "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert parse_config((repo / NAME / "config.pbtxt").read_text()).max_batch_size == 4  # the new build's
    assert list_versions(repo / NAME) == [1] and _published(repo) == kept
    assert verify_repository(repo) == []  # same platform and inputs/outputs: version 1 still verifies


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=8k tmpfs /mnt"],
        capture_output=True, timeout=30,
    )  # fmt: skip
    return probe.returncode == 0


def test_real_full_disk_at_every_write(tmp_path: Path) -> None:
    if not _can_mount_tmpfs():
        pytest.skip("this machine allows no private tmpfs (user namespaces off); the injected ENOSPC test covers it")
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-m", "harness.publish_faults",
         "diskfull", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    attempts = [json.loads(line) for line in proc.stdout.splitlines()]
    cli = attempts.pop()
    assert cli["kind"] == "cli" and cli["exit"] == 4, cli  # RepositoryError's exit code, one line, no traceback
    assert cli["stderr"].startswith("error: publishing 'digits-fp32-ort' into"), cli
    assert "no space left on the device; nothing was published" in cli["stderr"], cli
    assert "Traceback" not in cli["stderr"] and cli["stderr"].count("\n") == 1, cli
    assert cli["unchanged"] is True and cli["verify"] == [], cli
    for kind in ("size", "nr_inodes"):
        tried = [a for a in attempts if a["kind"] == kind]
        failed, done = tried[:-1], tried[-1]
        assert "version" in done, tried  # with enough room the publish succeeds
        assert len(failed) >= 4, tried
        for attempt in failed:
            assert attempt["error"].startswith("RepositoryError: publishing 'lin-fp32-ort' into"), attempt
            assert "no space left on the device; nothing was published" in attempt["error"], attempt
            assert attempt["unchanged"] is True, attempt
        for attempt in tried:
            assert attempt["verify"] == [] and attempt["leftovers"] == [], attempt
        hit = {a["error"].split("failed while ")[1].split(":")[0] for a in failed}
        assert {"copying model.onnx", "writing kiln.json", "writing config.pbtxt"} <= hit, hit
