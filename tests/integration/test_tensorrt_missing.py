"""Without TensorRT, Polygraphy or a GPU, TensorRT commands fail fast with one clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.models import tree_snapshot
from runtime.machine import missing_for_tensorrt, probe_machine
from server.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def missing() -> tuple[str, ...]:
    absent = missing_for_tensorrt(probe_machine())
    if not absent:
        pytest.skip("this machine has TensorRT, Polygraphy and a GPU: the missing-TensorRT path cannot be shown here")
    return absent


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "auto"])
def test_build_tensorrt_fails_fast_with_exit_6(
    tmp_path: Path, example_model: Path, missing: tuple[str, ...], precision: str, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "keep.txt").write_text("untouched")
    before = tree_snapshot(tmp_path)
    argv = ["build", str(example_model), "--name", "digits", "--target", "tensorrt", "--precision", precision,
            "--repo", str(repo), "--shapes", "input:1x1x8x8,8x1x8x8,32x1x8x8"]  # fmt: skip
    assert main(argv) == 6
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())  # undo the console's line wrapping
    assert err.count("error:") == 1 and "Traceback" not in captured.err
    assert "pip install 'kiln-serve[tensorrt]'" in err and "NVIDIA's package index" in err
    for piece in missing:
        assert " ".join(piece.split()) in err
    assert captured.out == ""
    assert tree_snapshot(tmp_path) == before  # no calibration cache, no timing cache, no version


def test_doctor_runs_and_explains(missing: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["target"], r["precision"]): r for r in report["support"]}
    assert rows[("tensorrt", "int8")]["status"] == "unsupported"
    assert "kiln-serve[tensorrt]" in rows[("tensorrt", "int8")]["reason"]
    assert rows[("ort", "fp32")]["status"] == "supported"
    assert report["recommendation"].startswith("--target ort")
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "What Kiln can build here" in text and "recommended:" in text
