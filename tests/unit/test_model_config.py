from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from builders.model_config import (
    ServingOptions,
    config_tensors,
    config_text,
    mismatches,
    parse_config,
    render_config,
)
from builders.tensors import TensorSpec
from core.errors import InvalidInputError

INPUTS = (TensorSpec("input", "float32", ("batch", 1, 8, 8)),)
OUTPUTS = (TensorSpec("logits", "float32", ("batch", 10)),)


def test_render_round_trips_through_text_format() -> None:
    config = render_config("digits-fp32-ort", "ort", INPUTS, OUTPUTS, ServingOptions(max_batch_size=16, instances=2))
    text = config_text(config)
    parsed = mc.ModelConfig()
    text_format.Parse(text, parsed)
    assert parsed == config
    assert parsed.platform == "onnxruntime_onnx"
    assert parsed.max_batch_size == 16
    assert list(parsed.input[0].dims) == [1, 8, 8]  # batch axis excluded
    assert parsed.input[0].data_type == mc.TYPE_FP32
    assert parsed.instance_group[0].count == 2
    assert parsed.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert list(parsed.dynamic_batching.preferred_batch_size) == [8, 16]
    assert parsed.version_policy.latest.num_versions == 1


def test_unbatched_model_keeps_all_dims_and_no_dynamic_batching() -> None:
    specs = (TensorSpec("x", "int64", (3, "seq")),)
    config = render_config("m", "ort", specs, specs, ServingOptions(max_batch_size=0))
    assert list(config.input[0].dims) == [3, -1]
    assert not config.HasField("dynamic_batching")
    assert config.input[0].data_type == mc.TYPE_INT64


def test_tensorrt_target_and_cc_filenames() -> None:
    plans = {"8.0": "a100.plan", "9.0": "h100.plan"}
    options = ServingOptions(max_batch_size=8, kind="KIND_GPU", cc_model_filenames=plans)
    config = render_config("m", "tensorrt", INPUTS, OUTPUTS, options)
    assert config.platform == "tensorrt_plan"
    assert config.default_model_filename == "model.plan"
    assert dict(config.cc_model_filenames) == {"8.0": "a100.plan", "9.0": "h100.plan"}
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU


@pytest.mark.parametrize(
    ("policy", "check"),
    [
        ("latest:3", lambda c: c.version_policy.latest.num_versions == 3),
        ("all", lambda c: c.version_policy.HasField("all")),
        ("specific:1,3", lambda c: list(c.version_policy.specific.versions) == [1, 3]),
    ],
)
def test_version_policies(policy: str, check) -> None:
    config = render_config("m", "ort", INPUTS, OUTPUTS, ServingOptions(max_batch_size=4, version_policy=policy))
    assert check(parse_config(config_text(config)))


@pytest.mark.parametrize("bad", ["newest", "latest:x", "specific:a"])
def test_bad_version_policy(bad: str) -> None:
    with pytest.raises(InvalidInputError, match="version policy"):
        render_config("m", "ort", INPUTS, OUTPUTS, ServingOptions(version_policy=bad))


def test_unknown_target_rejected() -> None:
    with pytest.raises(InvalidInputError, match="unknown target 'tpu'"):
        render_config("m", "tpu", INPUTS, OUTPUTS, ServingOptions())


def test_parse_error_names_file() -> None:
    with pytest.raises(InvalidInputError, match="x/config.pbtxt does not parse"):
        parse_config("name: ", "x/config.pbtxt")


def test_mismatches_detects_dims_dtype_and_names() -> None:
    config = render_config("m", "ort", INPUTS, OUTPUTS, ServingOptions(max_batch_size=4))
    assert mismatches(config, INPUTS, OUTPUTS) == []
    assert config_tensors(config)[0][0].shape == (-1, 1, 8, 8)
    other_in = (TensorSpec("input", "float16", ("batch", 1, 9, 8)),)
    other_out = (TensorSpec("probs", "float32", ("batch", 10)),)
    problems = mismatches(config, other_in, other_out)
    assert any("dtype float32, artifact float16" in p for p in problems)
    assert any("dims [-1, 1, 8, 8], artifact [-1, 1, 9, 8]" in p for p in problems)
    assert any("'logits' is in config.pbtxt but not in the artifact" in p for p in problems)
    assert any("'probs' is in the artifact but not in config.pbtxt" in p for p in problems)
