"""``kiln deploy autoscale --model M [--headroom 0.7] [--repo DIR]``: HPAs from the recorded capacity."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from builders.repository import check_model_name, read_model, repository_root
from builders.request import DEFAULT_REPO
from core.errors import InvalidInputError, NotFoundError
from server.autoscale.hpa import UNITS, AutoscaleSpec, gateway_hpa, pick_capacity, triton_hpa


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("deploy", help="Kubernetes manifests derived from measurements (autoscaling)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    auto = verbs.add_parser(
        "autoscale",
        help="print HorizontalPodAutoscalers: Triton on the model's per-pod metric, the gateway on CPU",
    )
    auto.add_argument("--model", required=True, help="repository model whose recorded capacity sets the target")
    auto.add_argument("--repo", type=Path, default=DEFAULT_REPO, help="repository directory")
    auto.add_argument("--version", type=int, default=None, help="version to read (default: the newest with a capacity)")
    auto.add_argument(
        "--metric",
        choices=("rate", "concurrency"),
        default="rate",
        help="scale on requests/s per pod (rate capacity, default) or requests in flight per pod",
    )
    auto.add_argument("--slo-p99-ms", type=float, default=None, help="use the capacity recorded at this SLO")
    auto.add_argument(
        "--headroom",
        type=float,
        default=0.7,
        help="target = capacity x headroom, room for bursts while new pods start (default 0.7)",
    )
    auto.add_argument("--min-replicas", type=int, default=1)
    auto.add_argument("--max-replicas", type=int, default=10)
    auto.add_argument("--namespace", default="default")
    auto.add_argument("--deployment", default="triton", help="the Triton Deployment to scale (default triton)")
    auto.add_argument(
        "--gateway-deployment", default="kiln-gateway", help="the gateway Deployment (default kiln-gateway)"
    )
    auto.add_argument("--gateway-cpu", type=int, default=70, help="gateway target CPU utilization in %% (default 70)")
    auto.add_argument("--out", type=Path, default=None, help="write the YAML here instead of printing it")
    auto.set_defaults(func=run_autoscale)


def run_autoscale(args: argparse.Namespace) -> int:
    entry, where = _recorded(args)
    spec = AutoscaleSpec(
        model=args.model,
        mode=args.metric,
        capacity=float(entry["capacity"]),
        headroom=args.headroom,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        namespace=args.namespace,
        triton_deployment=args.deployment,
        gateway_deployment=args.gateway_deployment,
        gateway_cpu_percent=args.gateway_cpu,
    )
    spec.check()
    slo = entry.get("slo", {})
    header = [
        f"# kiln deploy autoscale: {where}, {args.metric} capacity {spec.capacity:g} {UNITS[args.metric]} per",
        f"# replica at p99 <= {slo.get('p99_ms')} ms, errors <= {float(slo.get('error_rate', 0)) * 100:g} %"
        f" (measured {entry.get('measured', '?')} on {entry.get('hardware', {}).get('label', '?')}),",
        f"# headroom {spec.headroom:g}: target {spec.target:g} per pod. Needs the Prometheus adapter rules in",
        "# deploy/k8s/prometheus-adapter.yaml and Triton's metrics scraped (deploy/k8s/prometheus.yaml).",
    ]
    if entry.get("lower_bound"):
        header.append(f"# WARNING: the capacity is a lower bound ({entry.get('limited_by')}'s limit, not the server's)")
    text = "\n".join(header) + "\n" + yaml.safe_dump_all([triton_hpa(spec), gateway_hpa(spec)], sort_keys=False)
    if args.out:
        try:
            args.out.write_text(text)
        except OSError as err:
            raise InvalidInputError(f"cannot write --out {str(args.out)!r}: {err.strerror}") from err
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def _recorded(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The capacity entry to use and where it came from."""
    entry = read_model(repository_root(args.repo), check_model_name(args.model))
    versions = [v for v in entry.versions if args.version is None or v.version == args.version]
    if not versions:
        published = [v.version for v in entry.versions] or "none"
        raise NotFoundError(f"{args.model!r} has no version {args.version} (published: {published})")
    problems = []
    for version in reversed(versions):
        where = f"{args.model} version {version.version}"
        try:
            return pick_capacity(
                list((version.manifest or {}).get("capacity") or []), args.metric, args.slo_p99_ms, where
            ), where
        except NotFoundError as err:
            problems.append(err)
    raise problems[0]
