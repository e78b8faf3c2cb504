"""``kiln build MODEL.onnx --name NAME --precision P --target T [...]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from builders.pipeline import build_model
from builders.request import DEFAULT_REPO, PRECISIONS, TARGETS, BuildRequest, BuildResult
from server.cli.decoder_args import add_decoder_arguments, decoder_options
from server.cli.int8_args import add_int8_arguments, int8_options
from server.cli.tensorrt_args import add_tensorrt_arguments, tensorrt_options


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("build", help="optimize an ONNX model and publish it to the model repository")
    parser.add_argument("model", type=Path, help="source .onnx file")
    parser.add_argument("--name", required=True, help="model name; the Triton model is NAME-PRECISION-TARGET")
    parser.add_argument("--precision", default="fp32", help=f"one of {', '.join(PRECISIONS)} (default fp32)")
    parser.add_argument("--target", default="ort", help=f"one of {', '.join(TARGETS)} (default ort)")
    parser.add_argument(
        "--repo", type=Path, default=DEFAULT_REPO, help=f"Triton model repository (default {DEFAULT_REPO}/)"
    )
    parser.add_argument("--max-batch", type=int, default=None, help="Triton max_batch_size (default 32)")
    parser.add_argument("--instances", type=int, default=1, help="instance_group count")
    parser.add_argument(
        "--keep-versions",
        default=None,
        help="versions that stay servable, for a new model: N latest (default 2, so a rollout can canary the "
        "new one against the one before), 'all', or 'specific:1,2'; an existing model keeps its policy "
        "(change it with 'kiln repo policy')",
    )
    add_int8_arguments(parser)
    add_tensorrt_arguments(parser)
    add_decoder_arguments(parser)
    parser.set_defaults(func=run)


def request_from_args(args: argparse.Namespace) -> BuildRequest:
    return BuildRequest(
        model=args.model,
        name=args.name,
        precision=args.precision,
        target=args.target,
        repo=args.repo,
        max_batch=args.max_batch,
        instances=args.instances,
        int8=int8_options(args),
        tensorrt=tensorrt_options(args),
        keep_versions=args.keep_versions,
        decoder=decoder_options(args),
    )


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    result = build_model(request_from_args(args))
    print_result(result, console)
    return 0


def print_result(result: BuildResult, console: Console) -> None:
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if result.published is not None:
        p = result.published
        console.print(f"published [bold]{p.model}[/] version {p.version} at {escape(str(p.path))}")
    agreement = result.report.get("token_agreement")
    if agreement:
        console.print(
            f"token agreement with the source (greedy, {agreement['prompts']} prompts x "
            f"{agreement['tokens_per_prompt']} tokens): exact match {agreement['exact_match_rate']:.0%}, "
            f"first divergence {agreement['first_divergence']}"
        )
    validation = result.report.get("validation")
    if validation:
        verdict = "passed" if validation["passed"] else "FAILED (overridden)"
        console.print(
            f"validation: {validation['metric']} drop {validation['drop']:.4f} "
            f"(budget {validation['max_drop']:.4f}) {verdict}"
        )
