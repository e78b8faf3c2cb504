"""``kiln build`` flags for decoders with KV cache (served token by token as a decoupled model)."""

from __future__ import annotations

import argparse
from pathlib import Path

from builders.request import DEFAULT_MAX_NEW_TOKENS, DecoderOptions
from core.errors import InvalidInputError


def add_decoder_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoders (LLMs with KV cache, optimum's ONNX layout)")
    group.add_argument(
        "--decoder",
        action="store_true",
        help="build a decoder (implied when the model has past_key_values.* inputs); precision fp32, fp16 or "
        "int8 (dynamic: int8 weights, no calibration data)",
    )
    group.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (default: byte-level)")
    group.add_argument("--max-context", type=int, default=None, help="context length in tokens (default: metadata)")
    group.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"most tokens one request may generate (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    group.add_argument("--stop-token-ids", default="", help="comma-separated token ids that end a sequence")


def decoder_options(args: argparse.Namespace) -> DecoderOptions | None:
    """The decoder options, or None when no decoder flag was given (auto-detection still applies)."""
    given = args.decoder or args.tokenizer or args.max_context or args.stop_token_ids
    if not given and args.max_new_tokens == DEFAULT_MAX_NEW_TOKENS:
        return None
    try:
        stops = tuple(int(t) for t in args.stop_token_ids.replace(" ", "").split(",") if t)
    except ValueError as err:
        raise InvalidInputError(
            f"--stop-token-ids must be comma-separated integers, got {args.stop_token_ids!r}"
        ) from err
    return DecoderOptions(
        tokenizer=args.tokenizer,
        max_context=args.max_context,
        max_new_tokens=args.max_new_tokens,
        stop_token_ids=stops,
    )
