"""What every ``kiln bench`` mode shares: levels run under a progress bar, results written as asked."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from core.errors import InvalidInputError


class Written(Protocol):
    """A bench result that can be written as JSON and CSV."""

    def to_dict(self) -> dict[str, Any]: ...

    def to_csv(self) -> str: ...


R = TypeVar("R", bound=Written)


def run_levels(
    title: str, model: str, levels: Sequence[object], run: Callable[[Callable[[Any], None]], R], console: Console
) -> R:
    """``run(on_point)`` with a progress bar advanced once per load level."""
    with Progress(
        TextColumn(f"[bold]{title}[/] {{task.description}}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(f"{model}: {len(levels)} load level(s)", total=len(levels))
        return run(lambda _: progress.advance(task))


def write_outputs(args: argparse.Namespace, result: R, plot: Callable[[R, Path], object], console: Console) -> None:
    """``--json``, ``--csv`` and ``--plot``, each when given; an unwritable path is one clear error."""
    try:
        if args.json:
            args.json.write_text(json.dumps(result.to_dict(), indent=2))
        if args.csv:
            args.csv.write_text(result.to_csv())
    except OSError as err:
        raise InvalidInputError(f"cannot write {err.filename!r}: {err.strerror}; pass a writable path") from err
    if args.plot:
        plot(result, args.plot)
        console.print(f"plot written to {args.plot}")
