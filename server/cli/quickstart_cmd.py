"""``kiln quickstart``: Kiln's main job on the embedded CPU default, end to end (about a minute)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "quickstart",
        help="build, serve, route and canary the example model on this CPU (about a minute)",
    )
    parser.add_argument(
        "--repo", type=Path, default=Path("quickstart_repository"), help="repository to create (replaced if it exists)"
    )
    parser.add_argument("--out", type=Path, default=Path("quickstart_output"), help="where the PNG goes")
    parser.add_argument("--interval", type=float, default=None, help="seconds per canary step (default 2; --llm: 3)")
    parser.add_argument(
        "--llm",
        action="store_true",
        help="the token-streaming demo instead: a decoder served token by token, canaried on "
        "TTFT and on greedy token agreement",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.llm:
        from server.llm.quickstart import run_llm_quickstart

        return run_llm_quickstart(args.repo, args.out, Console(highlight=False), interval_s=args.interval or 3.0)
    from server.quickstart import run_quickstart

    return run_quickstart(args.repo, args.out, Console(highlight=False), interval_s=args.interval or 2.0)
