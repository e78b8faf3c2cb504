"""The TensorRT build branch end to end on the CPU, with the GPU (and only the GPU) faked.

The fake engine builder "builds" a plan by copying the prepared ONNX (FP16 or Q/DQ) and the fake
runner runs it in ONNX Runtime, so profiles, calibration, Q/DQ placement, validation, the gate,
kiln.json, config.pbtxt with cc_model_filenames and the runner's compatibility refusal are real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from builders.inspection import describe_model, load_model, max_batch_size
from builders.model_config import parse_config
from builders.request import BuildRequest, Int8Options, TensorRTOptions
from builders.tensorrt_build import build_tensorrt, candidate_precisions
from core.errors import AccuracyGateError, IncompatibleEngineError, KilnError, MissingDependencyError
from harness.models import tree_snapshot
from runtime.machine import CpuInfo, GpuInfo, MachineInfo
from runtime.tensorrt.engine import EngineBuild
from runtime.tensorrt.plan import PlanSettings
from runtime.tensorrt.runner import TensorRTRunner

pytestmark = pytest.mark.integration

A100 = GpuInfo(0, "NVIDIA A100-SXM4-40GB", (8, 0), 40960, "550.54")
L4 = GpuInfo(1, "NVIDIA L4", (8, 9), 23034, "550.54")


def machine(*gpus: GpuInfo, trt: str = "10.3.0") -> MachineInfo:
    return MachineInfo(
        cpu=CpuInfo("cpu", "x86_64", 2, frozenset({"avx2"})),
        onnxruntime_version=ort.__version__,
        gpus=gpus,
        tensorrt_version=trt,
        polygraphy_version="0.49.9",
    )


class FakeGpu:
    """Records what TensorRT would have been asked to build; plans are the ONNX they came from."""

    def __init__(self) -> None:
        self.builds: list[dict[str, Any]] = []

    def build_engine(
        self,
        onnx_path: Path,
        settings: PlanSettings,
        out_dir: Path,
        *,
        plan_name: str,
        device: int,
        calibration_cache: bytes | None,
    ) -> EngineBuild:
        plan = out_dir / plan_name
        shutil.copyfile(onnx_path, plan)
        layers = out_dir / (Path(plan_name).stem + ".layers.json")
        layers.write_text(json.dumps({"Layers": [], "device": device}))
        self.builds.append({"settings": settings, "device": device, "plan": plan_name, "cache": calibration_cache})
        return EngineBuild(plan, layers, 0.5, "10.3.0")

    def runner(self, plan: Path) -> Any:
        session = ort.InferenceSession(str(plan), providers=["CPUExecutionProvider"])

        class OrtAsRunner:
            output_names = tuple(o.name for o in session.get_outputs())

            def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                return dict(zip(self.output_names, session.run(None, inputs), strict=True))

            def close(self) -> None:
                return None

        return OrtAsRunner()


TRT_FIELDS = set(TensorRTOptions.__dataclass_fields__)


def request(example: Path, repo: Path, precision: str, **options: Any) -> BuildRequest:
    """A TensorRT build request; each keyword goes to the options class that has the field."""
    trt = {k: v for k, v in options.items() if k in TRT_FIELDS}
    int8 = {k: Path(v) if k in ("calib", "eval") else v for k, v in options.items() if k not in TRT_FIELDS}
    return BuildRequest(
        example, "digits", precision, "tensorrt", repo, max_batch=16,
        int8=Int8Options(**int8), tensorrt=TensorRTOptions(**trt),
    )  # fmt: skip


def run_build(req: BuildRequest, fake: FakeGpu, where: MachineInfo) -> Any:
    model = load_model(req.model)
    info = describe_model(model, req.model)
    batch = max_batch_size(info, req.max_batch)
    return build_tensorrt(req, model, info, batch, where, runner_factory=fake.runner, engine_builder=fake.build_engine)


def test_fp16_for_two_gpu_kinds_publishes_plans_config_and_manifest(tmp_path: Path, example_model: Path) -> None:
    fake = FakeGpu()
    repo = tmp_path / "repo"
    shapes = ("input:1x1x8x8,4x1x8x8,16x1x8x8",)
    result = run_build(request(example_model, repo, "fp16", shapes=shapes, opt_level=4), fake, machine(A100, L4))
    version = repo / "digits-fp16-tensorrt" / "1"
    assert sorted(p.name for p in version.iterdir()) == [
        "kiln.json", "model.layers.json", "model.plan", "model_cc8.9.layers.json", "model_cc8.9.plan",
    ]  # fmt: skip
    assert [b["device"] for b in fake.builds] == [0, 1]
    settings = fake.builds[0]["settings"]
    assert settings.strongly_typed and settings.opt_level == 4
    assert settings.profiles[0].opt == (4, 1, 8, 8)
    assert settings.timing_cache == tmp_path.resolve() / ".kiln-cache" / "trt-timing.cache"
    config = parse_config((repo / "digits-fp16-tensorrt" / "config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 16
    assert dict(config.cc_model_filenames) == {"8.0": "model.plan", "8.9": "model_cc8.9.plan"}
    manifest = json.loads((version / "kiln.json").read_text())
    assert manifest["tools"]["tensorrt"] == "10.3.0" and "NVIDIA L4" in manifest["tools"]["gpu"]
    section = manifest["build"]["tensorrt"]
    assert [p["compute_capability"] for p in section["plans"]] == ["8.0", "8.9"]
    assert section["profiles"][0]["max"] == [16, 1, 8, 8]
    assert manifest["validation"] is None
    assert any("not validated" in w for w in result.warnings)


def test_fp32_with_eval_data_only_is_validated(tmp_path: Path, example_model: Path, example_data: Path) -> None:
    result = run_build(request(example_model, tmp_path / "repo", "fp32", eval=str(example_data), repeats=3),
                       FakeGpu(), machine(A100))  # fmt: skip
    validation = result.report["validation"]
    assert validation["passed"] and validation["metrics"]["top1_agreement"] == 1.0
    assert set(validation["latency_ms"]) == {"1", "16"}


def test_int8_qdq_is_calibrated_validated_and_gated(tmp_path: Path, example_model: Path, example_data: Path) -> None:
    fake = FakeGpu()
    repo = tmp_path / "repo"
    req = request(example_model, repo, "int8", calib=str(example_data), repeats=3)
    run_build(req, fake, machine(A100))
    plan = repo / "digits-int8-tensorrt" / "1" / "model.plan"
    ops = {n.op_type for n in onnx.load(str(plan)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # the plan was built from TensorRT-placed Q/DQ
    manifest = json.loads(plan.with_name("kiln.json").read_text())
    validation = manifest["validation"]
    assert validation["passed"] and validation["extra"]["runner"] == "tensorrt"
    assert validation["metrics"]["accuracy_candidate"] >= validation["metrics"]["accuracy_reference"] - 0.01
    assert manifest["calibration"]["method"] == "entropy"
    assert fake.builds[0]["cache"] is None  # explicit quantization: no calibrator

    before = tree_snapshot(repo)
    broken = request(example_model, repo, "int8", calib=str(example_data), repeats=3, amax_scale=0.01)
    with pytest.raises(AccuracyGateError, match="nothing was published"):
        run_build(broken, FakeGpu(), machine(A100))
    assert tree_snapshot(repo) == before


def test_tensorrt_10_calibrator_mode_gets_kilns_cache(tmp_path: Path, example_model: Path, example_data: Path) -> None:
    fake = FakeGpu()
    req = request(example_model, tmp_path / "repo", "int8", calib=str(example_data), repeats=3, int8_mode="calibrator")
    run_build(req, fake, machine(A100))
    build = fake.builds[0]
    assert not build["settings"].strongly_typed
    assert build["cache"].startswith(b"TRT-") and b"EntropyCalibration2" in build["cache"].splitlines()[0]


def test_runner_refuses_a_plan_for_another_gpu_before_touching_tensorrt(tmp_path: Path, example_model: Path) -> None:
    repo = tmp_path / "repo"
    run_build(request(example_model, repo, "fp32"), FakeGpu(), machine(A100))
    plan = repo / "digits-fp32-tensorrt" / "1" / "model.plan"
    with pytest.raises(IncompatibleEngineError) as info:
        TensorRTRunner(plan, machine=machine(L4))
    assert "NVIDIA A100-SXM4-40GB" in str(info.value) and "NVIDIA L4 (cc 8.9)" in str(info.value)
    with pytest.raises(IncompatibleEngineError, match="TensorRT 10.3.0"):
        TensorRTRunner(plan, machine=machine(A100, trt="10.5.0"))
    with pytest.raises(MissingDependencyError, match="kiln-serve\\[tensorrt\\]"):
        TensorRTRunner(plan, machine=machine(A100))  # compatible, but tensorrt is not importable here


def test_auto_candidates_follow_the_support_matrix(example_model: Path) -> None:
    req = BuildRequest(example_model, "digits", "auto", "tensorrt")
    assert candidate_precisions(req, machine(A100)) == ["int8", "fp16", "fp32"]
    assert candidate_precisions(req, machine(GpuInfo(0, "Tesla P100", (6, 0)), trt="8.6.1")) == ["fp16", "fp32"]


def test_auto_skips_a_failing_candidate_and_publishes_the_fastest_within_budget(
    tmp_path: Path, example_model: Path, example_data: Path
) -> None:
    fake = FakeGpu()
    real_build = fake.build_engine

    def int8_breaks(onnx_path: Path, settings: PlanSettings, out_dir: Path, **kwargs: Any) -> EngineBuild:
        if settings.precision == "int8":
            raise KilnError("TensorRT could not build a plan (simulated)")
        return real_build(onnx_path, settings, out_dir, **kwargs)

    fake.build_engine = int8_breaks  # type: ignore[method-assign]
    req = request(example_model, tmp_path / "repo", "auto", calib=str(example_data), repeats=3)
    result = run_build(req, fake, machine(A100))
    assert any("int8 candidate failed" in w for w in result.warnings)
    manifest = result.published.manifest
    assert manifest["build"]["selected_precision"] in ("fp16", "fp32")
    assert [row["precision"] for row in manifest["build"]["auto"]] == ["fp16", "fp32"]
    assert all(row["passed"] for row in manifest["build"]["auto"])
