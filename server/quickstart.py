"""Kiln's main job on this machine's CPU, end to end: the steps behind ``kiln quickstart``.

build (FP32, FP16, INT8 with its validation report, and a deliberately miscalibrated INT8
published with the gate overridden) -> serve the repository -> real tritonclient requests ->
a short bench -> gateway -> canary INT8 against FP32 to promotion -> canary of the broken build,
rolled back automatically -> INT8 rebuilt with other calibration data as version 2 of the same model,
loaded beside version 1 through the repository API, canaried v1 -> v2, promoted, version 1 retired
-> summary table and a PNG of weights and per-variant p99 over time.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from builders.example_builds import build_example_bad_int8, build_example_int8
from builders.examples import example_data_path, example_model_path
from builders.pipeline import build_model
from builders.request import BuildRequest, BuildResult
from core.errors import ConflictError, KilnError, RepositoryError
from server.app import ServerHandle, start_server
from server.bench.loadgen import BenchConfig, run_bench
from server.bench.stats import BenchResult
from server.gateway.app import GatewayHandle, start_gateway
from server.rollout.plan import RolloutPlan, plan_from_mapping
from server.rollout.timeline import RolloutRun, plot_rollouts, run_rollout

BASE = "digits"
BROKEN = "digits-miscalibrated"
MARKER = ".kiln-quickstart"  # marks a repository quickstart made, so it may replace it


def prepare_repository(repo: Path) -> None:
    """Start from an empty repository; only ever delete one that quickstart itself made."""
    if repo.exists() and not repo.is_dir():
        raise RepositoryError(f"--repo {str(repo)!r} is a file; pass a directory for the quickstart repository")
    if repo.exists() and any(repo.iterdir()):
        if not (repo / MARKER).exists():
            raise ConflictError(
                f"--repo {str(repo)!r} exists and was not made by kiln quickstart; it is left untouched. "
                "Pass a new directory, e.g. --repo quickstart_repository"
            )
        shutil.rmtree(repo)
    repo.mkdir(parents=True, exist_ok=True)
    (repo / MARKER).write_text("made by kiln quickstart; replaced by the next run\n")


@dataclass
class LoadTally:
    """What clients saw while a rollout ran (through the gateway, as users would)."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, result: BenchResult) -> None:
        for point in result.points:
            self.ok += point.ok
            self.errors.update(point.errors)


def build_all(repo: Path, console: Console) -> dict[str, BuildResult]:
    """FP32, FP16, INT8 and the miscalibrated INT8 of the example model."""
    from server.cli.build_cmd import print_result

    results: dict[str, BuildResult] = {}
    for precision in ("fp32", "fp16"):
        request = BuildRequest(model=example_model_path(), name=BASE, precision=precision, target="ort", repo=repo)
        results[precision] = build_model(request)
        print_result(results[precision], console)
    results["int8"] = build_example_int8(repo, name=BASE)
    print_result(results["int8"], console)
    results["broken"] = build_example_bad_int8(repo, name=BROKEN)
    print_result(results["broken"], console)
    return results


def check_requests(server: ServerHandle, console: Console, n: int = 32) -> float:
    """Send real tritonclient requests to each served model; returns FP32 accuracy on them."""
    import tritonclient.grpc as grpcclient

    data = np.load(example_data_path())
    x, labels = data["input"][:n], data["labels"][:n]
    client = grpcclient.InferenceServerClient(server.url)
    try:
        table = Table("model", "requests", "accuracy vs labels", title=f"tritonclient -> {server.url}")
        accuracy = 0.0
        for model in (f"{BASE}-fp32-ort", f"{BASE}-fp16-ort", f"{BASE}-int8-ort", f"{BROKEN}-int8-ort"):
            correct = 0
            for i in range(n):
                tensor = grpcclient.InferInput("input", [1, 1, 8, 8], "FP32")
                tensor.set_data_from_numpy(x[i : i + 1])
                logits = client.infer(model, [tensor]).as_numpy("logits")
                correct += int(logits.argmax() == labels[i])
            table.add_row(model, str(n), f"{correct / n:.3f}")
            if model.endswith("fp32-ort"):
                accuracy = correct / n
        console.print(table)
        return accuracy
    finally:
        client.close()


def gateway_config(server: ServerHandle) -> dict[str, Any]:
    return {
        "upstreams": {"local": {"address": server.url}},
        "routes": {
            BASE: {"variants": [{"name": "fp32", "upstream": "local", "model": f"{BASE}-fp32-ort", "weight": 100}]}
        },
    }


