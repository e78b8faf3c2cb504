"""``kiln bench --stream``: TTFT, ITL, end-to-end latency and output tokens/s of a decoupled model."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.errors import InvalidInputError
from server.bench.stream import (
    DEFAULT_PROMPTS,
    StreamBenchConfig,
    StreamBenchResult,
    plot_stream_result,
    run_stream_bench,
)
from server.cli.bench_output import run_levels, write_outputs


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("token streams (decoupled LLM models on ModelStreamInfer)")
    group.add_argument("--stream", action="store_true", help="bench a token-streaming model: TTFT, ITL, tokens/s")
    group.add_argument(
        "--prompts", type=Path, default=None, help="text file, one prompt per line (default: 8 built in)"
    )
    group.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per request (default 32)")


def read_prompts(path: Path | None) -> tuple[str, ...]:
    if path is None:
        return DEFAULT_PROMPTS
    try:
        prompts = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"--prompts {str(path)!r} cannot be read as UTF-8 text ({err})") from err
    if not prompts:
        raise InvalidInputError(f"--prompts {str(path)!r} holds no prompt; write one per line")
    return prompts


def stream_config(
    args: argparse.Namespace, concurrency: tuple[int, ...], rates: tuple[float, ...]
) -> StreamBenchConfig:
    return StreamBenchConfig(
        url=args.url,
        model=args.model,
        version=args.version,
        prompts=read_prompts(args.prompts),
        max_tokens=args.max_tokens,
        concurrency=concurrency,
        rates=rates,
        requests=args.requests,
        duration_s=args.duration,
        timeout_s=args.timeout,
    )


def run_stream(args: argparse.Namespace, config: StreamBenchConfig) -> int:
    console = Console(highlight=False)
    config.check()
    levels = config.rates or config.concurrency
    result = run_levels(
        "bench --stream", args.model, levels, lambda on_point: run_stream_bench(config, on_point=on_point), console
    )
    print_stream_result(result, console)
    write_outputs(args, result, plot_stream_result, console)
    return 0 if all(p.ok for p in result.points) else 1


def print_stream_result(result: StreamBenchResult, console: Console) -> None:
    table = Table(title=f"{result.model} @ {result.url} (streamed, {result.settings['max_tokens']} tokens max)")
    mode = result.points[0].mode if result.points else "concurrency"
    for title in (
        mode,
        "variant",
        "ok",
        "out tok/s",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "e2e p99",
        "errors",
    ):
        table.add_column(title, justify="right")
    for p in result.points:
        rows = [("all", p.ok, p.output_tokens_per_s, p.ttft_ms, p.itl_ms, p.e2e_ms)]
        rows += [
            (name, v["ok"], v["output_tokens_per_s"], v["ttft_ms"], v["itl_ms"], v["e2e_ms"])
            for name, v in p.variants.items()
        ]
        for index, (name, ok, rate, ttft, itl, e2e) in enumerate(rows):
            errors = ", ".join(f"{k}: {v}" for k, v in p.errors.items()) or "-"
            table.add_row(
                f"{p.load:g}" if index == 0 else "",
                name,
                str(ok),
                f"{rate:.1f}",
                f"{ttft['p50']:.2f}",
                f"{ttft['p99']:.2f}",
                f"{itl['p50']:.2f}",
                f"{itl['p99']:.2f}",
                f"{e2e['p99']:.1f}",
                errors if index == 0 else "",
            )
    console.print(table)
    console.print("  (milliseconds; ITL = (last token - sent - TTFT) / (tokens - 1), as GenAI-Perf counts it)")
    for p in result.points:
        for code, message in p.error_examples.items():
            console.print(f"  [red]{code}[/]: {escape(message)}")
        if p.mode == "rate":
            console.print(
                f"  rate {p.load:g}: sends were late by p50 {p.send_lag_us_p50:.0f} µs, max {p.send_lag_us_max:.0f} µs"
            )
