"""Gateway configuration: parsed once from YAML (or a dict) into frozen pydantic models.

Errors are precise: weights that do not add up to 100, an unknown upstream, duplicate names
(including duplicate YAML keys, which plain YAML would silently overwrite) are each reported with
the offending value and where it is. Everything else in the gateway takes these models.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import InvalidInputError, NotFoundError

WEIGHT_TOTAL = 100.0
# The GRPCInferenceService methods that change or reveal an upstream's state (repository, shared
# memory, trace and log settings). The gateway refuses them unless an upstream enables them in
# ``control_rpcs`` and the call carries the admin token (``server/gateway/control.py``).
CONTROL_METHODS: tuple[str, ...] = (
    "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
    "TraceSetting", "LogSettings",
)  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_ADDRESS = re.compile(r"^[^\s:]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{what} {value!r} must start with a letter or digit and use only [A-Za-z0-9_.-]")
    return value


class ClientTls(_Frozen):
    """TLS towards an upstream: CA to verify it, optional client cert/key for mTLS."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None  # overrides the name checked in the upstream's certificate

    @model_validator(mode="after")
    def _pair(self) -> ClientTls:
        if (self.cert is None) != (self.key is None):
            raise ValueError("client TLS needs both 'cert' and 'key' (or neither)")
        return self


class ServerTls(_Frozen):
    """TLS for the gateway's data plane (and optionally its admin port); ``client_ca`` = mTLS."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class Upstream(_Frozen):
    address: str
    tls: ClientTls | None = None
    channels: int = Field(default=1, ge=1, le=16)  # gRPC channels (HTTP/2 connections) to it
    # control methods (CONTROL_METHODS, or "all") forwarded to it for callers with the admin token
    control_rpcs: tuple[str, ...] = ()

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not _ADDRESS.match(value):
            raise ValueError(f"address {value!r} must be host:port, e.g. 127.0.0.1:8001")
        return value

    @field_validator("control_rpcs")
    @classmethod
    def _control_rpcs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "all" in value:
            return CONTROL_METHODS
        unknown = [m for m in value if m not in CONTROL_METHODS]
        if unknown:
            raise ValueError(
                f"control_rpcs {unknown} are not control methods; use 'all' or some of {list(CONTROL_METHODS)}"
            )
        return value


class Variant(_Frozen):
    """One way to serve a public model: an upstream model (and version) with a traffic weight."""

    name: str
    upstream: str
    model: str
    version: str = ""  # "" = the upstream's version policy decides
    weight: float = Field(ge=0.0, le=WEIGHT_TOTAL, allow_inf_nan=False, strict=True)  # strict: `true` is no weight

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "variant name")


class Shadow(_Frozen):
    """Copy ``percent`` of a route's requests to ``variant``; its answers are compared, never returned."""

    variant: str
    percent: float = Field(gt=0.0, le=100.0)


class Route(_Frozen):
    """A public model name's variants. The first variant is the baseline."""

    variants: tuple[Variant, ...] = Field(min_length=1)
    sticky: str | None = None  # "header:<metadata key>"
    shadow: Shadow | None = None
    # which variants a client may pin with ``kiln-variant`` (or choose by ``model_version``) without
    # the admin token: None/"weighted" = those with weight > 0 (never a shadow-only candidate); "any"
    pinning: Literal["weighted", "any"] | None = None

    @field_validator("sticky")
    @classmethod
    def _sticky(cls, value: str | None) -> str | None:
        if value is None:
            return None
        kind, _, key = value.partition(":")
        if kind != "header" or not key or key != key.lower() or key.startswith((":", "grpc-")):
            raise ValueError(f"sticky {value!r} must be 'header:<lower-case metadata key>', e.g. 'header:x-user-id'")
        return value

    @model_validator(mode="after")
    def _variants(self) -> Route:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate variant names {dupes}; each variant needs its own name")
        total = sum(v.weight for v in self.variants)
        if not math.isclose(total, WEIGHT_TOTAL, abs_tol=1e-6):
            weights = {v.name: v.weight for v in self.variants}
            raise ValueError(f"variant weights {weights} add up to {total:g}, not {WEIGHT_TOTAL:g}")
        if self.shadow is not None and self.shadow.variant not in names:
            raise ValueError(
                f"shadow variant {self.shadow.variant!r} is not one of this route's variants {names}; "
                "add it as a variant (weight 0 is fine)"
            )
        return self

    @property
    def baseline(self) -> Variant:
        return self.variants[0]

    @property
    def sticky_header(self) -> str | None:
        return self.sticky.partition(":")[2] if self.sticky else None

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise NotFoundError(f"variant {name!r} does not exist; this route has {[v.name for v in self.variants]}")


class ServerSettings(_Frozen):
    mode: Literal["aio", "threads"] = "threads"  # grpc.aio event loop, or grpc's thread-pool server
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"  # "aio" mode's loop; uvloop: ~10-15 % less CPU
    threads: int = Field(default=32, ge=2, le=1024)  # max data-plane RPCs in flight (streams included)
    max_streams: int = Field(default=16, ge=1, le=1024)  # of those, at most this many open streams
    stream_idle_timeout_s: float = Field(default=30.0, gt=0.0, allow_inf_nan=False)  # no message either way
    upstream_timeout_s: float = Field(default=60.0, gt=0.0, allow_inf_nan=False)  # unary calls without a deadline
    max_message_bytes: int = Field(default=64 * 2**20, ge=2**20, le=2**31 - 1)  # = kiln serve's
    # unary request bodies in flight together; beyond it RESOURCE_EXHAUSTED (one request always fits)
    max_in_flight_bytes: int = Field(default=256 * 2**20, ge=2**20)
    tls: ServerTls | None = None

    @model_validator(mode="after")
    def _loop_needs_aio(self) -> ServerSettings:
        if self.event_loop != "asyncio" and self.mode != "aio":
            raise ValueError(f"event_loop {self.event_loop!r} only applies to mode 'aio' (got mode {self.mode!r})")
        if self.max_streams > self.threads:
            raise ValueError(f"max_streams {self.max_streams} exceeds threads {self.threads}; streams count against it")
        return self