def canary_plan(baseline: str, candidate: str, model: str, *, interval_s: float) -> RolloutPlan:
    return plan_from_mapping(
        {
            "route": BASE,
            "baseline": baseline,
            "candidate": {"name": candidate, "upstream": "local", "model": model},
            "steps": [10, 25, 50],
            "interval_s": interval_s,
            "min_requests": 30,
            "max_wait_s": 20,
            "shadow": {"duration_s": interval_s, "percent": 100, "min_comparisons": 50},
            "sample_percent": 20,
            "min_comparisons": 20,
            # p99 on a shared 2-core machine is noisy: a generous ratio with an absolute ceiling.
            "slos": {"max_error_rate": 0.01, "max_p99_ratio": 4.0, "min_agreement": 0.97, "max_p99_ms": 250},
            "on_failure": "rollback",
        },
        source="(quickstart)",
    )


def run_with_load(
    gateway: GatewayHandle, plan: RolloutPlan, console: Console, concurrency: int = 4
) -> tuple[RolloutRun, LoadTally]:
    """Drive closed-loop load through the gateway with ``kiln bench`` while the rollout runs."""
    stop = threading.Event()
    tally = LoadTally()

    def load() -> None:
        while not stop.is_set():
            tally.add(
                run_bench(
                    BenchConfig(
                        url=gateway.address,
                        model=BASE,
                        concurrency=(concurrency,),
                        duration_s=0.5,
                        warmup_s=0.0,
                        data=example_data_path(),
                    )
                )
            )

    thread = threading.Thread(target=load, name="quickstart-load", daemon=True)
    thread.start()
    try:
        last: list[Any] = [None]

        def show(sample: Any) -> None:
            key = (sample.phase, sample.weights)
            if key != last[0]:
                last[0] = key
                weights = ", ".join(f"{k} {v:g}%" for k, v in sample.weights.items())
                console.print(f"  t={sample.t_s:5.1f}s  {sample.phase:<12} {weights}")

        run = run_rollout(gateway, plan, timeout_s=90.0, on_sample=show)
    finally:
        stop.set()
        thread.join(timeout=30)
    return run, tally


def summary_table(runs: list[tuple[RolloutRun, LoadTally]]) -> Table:
    table = Table("candidate", "vs", "outcome", "took", "client OK", "client errors", title="rollouts")
    for run, tally in runs:
        errors = ", ".join(f"{k}={v}" for k, v in sorted(tally.errors.items())) or "0"
        cand = run.plan.candidate
        name = f"{cand.model}:{cand.version}" if cand.version else cand.model
        table.add_row(name, run.plan.baseline, run.outcome, f"{run.duration_s:.1f}s", str(tally.ok), errors)
    return table


def version_rollout(
    gateway: GatewayHandle, repo: Path, out_dir: Path, console: Console, *, interval_s: float
) -> tuple[RolloutRun, LoadTally, str]:
    """Rebuild INT8 with other calibration data (version 2 of the same model) and roll it out over
    version 1 on the same route: loaded before traffic moves, canaried, promoted, version 1 retired."""
    from server.cli.build_cmd import print_result
    from server.rollout.plugin import controller_for

    data = np.load(example_data_path())
    calib = out_dir / "calibration-v2.npz"
    np.savez(calib, **{key: data[key][::2] for key in data.files})  # every other sample: new data
    print_result(build_example_int8(repo, name=BASE, calib=calib), console)
    model = f"{BASE}-int8-ort"
    gateway.routes.replace_route(
        BASE,
        {"variants": [{"name": "int8-v1", "upstream": "local", "model": model, "version": "1", "weight": 100}]},
        reason="name the version serving today before a version rollout",
    )
    plan = plan_from_mapping(
        {
            **canary_plan("int8-v1", "int8-v2", model, interval_s=interval_s).to_dict(),
            "candidate": {"name": "int8-v2", "upstream": "local", "model": model, "version": "2"},
            "steps": [25, 50],
            "retire_previous": True,
            "retain_for_s": 0,
        },
        source="(quickstart)",
    )
    run, tally = run_with_load(gateway, plan, console)
    controller = controller_for(gateway)
    for _ in range(200):  # the retirement follows promotion on the controller's next tick (bounded)
        if controller.status(BASE).get("retire"):
            break
        time.sleep(0.05)
    retire = controller.status(BASE).get("retire") or {"state": "not done", "message": ""}
    return run, tally, f"{retire['state']}: {retire['message']}"


