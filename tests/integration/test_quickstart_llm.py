"""``kiln quickstart --llm`` end to end: builds, streams, and three canaries that end as designed."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_llm_quickstart_promotes_a_rebuild_and_rolls_back_slow_ttft_and_int8_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["quickstart", "--llm", "--repo", str(tmp_path / "repo"), "--out", str(tmp_path / "out")]
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ttft_p99_ratio" in out and "token_agreement" in out
    assert (tmp_path / "out" / "llm_canaries.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "repo" / "tiny-int8-ort" / "config.pbtxt").is_file()