class AdminSettings(_Frozen):
    token_file: Path | None = None
    token_env: str | None = None
    tls: ServerTls | None = None


class ShadowSettings(_Frozen):
    max_in_flight: int = Field(default=8, ge=1, le=1024)
    workers: int = Field(default=2, ge=1, le=64)


class MetricsSettings(_Frozen):
    window_s: float = Field(default=60.0, gt=0.0)
    max_samples: int = Field(default=100_000, ge=100)  # per variant, bounds the sliding window


class ResilienceSettings(_Frozen):
    failures_to_eject: int = Field(default=1, ge=1)
    base_ejection_s: float = Field(default=1.0, gt=0.0)
    max_ejection_s: float = Field(default=30.0, gt=0.0)
    retry_on_baseline: bool = True


class GatewayConfig(_Frozen):
    upstreams: dict[str, Upstream] = Field(min_length=1)
    routes: dict[str, Route] = Field(default_factory=dict)
    unknown_models: Literal["not_found", "passthrough"] = "not_found"
    default_upstream: str | None = None
    server: ServerSettings = ServerSettings()
    admin: AdminSettings = AdminSettings()
    shadow: ShadowSettings = ShadowSettings()
    metrics: MetricsSettings = MetricsSettings()
    resilience: ResilienceSettings = ResilienceSettings()

    @field_validator("upstreams")
    @classmethod
    def _upstream_names(cls, value: dict[str, Upstream]) -> dict[str, Upstream]:
        for name in value:
            _check_name(name, "upstream name")
        return value

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        for public, route in self.routes.items():
            check_route(public, route, self.upstreams)
        if self.default_upstream is not None and self.default_upstream not in self.upstreams:
            raise ValueError(
                f"default_upstream {self.default_upstream!r} is not a configured upstream {sorted(self.upstreams)}"
            )
        if self.unknown_models == "passthrough" and self.default_upstream is None:
            raise ValueError("unknown_models: passthrough needs a default_upstream")
        return self


def check_route(public: str, route: Route, upstreams: Mapping[str, Upstream]) -> None:
    """Raise ValueError when ``route`` names an unknown upstream or has a bad public name."""
    _check_name(public, "public model name")
    for variant in route.variants:
        if variant.upstream not in upstreams:
            raise ValueError(
                f"route {public!r} variant {variant.name!r} names unknown upstream {variant.upstream!r}; "
                f"configured upstreams are {sorted(upstreams)}"
            )


def describe_validation(err: ValidationError, what: str) -> str:
    """One line per problem: 'routes.digits.variants.1.weight: <message> (got <value>)'."""
    lines = []
    problems = err.errors(include_url=False)
    failed_items = [tuple(p["loc"]) for p in problems]
    for problem in problems:
        loc = tuple(problem["loc"])
        # a list whose item failed also reports "too short" (counted without that item): noise
        if problem["type"] == "too_short" and any(len(o) > len(loc) and o[: len(loc)] == loc for o in failed_items):
            continue
        where = ".".join(str(p) for p in loc) or "(top level)"
        message = str(problem["msg"]).removeprefix("Value error, ")
        lines.append(f"  {where}: {message}")
    return f"{what} is invalid:\n" + "\n".join(lines)


def parse_config(data: Mapping[str, Any], source: str = "gateway config") -> GatewayConfig:
    """Validate a config mapping; raises InvalidInputError listing every problem."""
    try:
        return GatewayConfig.model_validate(dict(data))
    except ValidationError as err:
        raise InvalidInputError(describe_validation(err, source)) from err


def parse_route(public: str, data: Mapping[str, Any], upstreams: Mapping[str, Upstream]) -> Route:
    """Validate one route (as the admin API receives it) against the configured upstreams."""
    try:
        route = Route.model_validate(dict(data))
        check_route(public, route, upstreams)
    except ValidationError as err:
        raise InvalidInputError(describe_validation(err, f"route {public!r}")) from err
    except ValueError as err:
        raise InvalidInputError(f"route {public!r} is invalid: {err}") from err
    return route


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise InvalidInputError(
                    f"duplicate key {key!r} at line {key_node.start_mark.line + 1}; "
                    "every upstream, route and setting must be named once"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def yaml_error_text(err: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: where it is and what is wrong (no '<unicode string>')."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def load_config(path: Path) -> GatewayConfig:
    """Read and validate a gateway YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise NotFoundError(f"cannot read gateway config {str(path)!r}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise InvalidInputError(
            f"gateway config {str(path)!r} is not UTF-8 text (byte {err.start}); pass the YAML config file"
        ) from err
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise InvalidInputError(f"gateway config {str(path)!r} is not valid YAML: {yaml_error_text(err)}") from err
    if not isinstance(data, dict):
        raise InvalidInputError(f"gateway config {str(path)!r} must be a mapping, got {type(data).__name__}")
    return parse_config(data, f"gateway config {str(path)!r}")


def route_to_dict(route: Route) -> dict[str, Any]:
    """JSON-ready form of a route (the shape the admin API and the state file use)."""
    return route.model_dump(mode="json", exclude_none=True)