def print_reasons(runs: list[tuple[RolloutRun, LoadTally]], console: Console) -> None:
    """Why each rollout ended as it did: the controller's own words, with the figures."""
    for run, _ in runs:
        console.print(f"[bold]{escape(run.plan.candidate.model)}[/]: {escape(str(run.final.get('reason') or ''))}")


def run_quickstart(repo: Path, out_dir: Path, console: Console, *, interval_s: float = 2.0) -> int:
    """The whole flow; returns 0 when INT8 was promoted and the broken build rolled back."""
    began = time.perf_counter_ns()
    prepare_repository(repo)
    out_dir.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]1. build the example model (digits CNN): FP32, FP16, INT8, and a broken INT8")
    builds = build_all(repo, console)
    report = builds["int8"].published.path / "report.md" if builds["int8"].published else None
    console.print(f"INT8 validation report: {report}")
    console.rule("[bold]2. serve the repository (embedded KServe v2 server, ONNX Runtime on CPU)")
    with start_server(repo, port=0, model_control_mode="explicit") as server:
        console.print(f"kiln serve listening on {server.url}")
        check_requests(server, console)
        direct = run_bench(
            BenchConfig(
                url=server.url,
                model=f"{BASE}-int8-ort",
                concurrency=(1, 8),
                duration_s=1.5,
                warmup_s=0.3,
                data=example_data_path(),
            )
        )
        _print_bench(direct, console)
        console.rule("[bold]3. gateway + canary rollouts under load")
        with start_gateway(gateway_config(server), port=0, admin_port=0, insecure_admin=True,
                           data_plane="auto") as gateway:  # fmt: skip
            console.print(f"gateway on {gateway.address} ({gateway.data_plane} data plane: "
                          f"{gateway.data_plane_note}), admin API on {gateway.admin_url}")  # fmt: skip
            console.print("[bold]canary: INT8 replacing FP32[/]")
            first = run_with_load(
                gateway, canary_plan("fp32", "int8", f"{BASE}-int8-ort", interval_s=interval_s), console
            )
            baseline = "int8" if first[0].outcome == "promoted" else "fp32"
            console.print(f"[bold]canary: miscalibrated INT8 replacing {baseline}[/]")
            second = run_with_load(
                gateway, canary_plan(baseline, "int8-bad", f"{BROKEN}-int8-ort", interval_s=interval_s), console
            )
            runs = [first, second]
            retired = "skipped: INT8 was not promoted"
            if first[0].outcome == "promoted":
                console.rule("[bold]4. a new engine version: INT8 recalibrated as version 2, canary v1 -> v2")
                run, tally, retired = version_rollout(gateway, repo, out_dir, console, interval_s=interval_s / 2)
                runs.append((run, tally))
    console.rule("[bold]5. summary")
    console.print(summary_table(runs))
    print_reasons(runs, console)
    console.print(f"{BASE}-int8-ort version 1 after the version rollout: {escape(retired)}")
    png = plot_rollouts([r for r, _ in runs], out_dir / "quickstart-rollouts.png")
    console.print(f"plot of weights and per-variant p99 over time: {png}")
    took = (time.perf_counter_ns() - began) / 1e9
    outcomes = [run.outcome for run, _ in runs]
    ok = outcomes == ["promoted", "rolled_back", "promoted"] and retired.startswith("retired")
    verdict = "as expected" if ok else "[red]NOT as expected[/]"
    version_two = outcomes[2] if len(outcomes) > 2 else "not run"
    console.print(
        f"quickstart finished in {took:.0f}s: INT8 {outcomes[0]}, broken build {outcomes[1]}, "
        f"INT8 version 2 {version_two} ({verdict})"
    )
    console.print(
        f"next: [bold]kiln serve --repo {repo}[/], [bold]kiln bench --url 127.0.0.1:8001 "
        f"--model {BASE}-int8-ort --concurrency 1,4,16 --plot bench.png[/], [bold]kiln doctor[/]"
    )
    if not ok:
        raise KilnError(
            f"quickstart rollouts ended {'/'.join(outcomes)} (version 1 {retired}), expected "
            "promoted/rolled_back/promoted with version 1 retired; see the events above and the plot"
        )
    return 0


def _print_bench(result: BenchResult, console: Console) -> None:
    table = Table("concurrency", "infer/s", "p50 ms", "p99 ms", "errors", title=f"kiln bench -> {result.model}")
    for p in result.points:
        table.add_row(
            f"{p.load:g}",
            f"{p.throughput_rps:.0f}",
            f"{p.latency_us['p50'] / 1e3:.2f}",
            f"{p.latency_us['p99'] / 1e3:.2f}",
            str(sum(p.errors.values())),
        )
    console.print(table)
