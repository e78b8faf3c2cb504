"""Triton ``config.pbtxt``: built as a ModelConfig protobuf, written with text_format.

Never string-pasted: ``render_config`` fills ``tritonclient.grpc.model_config_pb2.ModelConfig``
and ``config_text`` serializes it, ``parse_config`` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from builders.tensors import TensorSpec, triton_to_numpy
from core.errors import InvalidInputError

PLATFORMS = {"ort": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
ARTIFACTS = {"ort": "model.onnx", "tensorrt": "model.plan"}


@dataclass(frozen=True)
class ServingOptions:
    """How Triton (or ``kiln serve``) should run a model."""

    max_batch_size: int = 0
    instances: int = 1
    kind: str = "KIND_CPU"  # or KIND_GPU
    dynamic_batching: bool = True
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 500
    version_policy: str = "latest:1"  # "latest:N", "all", or "specific:1,3"
    cc_model_filenames: dict[str, str] = field(default_factory=dict)


def render_config(
    name: str,
    target: str,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    options: ServingOptions,
) -> mc.ModelConfig:
    """The ModelConfig for a model; dims exclude the batch axis when max_batch_size > 0."""
    if target not in PLATFORMS:
        raise InvalidInputError(f"unknown target {target!r}; choose one of {sorted(PLATFORMS)}")
    if options.instances < 1:
        raise InvalidInputError(f"--instances must be >= 1, got {options.instances}")
    config = mc.ModelConfig(name=name, platform=PLATFORMS[target], max_batch_size=options.max_batch_size)
    config.default_model_filename = ARTIFACTS[target]
    batched = options.max_batch_size > 0
    add_tensors(config, inputs, outputs)
    if batched and options.dynamic_batching:
        preferred = options.preferred_batch_sizes or _default_preferred(options.max_batch_size)
        config.dynamic_batching.preferred_batch_size.extend(preferred)
        config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    group = config.instance_group.add()
    group.count = options.instances
    group.kind = mc.ModelInstanceGroup.Kind.Value(options.kind)
    _apply_version_policy(config, options.version_policy)
    for cc, filename in sorted(options.cc_model_filenames.items()):
        config.cc_model_filenames[cc] = filename
    return config


def add_tensors(
    config: mc.ModelConfig, inputs: tuple[TensorSpec, ...] = (), outputs: tuple[TensorSpec, ...] = ()
) -> None:
    """Append input/output sections; dims exclude the batch axis when ``config.max_batch_size`` > 0."""
    batched = config.max_batch_size > 0
    for spec in inputs:
        config.input.append(mc.ModelInput(name=spec.name, data_type=_dtype(spec), dims=_dims(spec, batched)))
    for spec in outputs:
        config.output.append(mc.ModelOutput(name=spec.name, data_type=_dtype(spec), dims=_dims(spec, batched)))


def _default_preferred(max_batch: int) -> list[int]:
    sizes = [s for s in (4, 8, 16, 32, 64) if s <= max_batch]
    return sizes[-2:] if sizes else [max_batch]


def _dtype(spec: TensorSpec) -> int:
    try:
        return int(mc.DataType.Value(spec.triton_dtype))
    except ValueError as err:
        raise InvalidInputError(f"tensor {spec.name!r}: {err}") from err


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    dims = list(spec.numeric_shape)
    if batched:
        dims = dims[1:]
    return dims


def _apply_version_policy(config: mc.ModelConfig, policy: str) -> None:
    kind, _, arg = policy.partition(":")
    try:
        if kind == "latest":
            config.version_policy.latest.num_versions = int(arg or "1")
        elif kind == "all":
            config.version_policy.all.SetInParent()
        elif kind == "specific":
            config.version_policy.specific.versions.extend(int(v) for v in arg.split(","))
        else:
            raise ValueError(kind)
    except ValueError as err:
        raise InvalidInputError(
            f"version policy {policy!r} is not understood; use 'latest:N', 'all' or 'specific:1,3'"
        ) from err


DEFAULT_KEEP_VERSIONS = "2"  # a new version is published beside the one serving, so a canary can compare them


def parse_keep_versions(text: str) -> str:
    """``--keep-versions N|all|specific:1,3`` as a version policy: ``latest:N``, ``all`` or ``specific:1,3``."""
    value = text.strip()
    if value == "all":
        return "all"
    if value.startswith("specific:"):
        parts = [p.strip() for p in value.removeprefix("specific:").split(",")]
        if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise InvalidInputError(
                f"--keep-versions {text!r}: 'specific:' needs version numbers >= 1, e.g. specific:1,2"
            )
        return "specific:" + ",".join(str(v) for v in sorted({int(p) for p in parts}))
    if value.isdigit() and int(value) >= 1:
        return f"latest:{int(value)}"
    if value.lstrip("-").isdigit():
        raise InvalidInputError(
            f"--keep-versions {text} would serve no version; use 1 (only the newest), 2 (the newest and the one "
            "before, the default, so a canary can compare them) or more, 'all', or 'specific:1,2'"
        )
    raise InvalidInputError(
        f"--keep-versions {text!r} is not understood; use a number of latest versions (e.g. 2), 'all', or "
        "'specific:1,2'"
    )


def policy_of(config: mc.ModelConfig) -> str:
    """A config's version policy in ``--keep-versions`` words (Triton's default: ``latest:1``)."""
    kind = config.version_policy.WhichOneof("policy_choice")
    if kind == "all":
        return "all"
    if kind == "specific":
        return "specific:" + ",".join(str(v) for v in sorted(config.version_policy.specific.versions))
    if kind == "latest":
        return f"latest:{max(1, int(config.version_policy.latest.num_versions))}"
    return "latest:1"


def served_by_policy(policy: str, available: list[int]) -> list[int]:
    """Which of ``available`` versions a policy serves (those it names that exist, for ``specific``)."""
    kind, _, arg = policy.partition(":")
    ordered = sorted(available)
    if kind == "all":
        return ordered
    if kind == "specific":
        return [v for v in ordered if v in {int(x) for x in arg.split(",")}]
    return ordered[-max(1, int(arg or "1")) :]


def set_version_policy(config: mc.ModelConfig, policy: str) -> mc.ModelConfig:
    """A copy of ``config`` with ``policy`` (``latest:N``, ``all``, ``specific:1,3``)."""
    updated = mc.ModelConfig()
    updated.CopyFrom(config)
    updated.ClearField("version_policy")
    _apply_version_policy(updated, policy)
    return updated


def config_text(config: mc.ModelConfig) -> str:
    """The config.pbtxt text of a ModelConfig."""
    return text_format.MessageToString(config)


def parse_config(text: str, source: str = "config.pbtxt") -> mc.ModelConfig:
    """Parse config.pbtxt text, raising InvalidInputError that names the file on failure."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as err:
        raise InvalidInputError(f"{source} does not parse as a Triton ModelConfig: {err}") from err
    return config


