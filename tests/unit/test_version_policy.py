"""Version policy: --keep-versions parsing, what a build publishes with, and ``kiln repo policy``."""

from __future__ import annotations

from pathlib import Path

import pytest

from builders.model_config import ServingOptions, parse_config, parse_keep_versions, policy_of, served_by_policy
from builders.version_policy import change_policy, decide_policy, read_policy
from core.errors import ConflictError, InvalidInputError, NotFoundError
from harness.serve import PAIR_SPECS, make_pair_model, write_model


@pytest.mark.parametrize(
    ("text", "policy"),
    [("1", "latest:1"), ("2", "latest:2"), (" 3 ", "latest:3"), ("all", "all"), ("specific:3,1,3", "specific:1,3")],
)
def test_keep_versions_become_policies(text: str, policy: str) -> None:
    assert parse_keep_versions(text) == policy


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("0", "would serve no version"),
        ("-2", "would serve no version"),
        ("latest", "not understood"),
        ("specific:", "version numbers >= 1"),
        ("specific:0,2", "version numbers >= 1"),
        ("two", "'two'"),
    ],
)
def test_bad_keep_versions_are_refused(text: str, words: str) -> None:
    with pytest.raises(InvalidInputError, match=words):
        parse_keep_versions(text)


@pytest.mark.parametrize(
    ("policy", "served"), [("latest:1", [5]), ("latest:2", [3, 5]), ("all", [1, 3, 5]), ("specific:1,4", [1])]
)
def test_served_by_policy(policy: str, served: list[int]) -> None:
    assert served_by_policy(policy, [5, 1, 3]) == served


def _model(tmp_path: Path, policy: str, versions: tuple[int, ...] = (1,)) -> Path:
    artifact = make_pair_model(tmp_path / "pair.onnx")
    repo = tmp_path / "repo"
    write_model(
        repo, "m", {v: artifact for v in versions}, *PAIR_SPECS, ServingOptions(max_batch_size=4, version_policy=policy)
    )
    return repo


def test_a_new_model_keeps_two_versions_by_default(tmp_path: Path) -> None:
    decision = decide_policy(tmp_path / "repo", "m", None)
    assert (decision.policy, decision.replaces, decision.warnings) == ("latest:2", None, ())
    assert decide_policy(tmp_path / "repo", "m", "all").policy == "all"


def test_a_build_keeps_an_existing_policy_and_warns_when_it_drops_the_serving_version(tmp_path: Path) -> None:
    repo = _model(tmp_path, "latest:1", (1, 2))
    decision = decide_policy(repo, "m", None)
    assert (decision.policy, decision.replaces) == ("latest:1", 2)
    assert "version 2 stops being served" in decision.warnings[0]
    assert "kiln repo policy m --keep-versions 2" in decision.warnings[0]
    with pytest.raises(ConflictError, match=r"version policy latest:1; a build does not change it.*kiln repo policy"):
        decide_policy(repo, "m", "3")
    assert decide_policy(repo, "m", "1").warnings  # agreeing with the policy is fine


def test_a_specific_policy_that_leaves_the_new_version_out_is_warned_about(tmp_path: Path) -> None:
    repo = _model(tmp_path, "specific:1", (1,))
    assert "will not serve the version this build publishes (2)" in decide_policy(repo, "m", None).warnings[0]


def test_repo_policy_rewrites_only_the_policy(tmp_path: Path) -> None:
    repo = _model(tmp_path, "latest:1", (1, 2, 3))
    before = parse_config((repo / "m" / "config.pbtxt").read_text())
    change = change_policy(repo, "m", "2")
    assert (change.old, change.new, change.served) == ("latest:1", "latest:2", (2, 3))
    after = parse_config((repo / "m" / "config.pbtxt").read_text())
    assert policy_of(after) == "latest:2"
    after.ClearField("version_policy")
    before.ClearField("version_policy")
    assert after == before
    assert read_policy(repo, "m").served == (2, 3)
    assert list((repo / "m").glob(".*")) == []  # the atomic writer left no temporary file


def test_repo_policy_refuses_bad_input_and_changes_nothing(tmp_path: Path) -> None:
    repo = _model(tmp_path, "latest:1", (1, 2))
    text = (repo / "m" / "config.pbtxt").read_text()
    with pytest.raises(NotFoundError, match=r"no versions \[4\]"):
        change_policy(repo, "m", "specific:2,4")
    with pytest.raises(InvalidInputError, match="would serve no version"):
        change_policy(repo, "m", "0")
    with pytest.raises(NotFoundError, match="no config.pbtxt"):
        change_policy(repo, "other", "2")
    assert (repo / "m" / "config.pbtxt").read_text() == text
