"""``kiln bench --url HOST:PORT --model NAME [--concurrency 1,4,16 | --rate R | --find-capacity ...] [...]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.errors import InvalidInputError
from server.bench.capacity import SearchSettings
from server.bench.loadgen import BenchConfig, run_bench
from server.bench.plot import plot_result
from server.bench.stats import PERCENTILES, BenchResult
from server.cli import bench_capacity
from server.cli.bench_output import run_levels, write_outputs
from server.cli.bench_stream import add_stream_arguments, run_stream, stream_config


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench", help="measure throughput and latency of a KServe v2 gRPC endpoint (Kiln or Triton)"
    )
    parser.add_argument("--url", default="127.0.0.1:8001", help="HOST:PORT of the gRPC endpoint")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--version", default="", help="model version (default: the server's choice)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default="1", help="requests in flight, or a sweep like 1,4,16 (closed loop)")
    load.add_argument(
        "--rate", default=None, help="requests/s with Poisson arrivals, or a sweep like 50,100 (open loop)"
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--duration", type=float, default=5.0, help="seconds per load level (default 5)")
    amount.add_argument("--requests", type=int, default=None, help="requests per load level instead of a duration")
    parser.add_argument("--batch", type=int, default=1, help="batch size of each request (default 1)")
    parser.add_argument("--data", type=Path, default=None, help=".npz with one array per input name (default random)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per level, not measured")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request deadline in seconds")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=4096,
        help="open loop: arrivals beyond this many outstanding requests are counted as "
        "CLIENT_BACKLOG instead of sent (default 4096)",
    )
    parser.add_argument(
        "--by-variant", action="store_true", help="also report percentiles per gateway variant (kiln-variant)"
    )
    parser.add_argument(
        "--variant", default="", help="through the gateway: pin every request to this variant (kiln-variant header)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--csv", type=Path, default=None, help="write one CSV row per load level")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of latency percentiles vs load")
    bench_capacity.add_arguments(parser)
    add_stream_arguments(parser)
    parser.set_defaults(func=run)


def parse_levels(text: str, kind: type[int] | type[float], flag: str) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise InvalidInputError(f"{flag} {text!r} is not a comma-separated list of numbers, e.g. 1,4,16") from err


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    rates = parse_levels(args.rate, float, "--rate") if args.rate else ()
    concurrency = parse_levels(args.concurrency, int, "--concurrency") if not rates else (1,)
    return BenchConfig(
        url=args.url,
        model=args.model,
        version=args.version,
        concurrency=concurrency,
        rates=rates,
        duration_s=args.duration if args.requests is None else None,
        requests=args.requests,
        batch=args.batch,
        data=args.data,
        warmup_s=args.warmup,
        timeout_s=args.timeout,
        by_variant=args.by_variant,
        max_in_flight=args.max_in_flight,
        variant=args.variant,
    )


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse unwritable --json/--csv/--plot paths before the load runs, not after."""
    for flag in ("json", "csv", "plot"):
        path: Path | None = getattr(args, flag)
        if path is None:
            continue
        if path.is_dir():
            raise InvalidInputError(f"--{flag} {str(path)!r} is a directory; pass a file path")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InvalidInputError(
                f"--{flag} {str(path)!r}: cannot create its folder ({err.strerror}); pass a writable path"
            ) from err


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    config = config_from_args(args)
    config.check()
    check_outputs(args)
    if args.find_capacity:
        if args.rate or args.requests is not None:
            raise InvalidInputError("--find-capacity chooses the load levels itself; drop --rate/--requests")
        return bench_capacity.run_capacity(args, config, console)
    if args.record:
        raise InvalidInputError("--record stores a capacity: add --find-capacity --slo-p99-ms X")
    if args.stream:
        return run_stream(args, stream_config(args, config.concurrency if not config.rates else (1,), config.rates))
    levels = config.rates or config.concurrency
    result = run_levels("bench", args.model, levels, lambda on_point: run_bench(config, on_point=on_point), console)
    print_result(result, console)
    write_outputs(args, result, plot_result, console)
    return 0 if all(p.ok for p in result.points) else 1


def print_result(result: BenchResult, console: Console) -> None:
    table = Table(title=f"{result.model} @ {result.url} (batch {result.batch})")
    mode = result.points[0].mode if result.points else "concurrency"
    table.add_column(mode, justify="right")
    table.add_column("ok", justify="right")
    table.add_column("req/s", justify="right")
    for name, _ in PERCENTILES:
        table.add_column(f"{name} ms", justify="right")
    table.add_column("max ms", justify="right")
    table.add_column("errors")
    for p in result.points:
        errors = ", ".join(f"{k}: {v}" for k, v in p.errors.items()) or "-"
        table.add_row(
            f"{p.load:g}",
            str(p.ok),
            f"{p.throughput_rps:.1f}",
            *[f"{p.latency_us[n] / 1e3:.3f}" for n, _ in PERCENTILES],
            f"{p.latency_us['max'] / 1e3:.3f}",
            errors,
        )
    console.print(table)
    shown: set[str] = set()
    for p in result.points:
        for code, message in p.error_examples.items():
            if code not in shown:
                shown.add(code)
                console.print(f"  [red]{code}[/]: {escape(message)}")
    for p in result.points:
        if p.mode == "rate":
            console.print(
                f"  rate {p.load:g}: sends were late by p50 {p.send_lag_us_p50:.0f} µs, max {p.send_lag_us_max:.0f} µs "
                "(client timers; included in the latencies above)"
            )
            if p.sent_rps and p.sent_rps < SearchSettings.client_rate_share * p.load:
                console.print(
                    f"  [yellow]rate {p.load:g}: the load generator sent only {p.sent_rps:.0f} requests/s: "
                    "this level measures the client's limit, not the endpoint's[/]"
                )
    for p in result.points:
        for variant, figures in p.variants.items():
            console.print(
                f"  {p.mode} {p.load:g} variant [bold]{variant}[/]: {int(figures['ok'])} ok, "
                f"p50 {figures['p50'] / 1e3:.3f} ms, p99 {figures['p99'] / 1e3:.3f} ms"
            )
