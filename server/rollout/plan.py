"""A rollout plan: what to roll out where, how fast, and which SLOs gate each step.

Parsed once (from YAML or CLI flags) into a frozen pydantic model; every validation error names
the offending field and value and says what to do.

Example (YAML)::

    route: digits               # the gateway's public model name
    baseline: fp32              # the variant serving today
    candidate: {name: int8, upstream: local, model: digits-int8-ort, version: "1"}
    steps: [5, 25, 50, 100]     # candidate weight (%) per step; promoted after the last passes
    interval_s: 30              # each step lasts at least this long
    min_requests: 100           # ... and is judged only on this many candidate requests
    max_wait_s: 120             # too little traffic for this long: on_insufficient
    on_insufficient: pause
    shadow: {duration_s: 30, percent: 100, min_comparisons: 100}
    sample_percent: 10          # share of baseline traffic also compared during steps
    min_comparisons: 20
    slos: {max_error_rate: 0.01, max_p99_ratio: 1.5, min_agreement: 0.98, max_p99_ms: null}
    # token streams add: max_ttft_p99_ratio, max_itl_p99_ratio, max_ttft_p99_ms, max_itl_p99_ms
    # (judged when both variants streamed in the window) and min_token_agreement (the shadow phase's
    # greedy replays: share of sampled prompts whose tokens match the baseline's exactly)
    # and min_capacity_ratio (checked at start: the candidate's recorded capacity over the
    # baseline's, read by `kiln rollout start --repo PATH` from both versions' kiln.json)
    on_failure: rollback        # or pause (traffic back to baseline, a human decides)
    ready_timeout_s: 60         # a candidate version must be ready on every upstream within this
    retire_previous: false      # after promotion, stop serving the baseline's version ...
    retain_for_s: 0             # ... once this rollback window has passed

At a 100 % step the baseline serves nothing, so the candidate's p99 is compared with the baseline
p99 measured in the step before; a last step below 100 % keeps every comparison concurrent (both
variants under the same load), which is more robust on noisy machines. Tail SLOs are judged with
the p99's confidence bounds (``server/rollout/analysis.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import InvalidInputError, NotFoundError
from server.gateway.config import yaml_error_text

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CandidateSpec(_Frozen):
    """The variant being rolled out: added to the route under ``name``."""

    name: str = Field(pattern=_NAME)
    upstream: str = Field(min_length=1)
    model: str = Field(min_length=1)
    version: str = ""

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return "" if value is None else str(value) if isinstance(value, int) else value

    @field_validator("version")
    @classmethod
    def _version_number(cls, value: str) -> str:
        if value and not (value.isascii() and value.isdigit() and not value.startswith("0")):
            raise ValueError(f"must be a version number such as 2, or empty (the upstream decides); got {value!r}")
        return value


class ShadowPhase(_Frozen):
    """Before the first step the candidate only sees copies of traffic; its answers are compared."""

    duration_s: float = Field(default=30.0, gt=0)
    percent: float = Field(default=100.0, gt=0, le=100)
    min_comparisons: int = Field(default=100, ge=1)


class Slos(_Frozen):
    """Limits a step must meet. A value exactly at its limit passes."""

    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    max_p99_ratio: float = Field(default=1.5, gt=0)
    min_agreement: float = Field(default=0.98, ge=0, le=1)
    max_p99_ms: float | None = Field(default=None, gt=0)
    # token streams (decoupled LLM models): time to first token and inter-token latency, p99
    max_ttft_p99_ratio: float | None = Field(default=None, gt=0)
    max_itl_p99_ratio: float | None = Field(default=None, gt=0)
    max_ttft_p99_ms: float | None = Field(default=None, gt=0)
    max_itl_p99_ms: float | None = Field(default=None, gt=0)
    min_token_agreement: float | None = Field(default=None, ge=0, le=1)  # greedy exact-match rate, shadow phase
    # checked once, at start, on recorded capacities (kiln bench --find-capacity --record; see capacity)
    min_capacity_ratio: float | None = Field(default=None, gt=0)


class CapacityFigures(_Frozen):
    """Recorded capacity of baseline and candidate under the same conditions (``server/rollout/capacity.py``).

    ``ratio`` is None when they do not compare (``note`` says why).
    """

    baseline: float | None = None
    candidate: float | None = None
    unit: str = ""
    ratio: float | None = None
    conditions: str = ""
    note: str = ""

    @classmethod
    def make(
        cls, baseline: float | None, candidate: float | None, unit: str, ratio: float | None, conditions: str, note: str
    ) -> CapacityFigures:
        return cls(baseline=baseline, candidate=candidate, unit=unit, ratio=ratio, conditions=conditions, note=note)


class RolloutPlan(_Frozen):
    route: str = Field(min_length=1)
    baseline: str = Field(pattern=_NAME)
    candidate: CandidateSpec
    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
    interval_s: float = Field(default=30.0, gt=0)
    min_requests: int = Field(default=100, ge=1)
    max_wait_s: float | None = Field(default=None, gt=0)
    on_insufficient: Literal["pause", "rollback", "abort"] = "pause"
    shadow: ShadowPhase | None = ShadowPhase()
    sample_percent: float = Field(default=10.0, ge=0, le=100)
    min_comparisons: int = Field(default=20, ge=1)
    slos: Slos = Slos()
    on_failure: Literal["rollback", "pause"] = "rollback"
    ready_timeout_s: float = Field(default=60.0, gt=0)  # candidate version ready on every upstream within this
    retire_previous: bool = False  # after promotion, stop upstreams serving the baseline's version
    capacity: CapacityFigures | None = None  # filled by `kiln rollout start --repo` from both kiln.json
    retain_for_s: float = Field(default=0.0, ge=0)  # ... once this rollback window has passed

    @field_validator("steps")
    @classmethod
    def _increasing_steps(cls, steps: tuple[float, ...]) -> tuple[float, ...]:
        if not steps:
            raise ValueError("needs at least one step, e.g. [5, 25, 50, 100]")
        for weight in steps:
            if not 0 < weight <= 100:
                raise ValueError(f"step weight {weight:g} is outside (0, 100]; weights are percentages")
        for earlier, later in itertools.pairwise(steps):
            if later <= earlier:
                raise ValueError(f"steps must increase strictly; {later:g} follows {earlier:g}")
        return steps

    @model_validator(mode="after")
    def _distinct_names(self) -> RolloutPlan:
        if self.candidate.name == self.baseline:
            raise ValueError(
                f"candidate name {self.candidate.name!r} equals the baseline variant; give the candidate "
                "its own variant name"
            )
        if self.retain_for_s > 0 and not self.retire_previous:
            raise ValueError(
                f"retain_for_s {self.retain_for_s:g} only applies with retire_previous: true (--retire-previous)"
            )
        if self.max_wait_s is not None and self.max_wait_s < self.interval_s:
            raise ValueError(
                f"max_wait_s {self.max_wait_s:g} is shorter than interval_s {self.interval_s:g}; a step "
                "could time out before it may be judged"
            )
        return self

    @property
    def wait_limit_s(self) -> float:
        """How long a phase may wait for enough traffic before ``on_insufficient`` applies."""
        return self.max_wait_s if self.max_wait_s is not None else 4.0 * self.interval_s

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _describe(err: ValidationError, source: str) -> str:
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(plan)"
        value = item.get("input")
        shown = "" if isinstance(value, Mapping) else f" (got {value!r})"
        parts.append(f"{where}: {item['msg']}{shown}")
    return f"invalid rollout plan {source}: " + "; ".join(parts) + "; fix the plan and retry"


def plan_from_mapping(data: Any, source: str = "(mapping)") -> RolloutPlan:
    """Validate ``data`` (a dict, e.g. parsed YAML or JSON) into a plan."""
    if not isinstance(data, Mapping):
        raise InvalidInputError(
            f"rollout plan {source} must be a mapping of fields, got {type(data).__name__}; "
            "see 'kiln rollout start --help'"
        )
    try:
        return RolloutPlan.model_validate(dict(data))
    except ValidationError as err:
        raise InvalidInputError(_describe(err, source)) from err


def load_plan(path: Path) -> RolloutPlan:
    """Read a YAML (or JSON) plan file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise NotFoundError(f"rollout plan file {str(path)!r} does not exist; check the path") from err
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"cannot read rollout plan {str(path)!r} as YAML text: {err}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InvalidInputError(
            f"rollout plan {str(path)!r} is not valid YAML ({yaml_error_text(err)}); fix its syntax"
        ) from err
    return plan_from_mapping(data, repr(str(path)))


def parse_steps(text: str) -> tuple[float, ...]:
    """``"5,25,50,100"`` -> (5.0, 25.0, 50.0, 100.0)."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise InvalidInputError(f"steps {text!r} must be comma-separated percentages, e.g. 5,25,50,100") from err


def parse_candidate(text: str) -> dict[str, str]:
    """``"int8=local/digits-int8-ort:1"`` -> name, upstream, model, version."""
    name, sep, target = text.partition("=")
    upstream, sep2, model_version = target.partition("/")
    model, _, version = model_version.partition(":")
    if not (sep and sep2 and name and upstream and model):
        raise InvalidInputError(
            f"candidate {text!r} must look like NAME=UPSTREAM/MODEL[:VERSION], e.g. int8=local/digits-int8-ort:1"
        )
    return {"name": name, "upstream": upstream, "model": model, "version": version}
