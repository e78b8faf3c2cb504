"""The ``kiln`` command line: one module per command group, errors mapped to exit codes here.

Handlers are configured once here (``entry``); nothing reads argv or the environment at import.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from core import errors

# Each module exposes register(subparsers); order is the order of `kiln --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "server.cli.quickstart_cmd",
    "server.cli.inspect_cmd",
    "server.cli.build_cmd",
    "server.cli.repo_cmd",
    "server.cli.serve_cmd",
    "server.cli.bench_cmd",
    "server.cli.doctor_cmd",
    "server.cli.calib_cmd",
    "server.cli.gateway_cmd",
    "server.cli.routes_cmd",
    "server.cli.rollout_cmd",
    "server.cli.deploy_cmd",
)

# One exit code per error class (2 is also argparse's usage error).
EXIT_CODES: dict[type[errors.KilnError], int] = {
    errors.KilnError: 1,
    errors.InvalidInputError: 2,
    errors.NotFoundError: 3,
    errors.RepositoryError: 4,
    errors.AccuracyGateError: 5,
    errors.MissingDependencyError: 6,
    errors.IncompatibleEngineError: 7,
    errors.UnavailableError: 8,
    errors.ResourceExhaustedError: 9,
    errors.PermissionDeniedError: 10,
    errors.ConflictError: 11,
}


def exit_code(err: errors.KilnError) -> int:
    """Exit code of the most specific class of ``err`` in the table."""
    for cls in type(err).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]  # type: ignore[index]
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Optimize ONNX models into engines, publish them to a Triton repository, serve and roll them out.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one kiln command; returns the process exit code (no traceback for Kiln errors)."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except errors.KilnError as err:
        console = Console(stderr=True, highlight=False, soft_wrap=True)
        console.print(f"[bold red]error:[/] {escape(str(err))}", markup=True)
        return exit_code(err)
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """Console-script entry point: configure logging once, then run."""
    verbosity = sum(1 for a in sys.argv[1:] if a in ("-v", "--verbose")) + 2 * sum(
        1 for a in sys.argv[1:] if a == "-vv"
    )
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `kiln ... | head`: the reader left; stop quietly like other Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
    sys.exit(code)
