"""Measured capacity, written into the served version's ``kiln.json`` (``kiln bench --record``).

A version's manifest keeps a list under ``capacity``: one entry per (mode, SLO, request batch,
hardware, variant), the newest measurement replacing an older one with the same key, so a rollout
can compare a candidate's capacity with its baseline's on equal terms and ``kiln deploy autoscale``
can size replicas from it. The file is replaced atomically (``core.atomic_file``); checksums in
the manifest cover the other files, so recording never breaks ``kiln repo verify``.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from builders.manifest import MANIFEST_NAME, read_manifest
from builders.repository import check_model_name, read_model, repository_root
from core.atomic_file import write_atomic
from core.errors import InvalidInputError, NotFoundError, RepositoryError
from runtime.machine import MachineInfo
from server.bench.capacity import CapacityResult

UNITS = {"rate": "requests/s", "concurrency": "requests in flight"}


def hardware_summary(machine: MachineInfo, label: str = "") -> dict[str, Any]:
    """What the capacity was measured on (probed where ``kiln bench`` ran; ``label`` names the server's)."""
    return {
        "label": label or machine.cpu.model,
        "probed_on": "the bench client's machine" + ("" if not label else f"; server given as {label!r}"),
        "cpu": machine.cpu.model,
        "cores": machine.cpu.cores,
        "isa": machine.cpu.isa(),
        "gpus": [f"{g.name} (cc {g.cc})" for g in machine.gpus],
    }


def serving_settings(config: mc.ModelConfig | None) -> dict[str, Any]:
    """The batch settings that shape capacity: max batch size, dynamic batching, instances."""
    if config is None:
        return {}
    settings: dict[str, Any] = {"max_batch_size": config.max_batch_size, "dynamic_batching": None}
    if config.HasField("dynamic_batching"):
        batching = config.dynamic_batching
        settings["dynamic_batching"] = {
            "preferred_batch_size": list(batching.preferred_batch_size),
            "max_queue_delay_microseconds": batching.max_queue_delay_microseconds,
        }
    settings["instances"] = sum(group.count or 1 for group in config.instance_group) or 1
    return settings


def capacity_entry(
    result: CapacityResult,
    *,
    url: str,
    served_model: str,
    variant: str,
    request_batch: int,
    precision: str | None,
    serving: dict[str, Any],
    hardware: dict[str, Any],
    measured: str | None = None,
) -> dict[str, Any]:
    """The manifest entry for one finished search (pure)."""
    if not result.ok or result.capacity is None:
        raise InvalidInputError(f"nothing to record: {result.message}")
    return {
        "mode": result.mode,
        "capacity": result.capacity,
        "unit": UNITS[result.mode],
        "slo": {"p99_ms": result.slo.p99_ms, "error_rate": result.slo.error_rate},
        "outcome": result.outcome,
        "limited_by": result.limited_by,
        "lower_bound": result.limited_by != "server",
        "confidence": {"runs": result.knee_runs, "passes": result.knee_passes, "p99_ms": list(result.knee_p99_ms)},
        "throughput_rps": round(result.knee_throughput_rps, 3),
        "failed_above": result.failed_above,
        "precision": precision,
        "batch": {"request_batch": request_batch, **serving},
        "hardware": hardware,
        "endpoint": {"url": url, "model": served_model, "variant": variant},
        "measured": measured or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def merge_entry(entries: list[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """``entries`` with ``entry`` added, replacing one measured under the same conditions (pure)."""
    kept = [e for e in entries if _key(e) != _key(entry)]
    return [*kept, entry]


def record_capacity(
    repo: Path, model: str, versions_served: tuple[str, ...], version: str, build_entry: Any
) -> tuple[Path, dict[str, Any]]:
    """Write the entry ``build_entry(precision, serving)`` makes into the served version's kiln.json.

    The version is ``version`` if given, else the single version the endpoint reported ready.
    """
    root = repository_root(repo)
    entry_model = read_model(root, check_model_name(model))
    chosen = _choose_version(model, versions_served, version, [v.version for v in entry_model.versions])
    version_dir = entry_model.path / str(chosen)
    manifest = read_manifest(version_dir)
    entry = build_entry(manifest.get("precision"), serving_settings(entry_model.config))
    manifest["capacity"] = merge_entry(list(manifest.get("capacity") or []), entry)
    path = version_dir / MANIFEST_NAME
    try:
        write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())
    except OSError as err:
        raise RepositoryError(f"cannot write {str(path)!r} ({err.strerror}); is the repository writable?") from err
    return path, entry


def _choose_version(model: str, served: tuple[str, ...], version: str, published: list[int]) -> int:
    if version:
        candidates = [version]
    elif len(served) == 1:
        candidates = [served[0]]
    else:
        raise InvalidInputError(
            f"the endpoint reports versions {list(served)} of {model!r}; pass --version to say which one was measured"
        )
    try:
        chosen = int(candidates[0])
    except ValueError as err:
        raise InvalidInputError(f"version {candidates[0]!r} of {model!r} is not a number") from err
    if chosen not in published:
        raise NotFoundError(
            f"version {chosen} of {model!r} is not in the repository (published: {published or 'none'}); "
            "pass the --repo that the endpoint serves, or --record-model for the repository's model name"
        )
    return chosen


def conditions_of(entry: dict[str, Any]) -> tuple[Any, ...]:
    """What two capacities must share to compare: mode, SLO (p99, error rate), request batch, hardware."""
    slo = entry.get("slo") or {}
    return (
        entry.get("mode"),
        slo.get("p99_ms"),
        slo.get("error_rate"),
        (entry.get("batch") or {}).get("request_batch"),
        (entry.get("hardware") or {}).get("label"),
    )


def _key(entry: dict[str, Any]) -> tuple[Any, ...]:
    """One entry per conditions and measured variant."""
    return (*conditions_of(entry), (entry.get("endpoint") or {}).get("variant", ""))
