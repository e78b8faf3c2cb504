"""The quickstart's serving step: in-process server, real requests, a short bench."""

from __future__ import annotations

from pathlib import Path

import pytest

from builders.pipeline import BuildRequest, build_model
from server.serving_check import check_serving

pytestmark = pytest.mark.integration


def test_check_serving_answers_and_benches(tmp_path: Path, example_model: Path, example_data: Path) -> None:
    repo = tmp_path / "repo"
    build_model(BuildRequest(model=example_model, name="digits", precision="fp32", repo=repo))
    check = check_serving(repo, "digits-fp32-ort", example_data, requests=6, bench_seconds=0.3, concurrency=(2,))
    assert check.requests == 6 and check.version == "1"
    assert check.accuracy is not None and check.accuracy >= 0.5
    point = check.bench.first
    assert point.ok > 0 and point.errors == {} and point.load == 2
