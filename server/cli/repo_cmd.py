"""``kiln repo list|show|verify [--repo DIR]`` and ``kiln repo policy NAME [--keep-versions N|all|specific:1,2]``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from builders.repository import (
    VersionInfo,
    check_model_name,
    clean_leftovers,
    find_repository_leftovers,
    list_models,
    read_model,
    repository_root,
    verify_repository,
)
from builders.request import DEFAULT_REPO
from builders.version_policy import change_policy, read_policy
from core.errors import RepositoryError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("repo", help="list, show or verify a Triton model repository")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, helptext in (
        ("list", "models, their versions and precisions"),
        ("show", "one model's config and manifests"),
        ("verify", "re-check checksums and config vs artifacts"),
    ):
        p = verbs.add_parser(verb, help=helptext)
        p.add_argument("--repo", type=Path, default=DEFAULT_REPO, help="repository directory")
        p.add_argument("--json", action="store_true", help="print JSON")
        if verb == "show":
            p.add_argument("model", help="model name, e.g. digits-fp32-ort")
        if verb == "verify":
            p.add_argument(
                "--clean", action="store_true", help="remove stages left by killed publishes (never ones in flight)"
            )
        p.set_defaults(func={"list": run_list, "show": run_show, "verify": run_verify}[verb])
    policy = verbs.add_parser("policy", help="show or change which versions of a model stay servable")
    policy.add_argument("model", help="model name, e.g. digits-int8-ort")
    policy.add_argument("--repo", type=Path, default=DEFAULT_REPO, help="repository directory")
    policy.add_argument(
        "--keep-versions",
        help="N latest versions (e.g. 2), 'all', or 'specific:1,2'; rewrites config.pbtxt atomically "
        "(omit to show the current policy)",
    )
    policy.add_argument("--json", action="store_true", help="print JSON")
    policy.set_defaults(func=run_policy)


def run_list(args: argparse.Namespace) -> int:
    entries = list_models(args.repo)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "model": e.name,
                        "versions": [v.version for v in e.versions],
                        "platform": e.config.platform if e.config else None,
                        "precision": (e.versions[-1].manifest or {}).get("precision") if e.versions else None,
                    }
                    for e in entries
                ],
                indent=2,
            )
        )
        return 0
    table = Table("model", "platform", "versions", "latest precision", "latest size", title=escape(str(args.repo)))
    for e in entries:
        latest = e.versions[-1] if e.versions else None
        manifest = (latest.manifest or {}) if latest else {}
        size = sum(int(f.get("bytes", 0)) for f in manifest.get("files", {}).values())
        table.add_row(
            escape(e.name),
            escape(e.config.platform) if e.config else f"[red]{escape(str(e.config_error))}[/]",
            ",".join(str(v.version) for v in e.versions) or "-",
            escape(str(manifest.get("precision", "-"))),
            f"{size / 1e3:.1f} kB" if size else "-",
        )
    Console(highlight=False).print(table)
    return 0


def run_show(args: argparse.Namespace) -> int:
    entry = read_model(repository_root(args.repo), check_model_name(args.model))
    data = {
        "model": entry.name,
        "path": str(entry.path),
        "config": json_format.MessageToDict(entry.config) if entry.config else None,
        "config_error": entry.config_error,
        "versions": {str(v.version): v.manifest for v in entry.versions},
    }
    print(json.dumps(data, indent=2, default=str))
    if not args.json:
        print_capacity(entry.versions)
    return 0


def print_capacity(versions: Sequence[VersionInfo]) -> None:
    """A table of the capacities ``kiln bench --find-capacity --record`` stored, if any."""
    rows = [(v.version, c) for v in versions for c in ((v.manifest or {}).get("capacity") or [])]
    if not rows:
        return
    table = Table(
        "version",
        "capacity",
        "SLO",
        "limited by",
        "precision",
        "batch",
        "hardware",
        "measured",
        title="capacity (kiln bench --find-capacity --record)",
    )
    for version, c in rows:
        slo = c.get("slo", {})
        batch = c.get("batch", {})
        table.add_row(
            str(version),
            escape(f"{c.get('capacity'):g} {c.get('unit', '')}" if c.get("capacity") else "-"),
            escape(f"p99 <= {slo.get('p99_ms'):g} ms, errors <= {float(slo.get('error_rate', 0)) * 100:g} %"),
            escape(str(c.get("limited_by", "?"))),
            escape(str(c.get("precision", "?"))),
            escape(f"request {batch.get('request_batch')}, max {batch.get('max_batch_size')}"),
            escape(str(c.get("hardware", {}).get("label", "?"))),
            escape(str(c.get("measured", "?"))),
        )
    Console(highlight=False, width=160).print(table)


def run_verify(args: argparse.Namespace) -> int:
    problems = verify_repository(args.repo)
    leftovers = clean_leftovers(args.repo) if args.clean else find_repository_leftovers(args.repo)
    notes = [f"{leftover.describe()}; {'removed' if args.clean else 'remove with --clean'}" for leftover in leftovers]
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems, "leftovers": notes}, indent=2))
    elif notes:
        for note in notes:
            print(f"NOTE {note}")
    if problems:
        if not args.json:
            for p in problems:
                print(f"FAIL {p}")
        raise RepositoryError(f"repository {str(args.repo)!r} failed verification with {len(problems)} problem(s)")
    if not args.json:
        print(f"OK {args.repo}: every config parses, every checksum and artifact matches")
    return 0


def run_policy(args: argparse.Namespace) -> int:
    if args.keep_versions is None:
        change = read_policy(args.repo, args.model)
    else:
        change = change_policy(args.repo, args.model, args.keep_versions)
    if args.json:
        print(
            json.dumps(
                {
                    "model": change.model,
                    "old": change.old,
                    "policy": change.new,
                    "versions": list(change.versions),
                    "served": list(change.served),
                },
                indent=2,
            )
        )
        return 0
    what = f"{change.old} -> {change.new}" if args.keep_versions is not None else change.new
    print(f"{change.model}: version policy {what}; serves versions {list(change.served)} of {list(change.versions)}")
    if args.keep_versions is not None:
        print("servers in poll mode pick this up on their next scan; explicit mode: load the model again")
    return 0
