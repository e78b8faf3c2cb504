"""``kiln quickstart``: Kiln's main job on the embedded CPU default, end to end."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from rich.console import Console

from builders.examples import example_model_path
from builders.pipeline import BuildRequest, build_model
from server.cli.build_cmd import print_result
from server.cli.repo_cmd import run_list


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("quickstart", help="build the example model into a fresh repository and serve it")
    parser.add_argument("--repo", type=Path, default=Path("quickstart_repository"), help="repository to create")
    parser.add_argument("--keep", action="store_true", help="add to an existing repository instead of replacing it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    repo: Path = args.repo
    if repo.exists() and not args.keep:
        shutil.rmtree(repo)
    model = example_model_path()
    console.rule("[bold]1. build the example model (digits CNN)")
    for precision in ("fp32", "fp16"):
        result = build_model(BuildRequest(model=model, name="digits", precision=precision, target="ort", repo=repo))
        print_result(result, console)
    console.rule("[bold]2. the repository")
    run_list(argparse.Namespace(repo=repo, json=False))
    console.print(f"\nnext: [bold]kiln repo verify --repo {repo}[/], [bold]kiln inspect {model}[/]")
    return 0
