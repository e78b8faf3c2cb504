"""Publishing under faults: a process killed at a chosen step, and publishes on a filling disk.

``python -m harness.publish_faults kill REPO MODEL_ONNX STEP [MAX_BATCH]`` publishes ``lin-fp32-ort`` into REPO
and SIGKILLs itself just before step number STEP (1-based; the hook is the only seam, no
environment variables). ``python -m harness.publish_faults diskfull WORKDIR`` must run as root of
its own mount namespace (``unshare --user --map-root-user --mount``): it mounts a small tmpfs,
publishes a first version, then retries a second publish with the filesystem shrunk to every
budget from zero extra pages (and zero extra inodes) upwards until one fits, and finally runs
``kiln build`` with one page left, printing one JSON line per attempt.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from builders.examples import example_model_path
from builders.manifest import build_manifest
from builders.model_config import ServingOptions, render_config
from builders.publish import Published, publish_version
from builders.repository import find_repository_leftovers, verify_repository
from builders.tensors import TensorSpec
from core.errors import KilnError
from harness.models import make_linear_model, tree_snapshot

NAME = "lin-fp32-ort"
OUTPUTS = (TensorSpec("probs", "float32", ("batch", 3)),)


def publish_linear(
    repo: Path,
    artifact: Path,
    name: str = NAME,
    hook: Callable[[str], None] | None = None,
    *,
    width: int = 4,
    max_batch_size: int = 8,
) -> Published:
    """Publish ``artifact`` (a linear model of ``width`` inputs) as a new version of ``name``."""
    inputs = (TensorSpec("x", "float32", ("batch", width)),)
    config = render_config(name, "ort", inputs, OUTPUTS, ServingOptions(max_batch_size=max_batch_size))
    manifest = build_manifest(
        model_name=name, source_path=artifact, source_sha256="abc", precision="fp32",
        target="ort", artifact="model.onnx", files={},
    )  # fmt: skip
    return publish_version(repo, name, {"model.onnx": artifact}, config, manifest, hook=hook)


def record_steps(repo: Path, artifact: Path) -> list[str]:
    """The steps of one successful publish, in order."""
    steps: list[str] = []
    publish_linear(repo, artifact, hook=steps.append)
    return steps


def kill_at(repo: Path, artifact: Path, step: int, max_batch_size: int = 8) -> None:
    """Publish, and SIGKILL this process just before hook call number ``step``."""
    calls = 0

    def hook(name: str) -> None:
        nonlocal calls
        calls += 1
        if calls == step:
            os.kill(os.getpid(), signal.SIGKILL)

    publish_linear(repo, artifact, hook=hook, max_batch_size=max_batch_size)


def disk_full(work: Path) -> None:
    """Shrink a private tmpfs to every budget until a publish fits; one JSON line per attempt."""
    mount = work / "fs"
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,nr_inodes=200", "tmpfs", str(mount)], check=True)
    artifact = make_linear_model(mount / "linear.onnx")
    repo = mount / "repo"
    publish_linear(repo, artifact)
    for kind in ("size", "nr_inodes"):
        for extra in range(64):
            used = _used(mount)
            limit = used[0] + extra * 4096 if kind == "size" else used[1] + extra
            other = "size=4m" if kind == "nr_inodes" else "nr_inodes=200"
            subprocess.run(["mount", "-o", f"remount,{kind}={limit},{other}", str(mount)], check=True)
            before = tree_snapshot(repo)
            result: dict[str, object] = {"kind": kind, "extra": extra}
            try:
                batch = (16 if kind == "size" else 116) + extra  # a new config.pbtxt each time, so it is written
                result["version"] = publish_linear(repo, artifact, max_batch_size=batch).version
            except KilnError as err:
                result["error"] = f"{type(err).__name__}: {err}"
                result["unchanged"] = tree_snapshot(repo) == before
            result["verify"] = verify_repository(repo)
            result["leftovers"] = [leftover.describe() for leftover in find_repository_leftovers(repo)]
            print(json.dumps(result), flush=True)
            if "version" in result:
                break
        subprocess.run(["mount", "-o", "remount,size=4m,nr_inodes=200", str(mount)], check=True)
    _build_on_full_disk(mount, repo)


def _build_on_full_disk(mount: Path, repo: Path) -> None:
    """``kiln build`` of the example into a repository with one page left: its exit code and stderr."""
    from server.cli import main as kiln

    used = _used(mount)[0]
    subprocess.run(["mount", "-o", f"remount,size={used + 4096},nr_inodes=200", str(mount)], check=True)
    before = tree_snapshot(repo)
    stderr = io.StringIO()
    argv = ["build", str(example_model_path()), "--name", "digits", "--precision", "fp32", "--repo", str(repo)]
    with contextlib.redirect_stderr(stderr):
        code = kiln(argv)
    result = {"kind": "cli", "exit": code, "stderr": stderr.getvalue(), "unchanged": tree_snapshot(repo) == before}
    print(json.dumps(result | {"verify": verify_repository(repo)}), flush=True)


def _used(mount: Path) -> tuple[int, int]:
    """Bytes (whole pages) and inodes in use on ``mount``."""
    stat = os.statvfs(mount)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize, stat.f_files - stat.f_ffree


def main(argv: list[str]) -> int:
    if argv[:1] == ["kill"] and len(argv) in (4, 5):
        kill_at(Path(argv[1]), Path(argv[2]), int(argv[3]), *(int(a) for a in argv[4:]))
        return 0
    if argv[:1] == ["diskfull"] and len(argv) == 2:
        disk_full(Path(argv[1]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
