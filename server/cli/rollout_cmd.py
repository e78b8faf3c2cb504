"""``kiln rollout start|status|pause|resume|abort|promote|retire|events`` against a gateway's admin API."""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from builders.repository import read_model, repository_root
from core.errors import InvalidInputError, PermissionDeniedError
from server.cli.routes_cmd import _connection, check_admin_url, client
from server.gateway.client import AdminClient, read_token
from server.rollout.capacity import compare_capacity, describe_comparison
from server.rollout.plan import CapacityFigures, load_plan, parse_candidate, parse_steps, plan_from_mapping

TERMINAL = ("promoted", "rolled_back", "aborted")
# flag -> (plan field path, type)
_PLAN_FLAGS: dict[str, tuple[tuple[str, ...], Any]] = {
    "route": (("route",), str),
    "baseline": (("baseline",), str),
    "interval": (("interval_s",), float),
    "min_requests": (("min_requests",), int),
    "max_wait": (("max_wait_s",), float),
    "on_insufficient": (("on_insufficient",), str),
    "sample_percent": (("sample_percent",), float),
    "min_comparisons": (("min_comparisons",), int),
    "max_error_rate": (("slos", "max_error_rate"), float),
    "max_p99_ratio": (("slos", "max_p99_ratio"), float),
    "min_agreement": (("slos", "min_agreement"), float),
    "max_p99_ms": (("slos", "max_p99_ms"), float),
    "min_capacity_ratio": (("slos", "min_capacity_ratio"), float),
    "on_failure": (("on_failure",), str),
    "shadow_duration": (("shadow", "duration_s"), float),
    "shadow_percent": (("shadow", "percent"), float),
    "shadow_min": (("shadow", "min_comparisons"), int),
    "ready_timeout": (("ready_timeout_s",), float),
    "retain_for": (("retain_for_s",), float),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("rollout", help="canary rollouts on a running gateway (admin API)")
    sub = parser.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    start = sub.add_parser("start", help="start a rollout from a plan file and/or flags")
    _connection(start)
    _plan_flags(start)
    start.add_argument(
        "--repo",
        type=Path,
        help="the model repository both versions were published to: compare their recorded capacity "
        "(kiln bench --find-capacity --record) and record it in the rollout; needed by --min-capacity-ratio",
    )
    _watch_flags(start)
    start.set_defaults(func=run_start)
    status = sub.add_parser("status", help="phase, step, weights and each SLO's measured value vs its limit")
    _connection(status)
    status.add_argument("route", nargs="?", help="public model name (default: every rollout)")
    status.add_argument("--json", action="store_true", help="print JSON")
    _watch_flags(status)
    status.set_defaults(func=run_status)
    for verb, text in (
        ("pause", "hold the current weights"),
        ("resume", "re-run the paused phase or step"),
        ("abort", "stop and restore the baseline"),
        ("promote", "make the candidate the baseline now"),
        ("retire", "stop serving the promoted rollout's previous version (refused while routed)"),
    ):
        p = sub.add_parser(verb, help=text)
        _connection(p)
        p.add_argument("route", help="public model name")
        p.add_argument("--expect-version", type=int, help="refuse if the rollout changed since this version")
        p.set_defaults(func=run_command, verb=verb)
    events = sub.add_parser("events", help="the decisions and commands, with the figures behind each")
    _connection(events)
    events.add_argument("route", help="public model name")
    events.add_argument("--since", type=int, default=0, help="only events after this sequence number")
    events.add_argument("--json", action="store_true", help="print JSON lines")
    events.set_defaults(func=run_events)
    _replica_commands(sub)


def _replica_commands(sub: argparse._SubParsersAction) -> None:
    ctl = sub.add_parser("controller", help="run a controller for several gateway replicas (Prometheus + shared file)")
    ctl.add_argument("--routes-file", type=Path, required=True, help="the shared routes file it writes")
    ctl.add_argument("--prometheus", required=True, help="Prometheus URL, e.g. http://prometheus:9090")
    ctl.add_argument("--state-dir", type=Path, required=True, help="where rollout state and events persist")
    ctl.add_argument("--admin-host", default="127.0.0.1", help="its /rollouts admin API address")
    ctl.add_argument("--admin-port", type=int, default=8081, help="its /rollouts admin API port (default 8081)")
    ctl.add_argument("--token-file", type=Path, help="bearer token file (default: $KILN_ADMIN_TOKEN)")
    ctl.add_argument("--tick", type=float, default=1.0, help="seconds between decisions (default 1)")
    ctl.add_argument(
        "--insecure-admin",
        action="store_true",
        help="allow its admin API without a token (only when bound to 127.0.0.1)",
    )
    ctl.set_defaults(func=run_controller)
    sync = sub.add_parser("sync-routes", help="keep one gateway's routes equal to the shared routes file")
    _connection(sync)
    sync.add_argument("--routes-file", type=Path, required=True, help="the shared routes file it watches")
    sync.add_argument("--interval", type=float, default=0.5, help="seconds between polls (default 0.5)")
    sync.set_defaults(func=run_sync)


def _plan_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", type=Path, help="plan YAML/JSON (flags below override its fields)")
    p.add_argument("--route", help="public model name")
    p.add_argument("--baseline", help="the route's serving variant")
    p.add_argument("--candidate", help="NAME=UPSTREAM/MODEL[:VERSION], e.g. int8=local/digits-int8-ort")
    p.add_argument("--steps", help="candidate weights per step, e.g. 5,25,50,100")
    for flag, (path, kind) in _PLAN_FLAGS.items():
        if flag not in ("route", "baseline"):
            p.add_argument("--" + flag.replace("_", "-"), type=kind, help=f"plan field {'.'.join(path)}")
    p.add_argument("--no-shadow", action="store_true", help="skip the shadow phase")
    p.add_argument(
        "--retire-previous",
        action="store_true",
        help="after promotion (and --retain-for seconds), stop upstreams serving the baseline's version",
    )


def _watch_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--watch", action="store_true", help="refresh live until the rollout ends")
    p.add_argument("--every", type=float, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--refreshes", type=int, default=600, help="stop watching after this many (default 600)")


def plan_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The plan mapping from --plan and the flags (flags win); validated before sending."""
    data: dict[str, Any] = load_plan(args.plan).to_dict() if args.plan else {}
    for flag, (path, _) in _PLAN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        target = data
        for key in path[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[path[-1]] = value
    if args.candidate:
        data["candidate"] = parse_candidate(args.candidate)
    if args.steps:
        data["steps"] = list(parse_steps(args.steps))
    if args.no_shadow:
        data["shadow"] = None
    if args.retire_previous:
        data["retire_previous"] = True
    if "route" not in data:
        raise InvalidInputError("a rollout needs --plan FILE or --route/--baseline/--candidate")
    return plan_from_mapping(data, "from the command line").to_dict()


def run_start(args: argparse.Namespace) -> int:
    admin = client(args)
    plan = plan_from_args(args)
    if args.repo is not None:
        figures = recorded_capacity(args.repo, admin.get(f"/routes/{plan['route']}")["route"], plan)
        plan["capacity"] = figures.model_dump(mode="json")
        Console(highlight=False).print(escape(describe_comparison(figures)))
    # the gateway first waits (up to ready_timeout_s) for the candidate version on every upstream
    status = admin.request("POST", "/rollouts", plan, timeout_s=plan["ready_timeout_s"] + 30.0)
    if args.watch:
        return _watch(admin, status["route"], args)
    Console(highlight=False).print(render_status(status))
    return 0


def recorded_capacity(repo: Path, route: dict[str, Any], plan: dict[str, Any]) -> CapacityFigures:
    """Baseline and candidate capacity from their versions' kiln.json (version "" = the newest published)."""
    root = repository_root(repo)
    baseline = next((v for v in route.get("variants", []) if v.get("name") == plan["baseline"]), None)
    if baseline is None:
        raise InvalidInputError(
            f"route {plan['route']!r} has no variant {plan['baseline']!r} to compare capacity with; "
            f"its variants: {[v.get('name') for v in route.get('variants', [])]}"
        )
    candidate = plan["candidate"]
    sides = []
    for model, version in (
        (baseline["model"], baseline.get("version", "")),
        (candidate["model"], candidate["version"]),
    ):
        entry = read_model(root, model)
        chosen = int(version) if version else entry.latest
        found = next((v for v in entry.versions if v.version == chosen), None)
        if found is None:
            raise InvalidInputError(
                f"version {version or chosen} of {model!r} is not in {str(root)!r} (published: "
                f"{[v.version for v in entry.versions]}); pass the --repo the upstreams serve"
            )
        sides.append((f"{model}:{chosen}", list((found.manifest or {}).get("capacity") or [])))
    (base_name, base_entries), (cand_name, cand_entries) = sides
    return compare_capacity(base_entries, cand_entries, names=(base_name, cand_name))


def run_status(args: argparse.Namespace) -> int:
    admin = client(args)
    if args.watch and args.route:
        return _watch(admin, args.route, args)
    docs = [admin.get(f"/rollouts/{args.route}")] if args.route else admin.get("/rollouts")["rollouts"]
    if args.json:
        print(json.dumps(docs if not args.route else docs[0], indent=2))
        return 0
    console = Console(highlight=False)
    if not docs:
        console.print("no rollouts")
    for doc in docs:
        console.print(render_status(doc))
    return 0


def run_command(args: argparse.Namespace) -> int:
    body = {"expect_version": args.expect_version} if args.expect_version is not None else {}
    if args.verb == "retire":
        body = {}
    status = client(args).post(f"/rollouts/{args.route}/{args.verb}", body)
    Console(highlight=False).print(render_status(status))
    return 0


def run_events(args: argparse.Namespace) -> int:
    events = client(args).get(f"/rollouts/{args.route}/events?since={args.since}")["events"]
    if args.json:
        for event in events:
            print(json.dumps(event, sort_keys=True))
        return 0
    table = Table("#", "time", "event", "step", "message", title=f"rollout events: {args.route}")
    for e in events:
        table.add_row(str(e["seq"]), str(e.get("time", ""))[11:23], e["kind"], str(e["step"] + 1), escape(e["message"]))
    Console(highlight=False).print(table)
    return 0


def _watch(admin: AdminClient, route: str, args: argparse.Namespace) -> int:
    status = admin.get(f"/rollouts/{route}")
    with Live(render_status(status), refresh_per_second=4, transient=False) as live:
        for _ in range(max(1, args.refreshes)):
            if status["phase"] in TERMINAL:
                break
            time.sleep(args.every)
            status = admin.get(f"/rollouts/{route}")
            live.update(render_status(status))
    return 0 if status["phase"] != "rolled_back" else 1


def _wait_for_signal() -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_controller(args: argparse.Namespace) -> int:
    from server.rollout.standalone import start_controller

    if args.tick <= 0:
        raise InvalidInputError(f"--tick must be > 0 seconds, got {args.tick:g}")
    check_admin_url(args.prometheus, "--prometheus", "http://prometheus:9090")
    token = read_token(args.token_file)
    if token is None and not (args.insecure_admin and args.admin_host == "127.0.0.1"):
        raise PermissionDeniedError(
            f"the controller's admin API has no token (--token-file or $KILN_ADMIN_TOKEN); without one it only "
            f"starts bound to 127.0.0.1 with --insecure-admin (got {args.admin_host!r})"
        )
    with start_controller(
        args.routes_file,
        args.prometheus,
        args.state_dir,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        token=token,
        tick_s=args.tick,
    ) as ctl:
        print(f"kiln rollout controller: admin on {ctl.admin_url}, routes in {args.routes_file}", flush=True)
        _wait_for_signal()
    return 0


def run_sync(args: argparse.Namespace) -> int:
    from server.rollout.standalone import start_route_sync

    if args.interval <= 0:
        raise InvalidInputError(f"--interval must be > 0 seconds, got {args.interval:g}")
    watcher = start_route_sync(args.routes_file, client(args), args.interval)
    try:
        print(f"kiln rollout sync-routes: {args.routes_file} -> {args.admin}", flush=True)
        _wait_for_signal()
    finally:
        watcher.stop()
    return 0


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def render_status(status: dict[str, Any]) -> Group:
    """Header (route, phase, step, weights, reason) + one row per SLO: measured vs limit."""
    steps = status.get("steps") or []
    step = f"{status['step']}/{len(steps)}" if status["step"] > 0 else "-"
    weights = ", ".join(f"{k} {v:g}%" for k, v in status.get("weights", {}).items())
    colour = {"promoted": "green", "rolled_back": "red", "aborted": "red", "paused": "yellow"}
    phase = Text(status["phase"], style=colour.get(status["phase"], "cyan"))
    head = Text.assemble(
        ("rollout ", "bold"),
        (status["route"], "bold"),
        ": ",
        phase,
        f"  step {step} of {steps}  weights: {weights}  (version {status['version']})",
    )
    table = Table("SLO", "measured", "limit", "ok", title=None)
    for row in status.get("slos", []):
        ok = {True: "[green]yes[/]", False: "[red]NO[/]", None: "[dim]waiting[/]"}[row["ok"]]
        if row.get("undecided"):  # over the limit, not yet confirmed by the p99's bounds
            ok = "[yellow]unconfirmed[/]"
        table.add_row(row["name"], _fmt(row["measured"]), f"{row['comparison']} {_fmt(row['limit'])}", ok)
    window = status.get("window") or {}
    traffic = Text(
        f"window {status.get('elapsed_s', 0):.1f}s: baseline {window.get('baseline', {}).get('requests', 0)} req, "
        f"candidate {window.get('candidate', {}).get('requests', 0)} req, "
        f"compared {window.get('compared', 0)}",
        style="dim",
    )
    parts: list[Text | Table] = [head, Text(status.get("reason", ""), style="dim"), table, traffic]
    if status.get("retire"):
        parts.append(Text(f"previous version: {status['retire']['state']}: {status['retire']['message']}"))
    return Group(*parts)
