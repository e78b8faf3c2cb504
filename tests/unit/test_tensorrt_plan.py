"""Plan decisions on the CPU: profiles from --shapes, settings, config, manifest and compatibility."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from builders.model_config import ServingOptions, config_text, render_config
from builders.request import TensorRTOptions
from builders.tensorrt_plan import (
    BuiltPlan,
    build_targets,
    cc_model_filenames,
    derive_profiles,
    make_settings,
    parse_shapes,
    plan_filenames,
    plan_manifest,
    plan_tools,
    timing_cache_path,
)
from builders.tensors import TensorSpec
from core.errors import IncompatibleEngineError, InvalidInputError, MissingDependencyError
from runtime.machine import CpuInfo, GpuInfo, MachineInfo
from runtime.tensorrt.plan import ShapeProfile, check_plan_compatible, select_plan, versions_compatible

DIGITS = (TensorSpec("input", "float32", ("batch", 1, 8, 8)),)
TOKENS = (TensorSpec("ids", "int64", ("batch", "seq")), TensorSpec("mask", "int64", (-1, "seq")))

A100 = GpuInfo(0, "NVIDIA A100-SXM4-40GB", (8, 0), 40960, "550.54")
L4 = GpuInfo(1, "NVIDIA L4", (8, 9), 23034, "550.54")
T4 = GpuInfo(0, "Tesla T4", (7, 5), 15360, "550.54")


def test_parse_shapes_reads_min_opt_max_and_fixed() -> None:
    profiles = parse_shapes(["input:1x1x8x8,8x1x8x8,32x1x8x8", "other:2x3"])
    assert profiles["input"] == ShapeProfile("input", (1, 1, 8, 8), (8, 1, 8, 8), (32, 1, 8, 8))
    assert profiles["other"].min == profiles["other"].max == (2, 3)
    both = parse_shapes(["a:1x2,2x2,4x2; b:1,1,1"])
    assert set(both) == {"a", "b"}
    assert parse_shapes(["input:0:1x3,2x3,4x3"])["input:0"].max == (4, 3)
    assert profiles["input"].describe() == "input:1x1x8x8,8x1x8x8,32x1x8x8"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("input", "name:min,opt,max"),
        ("input:1x8,8x8", "gives 2 shapes"),
        ("input:1xAx8", "positive integers"),
        ("input:0x8,1x8,2x8", "zero dimension"),
        ("input:8x8,1x8,32x8", "min <= opt <= max"),
        ("input:1x8,2x8x1,4x8", "different ranks"),
    ],
)
def test_parse_shapes_rejects_bad_specs_clearly(spec: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as info:
        parse_shapes([spec])
    assert "input" in str(info.value)


def test_parse_shapes_rejects_duplicates() -> None:
    with pytest.raises(InvalidInputError, match="twice"):
        parse_shapes(["x:1,1,1", "x:2,2,2"])


def test_default_profile_from_batch_axis() -> None:
    (profile,) = derive_profiles(DIGITS, 32)
    assert profile == ShapeProfile("input", (1, 1, 8, 8), (16, 1, 8, 8), (32, 1, 8, 8))
    (single,) = derive_profiles(DIGITS, 1)
    assert single.opt == (1, 1, 8, 8)
    fixed = (TensorSpec("x", "float32", (4, 3)),)
    assert derive_profiles(fixed, 0)[0] == ShapeProfile("x", (4, 3), (4, 3), (4, 3))


def test_given_profiles_are_checked_against_the_model() -> None:
    given = parse_shapes(["input:1x1x8x8,4x1x8x8,8x1x8x8"])
    assert derive_profiles(DIGITS, 32, given)[0].max == (8, 1, 8, 8)
    with pytest.raises(InvalidInputError, match="does not have"):
        derive_profiles(DIGITS, 32, parse_shapes(["images:1x1x8x8,1x1x8x8,1x1x8x8"]))
    with pytest.raises(InvalidInputError, match="fixed at 8"):
        derive_profiles(DIGITS, 32, parse_shapes(["input:1x1x8x8,1x1x8x9,1x1x8x9"]))
    with pytest.raises(InvalidInputError, match="rank 3"):
        derive_profiles(DIGITS, 32, parse_shapes(["input:1x8x8,1x8x8,1x8x8"]))
    with pytest.raises(InvalidInputError, match="exceeds --max-batch 32"):
        derive_profiles(DIGITS, 32, parse_shapes(["input:1x1x8x8,1x1x8x8,64x1x8x8"]))


def test_dynamic_non_batch_axes_need_shapes() -> None:
    with pytest.raises(InvalidInputError) as info:
        derive_profiles(TOKENS, 8)
    text = str(info.value)
    assert "ids" in text and "[1]" in text and "--shapes ids:1x1,4x64,8x128" in text
    profiles = derive_profiles(TOKENS, 8, parse_shapes(["ids:1x1,4x64,8x128", "mask:1x1,4x64,8x128"]))
    assert [p.name for p in profiles] == ["ids", "mask"]


def test_make_settings_validates_each_value() -> None:
    profiles = derive_profiles(DIGITS, 32)
    settings = make_settings("int8", profiles, TensorRTOptions(opt_level=5, hardware_compat="ampere_plus"))
    assert settings.strongly_typed and settings.opt_level == 5
    calibrator = TensorRTOptions(int8_mode="calibrator")
    assert not make_settings("int8", profiles, calibrator, tensorrt_version="10.3.0").strongly_typed
    for kwargs, message in (
        ({"workspace_mb": 8}, "workspace-mb"),
        ({"opt_level": 6}, "opt-level"),
        ({"hardware_compat": "turing"}, "hardware-compat"),
        ({"int8_mode": "magic"}, "int8 mode"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            TensorRTOptions(**kwargs)
    with pytest.raises(InvalidInputError, match="removed INT8 calibrators"):
        make_settings("int8", profiles, calibrator, tensorrt_version="11.0.0")
    with pytest.raises(InvalidInputError, match="precision"):
        make_settings("auto", profiles, TensorRTOptions())
    with pytest.raises(InvalidInputError, match="at least one"):
        make_settings("fp16", (), TensorRTOptions())


def test_timing_cache_lives_beside_the_repository(tmp_path: Path) -> None:
    assert timing_cache_path(tmp_path / "model_repository") == tmp_path.resolve() / ".kiln-cache" / "trt-timing.cache"


def test_cc_model_filenames_for_several_gpus_render_into_config() -> None:
    targets = build_targets([A100, GpuInfo(2, "NVIDIA A100-SXM4-40GB", (8, 0)), L4])
    assert [g.name for g in targets] == [A100.name, L4.name]
    files = plan_filenames(targets)
    assert files == {"8.0": "model.plan", "8.9": "model_cc8.9.plan"}
    mapping = cc_model_filenames(files)
    serving = ServingOptions(32, kind="KIND_GPU", cc_model_filenames=mapping)
    config = render_config("digits-fp16-tensorrt", "tensorrt", DIGITS, DIGITS, serving)
    text = config_text(config)
    assert 'platform: "tensorrt_plan"' in text and "KIND_GPU" in text
    assert config.cc_model_filenames["8.9"] == "model_cc8.9.plan"
    assert config.default_model_filename == "model.plan"
    assert cc_model_filenames(plan_filenames([T4])) == {}
    assert plan_filenames([T4]) == {"7.5": "model.plan"}
    with pytest.raises(InvalidInputError, match="share one plan"):
        cc_model_filenames({"8.0": "a.plan", "8.9": "a.plan"})
    with pytest.raises(InvalidInputError, match="not like 8.0"):
        cc_model_filenames({"sm80": "model.plan"})
    with pytest.raises(MissingDependencyError, match="no compute capability"):
        build_targets([GpuInfo(0, "Mystery", None)])


def manifest_for(
    plans: list[BuiltPlan], version: str = "10.3.0", hardware_compat: str = "none", version_compat: bool = False
) -> dict[str, Any]:
    options = TensorRTOptions(hardware_compat=hardware_compat, version_compat=version_compat)
    settings = make_settings("fp16", derive_profiles(DIGITS, 32), options)
    return {
        "model": "digits-fp16-tensorrt",
        "version": 3,
        "build": {"tensorrt": plan_manifest(version, settings, plans)},
        "tools": plan_tools(version, plans),
    }


def machine(gpu: GpuInfo, trt: str | None = "10.3.0") -> MachineInfo:
    return MachineInfo(cpu=CpuInfo("cpu", "x86_64", 4), gpus=(gpu,), tensorrt_version=trt, polygraphy_version="0.49.9")


A100_PLAN = BuiltPlan("model.plan", A100.name, "8.0", 12.5, "model.layers.json")


def test_plan_manifest_records_what_compatibility_needs() -> None:
    manifest = manifest_for([A100_PLAN])
    section = manifest["build"]["tensorrt"]
    assert section["version"] == "10.3.0" and section["strongly_typed"] is True
    assert section["profiles"][0] == {"name": "input", "min": [1, 1, 8, 8], "opt": [16, 1, 8, 8], "max": [32, 1, 8, 8]}
    assert section["plans"][0]["gpu"] == A100.name and section["build_seconds"] == 12.5
    assert manifest["tools"] == {"tensorrt": "10.3.0", "gpu": A100.name, "compute_capability": "8.0"}


def test_same_machine_is_compatible() -> None:
    assert select_plan(manifest_for([A100_PLAN]), machine(A100)) == "model.plan"
    check_plan_compatible(manifest_for([A100_PLAN]), machine(A100))


def test_other_tensorrt_version_is_refused_naming_both() -> None:
    with pytest.raises(IncompatibleEngineError) as info:
        check_plan_compatible(manifest_for([A100_PLAN]), machine(A100, "10.4.0"))
    text = str(info.value)
    assert "TensorRT 10.3.0" in text and "TensorRT 10.4.0" in text and A100.name in text


def test_other_gpu_is_refused_naming_both() -> None:
    with pytest.raises(IncompatibleEngineError) as info:
        check_plan_compatible(manifest_for([A100_PLAN]), machine(L4))
    text = str(info.value)
    assert "A100" in text and "NVIDIA L4 (cc 8.9)" in text and "--hardware-compat" in text


def test_hardware_and_version_compatibility_widen_what_runs() -> None:
    ampere = manifest_for([A100_PLAN], hardware_compat="ampere_plus")
    check_plan_compatible(ampere, machine(L4))
    with pytest.raises(IncompatibleEngineError):
        check_plan_compatible(ampere, machine(T4))
    same_cc = manifest_for([A100_PLAN], hardware_compat="same_cc")
    check_plan_compatible(same_cc, machine(GpuInfo(0, "NVIDIA A100 80GB PCIe", (8, 0))))
    vc = manifest_for([A100_PLAN], version_compat=True)
    check_plan_compatible(vc, machine(A100, "10.8.0"))
    check_plan_compatible(vc, machine(A100, "11.1.0"))
    with pytest.raises(IncompatibleEngineError):
        check_plan_compatible(vc, machine(A100, "10.1.0"))
    assert versions_compatible("8.6.1", "10.0.1", True) and not versions_compatible("8.6.1", "11.0.0", True)


def test_several_plans_pick_the_one_for_this_gpu() -> None:
    plans = [
        BuiltPlan("model.plan", A100.name, "8.0", 10.0),
        BuiltPlan("model_cc8.9.plan", L4.name, "8.9", 9.0),
    ]
    assert select_plan(manifest_for(plans), machine(L4)) == "model_cc8.9.plan"
    assert select_plan(manifest_for(plans), machine(A100)) == "model.plan"


def test_missing_record_or_runtime_is_clear() -> None:
    with pytest.raises(IncompatibleEngineError, match="no TensorRT build record"):
        check_plan_compatible({"model": "m", "version": 1, "build": {}}, machine(A100))
    with pytest.raises(MissingDependencyError, match="TensorRT and a GPU"):
        check_plan_compatible(manifest_for([A100_PLAN]), MachineInfo(cpu=CpuInfo("cpu", "x86_64", 4)))
    with pytest.raises(InvalidInputError, match="GPU 3 does not exist"):
        check_plan_compatible(manifest_for([A100_PLAN]), machine(A100), device=3)