def config_tensors(config: mc.ModelConfig) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of a config as TensorSpecs (batch axis restored as -1 when batched)."""
    batched = config.max_batch_size > 0

    def spec(t: mc.ModelInput | mc.ModelOutput) -> TensorSpec:
        dims = tuple(int(d) for d in t.dims)
        if batched:
            dims = (-1, *dims)
        return TensorSpec(t.name, triton_to_numpy(mc.DataType.Name(t.data_type)), dims)

    return tuple(spec(t) for t in config.input), tuple(spec(t) for t in config.output)


def mismatches(config: mc.ModelConfig, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> list[str]:
    """Human-readable differences between a config and an artifact's actual I/O."""
    problems: list[str] = []
    cfg_in, cfg_out = config_tensors(config)
    for kind, declared, actual in (("input", cfg_in, inputs), ("output", cfg_out, outputs)):
        actual_by_name = {s.name: s for s in actual}
        declared_names = {s.name for s in declared}
        for spec in declared:
            real = actual_by_name.get(spec.name)
            if real is None:
                problems.append(f"{kind} {spec.name!r} is in config.pbtxt but not in the artifact")
                continue
            if real.dtype != spec.dtype:
                problems.append(f"{kind} {spec.name!r}: config dtype {spec.dtype}, artifact {real.dtype}")
            if not _shapes_compatible(spec.numeric_shape, real.numeric_shape):
                problems.append(
                    f"{kind} {spec.name!r}: config dims {list(spec.numeric_shape)}, artifact {list(real.numeric_shape)}"
                )
        for name in actual_by_name:
            if name not in declared_names:
                problems.append(f"{kind} {name!r} is in the artifact but not in config.pbtxt")
    return problems


def _shapes_compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    if len(a) != len(b):
        return False
    return all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))


def complete_io(
    config: mc.ModelConfig, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]
) -> mc.ModelConfig:
    """Fill missing input/output sections from the artifact, as Triton's auto-complete does.

    Sections the config declares are kept as written; returns a new ModelConfig.
    """
    completed = mc.ModelConfig()
    completed.CopyFrom(config)
    add_tensors(completed, () if completed.input else inputs, () if completed.output else outputs)
    return completed
