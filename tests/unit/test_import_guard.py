"""With tensorrt, polygraphy and pycuda unimportable, every Kiln module imports and the CLI works.

Runs in a subprocess whose meta-path finder refuses tensorrt, polygraphy, pycuda and cuda-python, exactly as
on a machine without them (even where they are installed).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import contextlib, importlib, io, json, pkgutil, sys

    BLOCKED = ("tensorrt", "polygraphy", "pycuda", "cuda")

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked by the import-guard test")
            return None

    sys.meta_path.insert(0, Refuse())
    for name in BLOCKED:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} was importable despite the guard")

    import builders, core, runtime, server
    imported = []
    for package in (core, runtime, builders, server):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(info.name)
            imported.append(info.name)

    from server.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(["--help"])
        except SystemExit as stop:
            help_code = stop.code
    with contextlib.redirect_stdout(io.StringIO()) as doctor_out:
        doctor_code = main(["doctor", "--json"])
    doctor = json.loads(doctor_out.getvalue())
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"imported": imported, "help_code": help_code, "help": out.getvalue(),
                      "doctor_code": doctor_code, "trt": doctor["machine"]["tensorrt_version"], "leaked": leaked}))
    """
)


def test_everything_imports_and_cli_works_without_tensorrt_and_polygraphy() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    imported = set(result["imported"])
    for module in ("runtime.tensorrt.engine", "builders.tensorrt_build", "builders.hardware",
                   "builders.tensorrt_plan", "runtime.tensorrt.runner", "server.cli.doctor_cmd"):  # fmt: skip
        assert module in imported
    assert result["help_code"] == 0 and "doctor" in result["help"] and "build" in result["help"]
    assert result["doctor_code"] == 0 and result["trt"] is None
    assert result["leaked"] == []
