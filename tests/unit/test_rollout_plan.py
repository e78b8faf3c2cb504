"""Rollout plan parsing and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import InvalidInputError, NotFoundError
from server.rollout.plan import load_plan, parse_candidate, parse_steps, plan_from_mapping

BASE = {
    "route": "digits",
    "baseline": "fp32",
    "candidate": {"name": "int8", "upstream": "local", "model": "digits-int8-ort", "version": 1},
}


def test_defaults_and_version_as_text() -> None:
    plan = plan_from_mapping(BASE)
    assert plan.steps == (5.0, 25.0, 50.0, 100.0)
    assert plan.candidate.version == "1"
    assert plan.on_failure == "rollback"
    assert plan.wait_limit_s == pytest.approx(4 * plan.interval_s)


def test_yaml_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(
        "route: digits\nbaseline: fp32\ncandidate: {name: int8, upstream: local, model: m}\n"
        "steps: [10, 100]\ninterval_s: 0.5\nmin_requests: 5\nshadow: null\n"
        "slos: {max_error_rate: 0.05, max_p99_ms: 20}\non_failure: pause\n"
    )
    plan = load_plan(path)
    assert plan.steps == (10.0, 100.0)
    assert plan.shadow is None
    assert plan.slos.max_p99_ms == 20
    assert plan.on_failure == "pause"
    assert plan_from_mapping(plan.to_dict()) == plan


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"steps": [50, 25]}, "steps must increase strictly; 25 follows 50"),
        ({"steps": [0, 100]}, "step weight 0 is outside (0, 100]"),
        ({"steps": [5, 150]}, "step weight 150"),
        ({"steps": []}, "at least one step"),
        ({"on_failure": "explode"}, "on_failure"),
        ({"slos": {"max_error_rate": 2}}, "slos.max_error_rate"),
        ({"min_requests": 0}, "min_requests"),
        ({"baseline": "int8"}, "equals the baseline"),
        ({"interval_s": 10, "max_wait_s": 5}, "max_wait_s 5 is shorter than interval_s 10"),
        ({"surprise": 1}, "surprise"),
        ({"candidate": {"name": "bad name", "upstream": "u", "model": "m"}}, "candidate.name"),
    ],
)
def test_precise_errors(change: dict, needle: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        plan_from_mapping({**BASE, **change}, "plan.yaml")
    assert needle in str(info.value)
    assert "plan.yaml" in str(info.value)


def test_not_a_mapping_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="must be a mapping"):
        plan_from_mapping([1, 2])
    with pytest.raises(NotFoundError, match="does not exist"):
        load_plan(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("route: [unclosed\n")
    with pytest.raises(InvalidInputError, match="not valid YAML"):
        load_plan(bad)


def test_cli_helpers() -> None:
    assert parse_steps("5, 25,100") == (5.0, 25.0, 100.0)
    assert parse_candidate("int8=local/digits-int8-ort:2") == {
        "name": "int8",
        "upstream": "local",
        "model": "digits-int8-ort",
        "version": "2",
    }
    assert parse_candidate("c=u/m")["version"] == ""
    with pytest.raises(InvalidInputError, match="NAME=UPSTREAM/MODEL"):
        parse_candidate("int8")
    with pytest.raises(InvalidInputError, match="comma-separated"):
        parse_steps("5,x")


def test_cli_flags_build_and_override_a_plan(tmp_path: Path) -> None:
    from server.cli import build_parser
    from server.cli.rollout_cmd import plan_from_args

    path = tmp_path / "plan.yaml"
    path.write_text("route: digits\nbaseline: fp32\ncandidate: {name: int8, upstream: local, model: m}\nshadow: null\n")
    args = build_parser().parse_args(
        [
            "rollout",
            "start",
            "--plan",
            str(path),
            "--steps",
            "10,100",
            "--max-p99-ms",
            "25",
            "--shadow-duration",
            "3",
            "--on-failure",
            "pause",
        ]
    )
    data = plan_from_args(args)
    assert data["steps"] == [10.0, 100.0] and data["slos"]["max_p99_ms"] == 25.0
    assert data["shadow"]["duration_s"] == 3.0 and data["on_failure"] == "pause"
    assert data["slos"]["max_error_rate"] == 0.01  # the plan's default stays
    flags = build_parser().parse_args(
        ["rollout", "start", "--route", "r", "--baseline", "a", "--candidate", "b=u/m:3", "--no-shadow"]
    )
    built = plan_from_args(flags)
    assert built["candidate"]["version"] == "3" and built["shadow"] is None
    with pytest.raises(InvalidInputError, match="needs --plan FILE or --route"):
        plan_from_args(build_parser().parse_args(["rollout", "start", "--steps", "5,100"]))
