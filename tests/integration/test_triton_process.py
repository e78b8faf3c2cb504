"""start_triton's failure paths with stand-in binaries (no Triton needed): early exit, port clash, stop."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from core.errors import InvalidInputError, UnavailableError
from harness.triton.cli import TritonInstall, start_triton
from harness.triton.process import _stop

pytestmark = pytest.mark.integration


def install_with_binary(root: Path, script: str) -> TritonInstall:
    binary = root / "tritonserver"
    binary.write_text("#!/bin/sh\n" + script + "\n")
    binary.chmod(0o755)
    return TritonInstall(
        venv=root / "venv",
        tritonserver=binary,
        backends_dir=root / "backends",
        libs_dir=root / "libs",
        python_libdir=root / "pylib",
        cache_dir=root / "caches",
        versions={},
    )


def repo_with_model(root: Path) -> Path:
    (root / "repo" / "m").mkdir(parents=True)
    (root / "repo" / "m" / "config.pbtxt").write_text('name: "m"\n')
    return root / "repo"


def test_an_empty_repository_is_refused_before_starting(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    install = install_with_binary(tmp_path, "exit 0")
    with pytest.raises(InvalidInputError, match="holds no model"), start_triton(install, tmp_path / "repo"):
        pass


def test_an_early_exit_reports_the_log_tail(tmp_path: Path) -> None:
    install = install_with_binary(tmp_path, 'echo "error: creating server: model m failed"; exit 1')
    with (
        pytest.raises(UnavailableError, match="model m failed") as caught,
        start_triton(install, repo_with_model(tmp_path), log_path=tmp_path / "t.log"),
    ):
        pass
    assert "exited before it was ready" in str(caught.value)


def test_a_port_clash_is_retried_then_reported(tmp_path: Path) -> None:
    counter = tmp_path / "starts"
    script = f'echo x >> {counter}; echo "failed to start GRPC service: Address already in use"; exit 1'
    install = install_with_binary(tmp_path, script)
    with pytest.raises(UnavailableError, match="could not bind"), start_triton(install, repo_with_model(tmp_path)):
        pass
    assert len(counter.read_text().splitlines()) == 3


def test_not_ready_in_time_stops_the_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    install = install_with_binary(tmp_path, f"echo $$ > {pid_file}; exec sleep 30")
    with (
        pytest.raises(UnavailableError, match="not ready within"),
        start_triton(install, repo_with_model(tmp_path), ready_timeout_s=1.0),
    ):
        pass
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    process = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 30 & wait"], start_new_session=True)
    _stop(process, timeout_s=0.5)
    assert process.returncode is not None and process.returncode < 0
