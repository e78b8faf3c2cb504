"""``kiln routes show|set``: read and change a running gateway's routes through its admin API."""

from __future__ import annotations

import argparse
import json
import math
import urllib.parse
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.errors import InvalidInputError, NotFoundError
from server.gateway.client import DEFAULT_ADMIN_URL, DEFAULT_TOKEN_ENV, AdminClient, read_token
from server.gateway.config import yaml_error_text


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("routes", help="show or change a running gateway's routes (admin API)")
    sub = parser.add_subparsers(dest="routes_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="routes, weights and (with --stats) per-variant figures")
    _connection(show)
    show.add_argument("--stats", action="store_true", help="add requests, error rate and p99 per variant")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(func=run_show)
    change = sub.add_parser("set", help="change one route's weights, or replace it from a YAML/JSON file")
    _connection(change)
    change.add_argument("model", help="public model name")
    group = change.add_mutually_exclusive_group(required=True)
    group.add_argument("--weights", help="variant=weight pairs adding up to 100, e.g. fp32=90,int8=10")
    group.add_argument("--file", type=Path, help="the whole route (variants, sticky, shadow) as YAML/JSON")
    change.add_argument("--reason", default="kiln routes set", help="logged with the change")
    change.set_defaults(func=run_set)


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin", default=DEFAULT_ADMIN_URL, help=f"admin API URL (default {DEFAULT_ADMIN_URL})")
    parser.add_argument("--token-file", type=Path, help=f"bearer token file (default: ${DEFAULT_TOKEN_ENV})")
    parser.add_argument("--ca", type=Path, help="CA certificate for an https admin URL")


def check_admin_url(url: str, flag: str = "--admin", example: str = DEFAULT_ADMIN_URL) -> str:
    """An HTTP API URL must be http(s)://HOST:PORT; anything else is refused before a request."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInputError(
            f"{flag} {url!r} is not an HTTP URL; use http://HOST:PORT (or https://), e.g. {example}"
        )
    return url


def client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(check_admin_url(args.admin), read_token(args.token_file), args.ca)


def parse_weights(text: str) -> dict[str, float]:
    """``"fp32=90,int8=10"`` -> ``{"fp32": 90.0, "int8": 10.0}``."""
    weights: dict[str, float] = {}
    for pair in text.split(","):
        name, sep, value = (part.strip() for part in pair.partition("="))
        try:
            weight = float(value)
        except ValueError as err:
            raise InvalidInputError(f"--weights item {pair!r} must be variant=number, e.g. fp32=90") from err
        if not sep or not name:
            raise InvalidInputError(f"--weights item {pair!r} must be variant=number, e.g. fp32=90")
        if not math.isfinite(weight):
            raise InvalidInputError(f"--weights item {pair!r} is not a finite number; use 0..100")
        if name in weights:
            raise InvalidInputError(f"--weights names variant {name!r} twice in {text!r}; name each once")
        weights[name] = weight
    return weights


def run_show(args: argparse.Namespace) -> int:
    admin = client(args)
    routes = admin.get("/routes")
    stats = admin.get("/stats") if args.stats else None
    if args.json:
        print(json.dumps({"routes": routes, "stats": stats} if stats else routes, indent=2, sort_keys=True))
        return 0
    table = Table(title=f"gateway routes (version {routes['version']})")
    for column in ("model", "variant", "weight", "upstream", "upstream model", "extra"):
        table.add_column(column)
    if stats:
        for column in ("requests", "error rate", "p99 ms"):
            table.add_column(column, justify="right")
    for model, route in routes["routes"].items():
        for index, variant in enumerate(route["variants"]):
            extra = _extra(route, variant["name"], index)
            row = [model, variant["name"], f"{variant['weight']:g}", variant["upstream"],
                   variant["model"] + (f":{variant['version']}" if variant.get("version") else ""), extra]  # fmt: skip
            if stats:
                window = stats["routes"].get(model, {}).get("variants", {}).get(variant["name"], {}).get("window", {})
                row += [str(window.get("requests", 0)), f"{window.get('error_rate', 0.0):.2%}",
                        f"{window.get('total', {}).get('p99_ms', 0.0):.2f}"]  # fmt: skip
            table.add_row(*(escape(cell) for cell in row))
    Console().print(table)
    return 0


def _extra(route: dict[str, Any], variant: str, index: int) -> str:
    notes = ["baseline"] if index == 0 else []
    if route.get("shadow", {}).get("variant") == variant:
        notes.append(f"shadow {route['shadow']['percent']:g}%")
    if index == 0 and route.get("sticky"):
        notes.append(f"sticky {route['sticky']}")
    return ", ".join(notes)


def run_set(args: argparse.Namespace) -> int:
    admin = client(args)
    if args.weights:
        result = admin.post(
            f"/routes/{args.model}/weights", {"weights": parse_weights(args.weights), "reason": args.reason}
        )
    else:
        try:
            route = yaml.safe_load(Path(args.file).read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise NotFoundError(f"cannot read route file {str(args.file)!r}: {err.strerror}") from err
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidInputError(f"cannot read route file {str(args.file)!r} as YAML/JSON text: {err}") from err
        except yaml.YAMLError as err:
            raise InvalidInputError(
                f"route file {str(args.file)!r} is not valid YAML/JSON ({yaml_error_text(err)})"
            ) from err
        result = admin.put(f"/routes/{args.model}", route)
    variants = result["routes"][args.model]["variants"]
    weights = ", ".join(f"{v['name']}={v['weight']:g}" for v in variants)
    print(f"route {args.model} is now {weights} (routes version {result['version']})")
    return 0
