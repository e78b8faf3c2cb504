"""``kiln bench --find-capacity --slo-p99-ms X [--slo-error-rate Y] [--capacity-mode rate|concurrency]``.

The flags, the run (progress bar, table, JSON, PNG) and ``--record`` into the repository.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from builders.request import DEFAULT_REPO
from core.errors import InvalidInputError
from server.bench.capacity import CapacityResult, Run, SearchSettings, Slo
from server.bench.loadgen import BenchConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("capacity under a latency SLO (--find-capacity)")
    group.add_argument(
        "--find-capacity",
        action="store_true",
        help="search for the highest load that meets the SLO (exponential, then binary, then repeats)",
    )
    group.add_argument("--slo-p99-ms", type=float, default=None, help="the SLO: p99 latency in ms (required)")
    group.add_argument(
        "--slo-error-rate", type=float, default=0.0, help="the SLO: share of requests allowed to fail, 0..1 (default 0)"
    )
    group.add_argument(
        "--capacity-mode",
        choices=("rate", "concurrency"),
        default="rate",
        help="search open-loop Poisson arrival rate (default) or closed-loop concurrency",
    )
    group.add_argument("--start", type=float, default=None, help="first level (default 10 req/s, or concurrency 1)")
    group.add_argument(
        "--max-load", type=float, default=None, help="highest level to offer (default 20000 req/s, or concurrency 1024)"
    )
    group.add_argument(
        "--precision",
        type=float,
        default=0.05,
        help="stop bisecting when the bracket is within this share (default 0.05)",
    )
    group.add_argument("--repeats", type=int, default=2, help="extra runs of the final level (default 2)")
    group.add_argument(
        "--min-samples", type=int, default=2000, help="successful requests per level for a stable p99 (default 2000)"
    )
    group.add_argument("--level-seconds", default="2,15", help="MIN,MAX seconds per measured level (default 2,15)")
    group.add_argument("--max-levels", type=int, default=30, help="stop after this many levels (default 30)")
    group.add_argument(
        "--probe-concurrency",
        type=int,
        default=16,
        help="rate search: a 1 s closed-loop run at this concurrency first, to start near the "
        "endpoint's throughput (0: off, start at --start)",
    )
    group.add_argument(
        "--record", action="store_true", help="write the capacity into the served version's kiln.json in --repo"
    )
    group.add_argument(
        "--repo", type=Path, default=DEFAULT_REPO, help=f"repository for --record (default {DEFAULT_REPO})"
    )
    group.add_argument(
        "--record-model", default=None, help="repository model to record into, when --model is a gateway route name"
    )
    group.add_argument("--hardware", default="", help="label of the server's hardware for --record (default: probed)")


def settings_from_args(args: argparse.Namespace) -> tuple[Slo, SearchSettings]:
    if args.slo_p99_ms is None:
        raise InvalidInputError("--find-capacity needs --slo-p99-ms, e.g. --slo-p99-ms 50")
    parts = [p for p in str(args.level_seconds).split(",") if p.strip()]
    try:
        low, high = (float(parts[0]), float(parts[1])) if len(parts) == 2 else (math.nan, math.nan)
    except ValueError:
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InvalidInputError(f"--level-seconds {args.level_seconds!r} must be MIN,MAX seconds, e.g. 2,15")
    rate = args.capacity_mode == "rate"
    settings = SearchSettings(
        mode=args.capacity_mode,
        start=args.start if args.start is not None else (10.0 if rate else 1.0),
        max_load=args.max_load if args.max_load is not None else (20000.0 if rate else 1024.0),
        precision=args.precision,
        repeats=args.repeats,
        max_levels=args.max_levels,
        min_samples=args.min_samples,
        min_duration_s=low,
        max_duration_s=high,
        warmup_s=args.warmup,
        probe_concurrency=args.probe_concurrency if rate else 0,
    )
    slo = Slo(args.slo_p99_ms, args.slo_error_rate)
    slo.check()
    settings.check()
    if args.record and not args.repo:
        raise InvalidInputError("--record needs --repo DIR (the repository the endpoint serves)")
    return slo, settings


def run_capacity(args: argparse.Namespace, config: BenchConfig, console: Console) -> int:
    from server.bench.capacity_load import search_endpoint
    from server.bench.plot import plot_capacity

    slo, settings = settings_from_args(args)
    unit = "req/s" if settings.mode == "rate" else "in flight"
    if settings.min_duration_s < 3 * slo.p99_ms / 1e3:
        console.print(
            f"[yellow]warning[/]: levels of {settings.min_duration_s:g} s cannot show a queue that grows by less than "
            f"the SLO's {slo.p99_ms:g} ms in that time, so rates a little above the endpoint's ceiling may pass; "
            f"use --level-seconds of at least {3 * slo.p99_ms / 1e3:g}",
            soft_wrap=True,
        )
    with Progress(
        TextColumn("[bold]capacity[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.completed} level(s)"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(f"{escape(args.model)}: {slo.describe()}", total=settings.max_levels)

        def on_run(run: Run) -> None:
            verdict = "meets" if run.judgement.meets else f"fails ({run.judgement.cause})"
            progress.update(
                task, advance=1, description=f"{escape(args.model)}: {run.phase} {run.load:g} {unit} -> {verdict}"
            )

        result, versions = search_endpoint(config, slo, settings, on_run)
    print_capacity(result, console)
    title = f"{args.model} @ {args.url}{f' variant {args.variant}' if args.variant else ''}: {slo.describe()}"
    if args.json:
        document = {
            "url": args.url,
            "model": args.model,
            "variant": args.variant,
            "batch": config.batch,
            "versions": list(versions),
            **result.to_dict(),
        }
        _write(args.json, json.dumps(document, indent=2, default=str))
    if args.plot:
        plot_capacity(result, args.plot, title)
        console.print(f"plot written to {escape(str(args.plot))}")
    if args.record and result.ok:
        _record(args, config, result, versions, console)
    elif args.record:
        console.print("[yellow]nothing recorded[/]: the search found no capacity")
    return 0 if result.ok else 1


def print_capacity(result: CapacityResult, console: Console) -> None:
    unit = "rate (req/s)" if result.mode == "rate" else "concurrency"
    table = Table(title=f"capacity search at {result.slo.describe()}")
    for name in ("#", "phase", unit, "ok", "ok/s", "p50 ms", "p99 ms", "errors %", "client lag p50 ms", "verdict"):
        table.add_column(name, justify="left" if name in ("phase", "verdict") else "right")
    for index, run in enumerate(result.runs, 1):
        point, judgement = run.point, run.judgement
        lag = (point.send_lag_us_p50 if point.mode == "rate" else point.loop_lag_us_p50) / 1e3
        verdict = "[green]meets[/]" if judgement.meets else f"[red]{escape(judgement.cause)}[/]"
        table.add_row(
            str(index),
            run.phase,
            f"{run.load:g}",
            str(point.ok),
            f"{point.throughput_rps:.1f}",
            f"{point.latency_us.get('p50', math.nan) / 1e3:.2f}",
            f"{judgement.p99_ms:.2f}",
            f"{judgement.error_rate * 100:.2f}",
            f"{lag:.2f}",
            verdict,
        )
    console.print(table)
    for run in result.runs:
        if not run.judgement.meets:
            console.print(f"  {run.load:g}: {escape(run.judgement.reason)}", soft_wrap=True)
    style = "green" if result.ok and result.limited_by == "server" else "yellow" if result.ok else "red"
    console.print(f"[{style}]{escape(result.message)}[/]", soft_wrap=True)
    seconds = sum(r.elapsed_s for r in result.runs)
    console.print(f"{len(result.runs)} level runs in {seconds:.1f} s (warm-up included)")


def _record(
    args: argparse.Namespace, config: BenchConfig, result: CapacityResult, versions: tuple[str, ...], console: Console
) -> None:
    from runtime.machine import probe_machine
    from server.bench.record import capacity_entry, hardware_summary, record_capacity

    hardware = hardware_summary(probe_machine(), args.hardware)

    def build(precision: str | None, serving: dict[str, Any]) -> dict[str, Any]:
        return capacity_entry(
            result,
            url=args.url,
            served_model=args.model,
            variant=args.variant,
            request_batch=config.batch,
            precision=precision,
            serving=serving,
            hardware=hardware,
        )

    model = args.record_model or args.model
    path, entry = record_capacity(args.repo, model, versions, args.version, build)
    console.print(f"recorded {entry['capacity']:g} {entry['unit']} at {result.slo.describe()} in {escape(str(path))}")


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as err:
        raise InvalidInputError(f"cannot write {err.filename!r}: {err.strerror}; pass a writable path") from err
