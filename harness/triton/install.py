"""The Triton venv: ``nvidia-pytriton`` (Triton 2.51 binary), ``numpy<2`` and ``onnxruntime``.

``ensure_triton_venv`` builds it once (idempotent, under a file lock) and returns a
``TritonInstall`` naming the binary, a Python-backend directory holding the stub for the venv's
Python, the wheel's bundled libraries and the directory of ``libpython3.X.so``.

Why the environment matters: the Python-backend stub embeds ``libpython3.X.so`` (found through
``LD_LIBRARY_PATH``) and locates its ``site-packages`` by looking up ``python3`` on ``PATH``. With
the venv's ``bin`` not first on ``PATH`` the stub runs against another interpreter's packages, and
tensors can come back silently wrong. ``triton_env`` sets both and drops ``PYTHONPATH``/``PYTHONHOME``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core.errors import InvalidInputError, MissingDependencyError

logger = logging.getLogger(__name__)

# nvidia-pytriton 0.7.0 ships Triton 2.51; it requires numpy<2 (its stub's C extension is built
# against numpy 1.x). onnxruntime 1.32.0 imports and runs with numpy 1.26.4.
REQUIREMENTS: tuple[str, ...] = ("nvidia-pytriton==0.7.0", "numpy>=1.21,<2", "onnxruntime>=1.17")
STAMP = "kiln-triton.json"
BACKENDS = "kiln-triton-backends"
SUPPORTED_MACHINES = ("x86_64", "aarch64")
INSTALL_TIMEOUT_S = 1800.0

_PROBE = """
import importlib.metadata as md, importlib.util, json, sys, sysconfig
spec = importlib.util.find_spec("pytriton")
import numpy, onnxruntime
print(json.dumps({
    "python_version": "%d.%d" % sys.version_info[:2],
    "libdir": sysconfig.get_config_var("LIBDIR"),
    "ldlibrary": sysconfig.get_config_var("LDLIBRARY"),
    "shared": bool(sysconfig.get_config_var("Py_ENABLE_SHARED")),
    "pytriton_dir": list(spec.submodule_search_locations)[0] if spec else None,
    "pytriton_version": md.version("nvidia-pytriton") if spec else None,
    "numpy_version": numpy.__version__,
    "onnxruntime_version": onnxruntime.__version__,
}))
"""


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of a usable Triton installation are."""

    venv: Path
    tritonserver: Path  # the binary
    backends_dir: Path  # holds python/ with libtriton_python.so and this Python's stub
    libs_dir: Path  # the wheel's nvidia_pytriton.libs
    python_libdir: Path  # holds libpython3.X.so for the stub
    cache_dir: Path
    versions: Mapping[str, str]  # python, nvidia-pytriton, numpy, onnxruntime

    @property
    def bin_dir(self) -> Path:
        return self.venv / "bin"


def default_venv_path() -> Path:
    """``$KILN_TRITON_VENV`` if set, else ``<repo root>/.kiln-work/triton-venv`` (gitignored) when
    running from a checkout, else ``~/.cache/kiln/triton-venv``."""
    configured = os.environ.get("KILN_TRITON_VENV")
    if configured:
        return Path(configured)
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():
        return root / ".kiln-work" / "triton-venv"
    return Path.home() / ".cache" / "kiln" / "triton-venv"


def triton_env(install: TritonInstall, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the ``tritonserver`` process (and so for its Python-backend stubs)."""
    env = dict(os.environ if base is None else base)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "CONDA_PREFIX"):
        env.pop(name, None)
    env["VIRTUAL_ENV"] = str(install.venv)
    env["PYTHONNOUSERSITE"] = "1"
    env["PATH"] = os.pathsep.join(p for p in (str(install.bin_dir), env.get("PATH", "")) if p)
    libs = [str(install.python_libdir), str(install.libs_dir), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    return env


def ensure_triton_venv(path: Path, *, requirements: tuple[str, ...] = REQUIREMENTS) -> TritonInstall:
    """Create (or reuse, when present and valid) the Triton venv at ``path``; return its layout.

    A venv is reused when its stamp records the same requirements and it passes the checks
    (imports work, numpy < 2, the binary starts). Otherwise it is removed and rebuilt. Raises
    MissingDependencyError when this machine cannot run the wheel (OS/arch, a Python without a
    shared libpython, no package index).
    """
    path = Path(path).absolute()
    _check_platform()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(path.name + ".lock")):
        if _stamp_matches(path, requirements):
            try:
                return _inspect(path)
            except MissingDependencyError as err:
                logger.warning("Triton venv %s is unusable (%s); rebuilding it", path, err)
        _remove_old_venv(path)
        started = time.perf_counter_ns()
        _create(path, requirements)
        install = _inspect(path)
        elapsed_s = (time.perf_counter_ns() - started) / 1e9
        stamp = {
            "requirements": list(requirements),
            "versions": dict(install.versions),
            "install_s": elapsed_s,
        }
        (path / STAMP).write_text(json.dumps(stamp, indent=2), encoding="utf-8")
        logger.info("created Triton venv %s in %.1f s", path, elapsed_s)
        return install


def _remove_old_venv(path: Path) -> None:
    """Remove what is at ``path`` only if it is a venv (or a leftover of one): never anything else."""
    if not path.exists():
        return
    if not path.is_dir() or (any(path.iterdir()) and not (path / "pyvenv.cfg").is_file()):
        raise InvalidInputError(
            f"{str(path)!r} exists and is not a venv; give ensure_triton_venv a new or venv directory"
        )
    shutil.rmtree(path)


def _check_platform() -> None:
    machine = platform.machine()
    if not sys.platform.startswith("linux") or machine not in SUPPORTED_MACHINES:
        raise MissingDependencyError(
            f"the nvidia-pytriton wheel (Triton server binary) exists only for Linux "
            f"{'/'.join(SUPPORTED_MACHINES)}; this is {sys.platform}/{machine}: run Triton elsewhere"
        )


class _locked:
    """An exclusive flock on ``lock_path`` (two test sessions never build the venv at once)."""

    def __init__(self, lock_path: Path) -> None:
        self._path = lock_path
        self._fd = -1

    def __enter__(self) -> None:
        import fcntl

        self._fd = os.open(self._path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # closing releases the lock


def _stamp_matches(path: Path, requirements: tuple[str, ...]) -> bool:
    try:
        stamp = json.loads((path / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp.get("requirements") == list(requirements)


def _run(args: list[str], what: str, timeout_s: float, env: Mapping[str, str] | None = None) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise MissingDependencyError(f"{what} failed: {err}") from err
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise MissingDependencyError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def _create(path: Path, requirements: tuple[str, ...]) -> None:
    # Run from a venv, the venv module bases the new venv on the base interpreter.
    _run([sys.executable, "-m", "venv", str(path)], f"creating the venv {path}", 300.0)
    python = str(path / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--quiet"]
    pip += ["--timeout", "60", "--retries", "2"]  # fail in minutes, not a quarter hour, when offline
    what = f"pip install {' '.join(requirements)} into {path} (is the package index reachable?)"
    _run([*pip, *requirements], what, INSTALL_TIMEOUT_S)


def _inspect(path: Path) -> TritonInstall:
    """Locate the pieces, prepare the backends dir, and check that the binary starts."""
    python = path / "bin" / "python"
    if not python.exists():
        raise MissingDependencyError(f"{python} does not exist")
    probe = json.loads(_run([str(python), "-c", _PROBE], f"probing {python}", 120.0))
    if not probe["pytriton_dir"]:
        raise MissingDependencyError(f"nvidia-pytriton is not installed in {path}")
    if int(probe["numpy_version"].split(".")[0]) >= 2:
        raise MissingDependencyError(
            f"numpy {probe['numpy_version']} in {path}; Triton's Python-backend stub needs numpy<2"
        )
    if not probe["shared"]:
        raise MissingDependencyError(
            f"the Python behind {path} ({probe['python_version']}) has no shared libpython, which "
            "Triton's Python-backend stub links against; use a Python built with --enable-shared"
        )
    libpython = Path(probe["libdir"]) / probe["ldlibrary"]
    if not libpython.exists():
        raise MissingDependencyError(f"{libpython} (the stub's libpython) does not exist")
    dist = Path(probe["pytriton_dir"]) / "tritonserver"
    stub = dist / "python_backend_stubs" / probe["python_version"] / "triton_python_backend_stub"
    binary = dist / "bin" / "tritonserver"
    libs = Path(probe["pytriton_dir"]).parent / "nvidia_pytriton.libs"
    for needed in (binary, stub, libs, dist / "backends" / "python" / "libtriton_python.so"):
        if not needed.exists():
            raise MissingDependencyError(
                f"{needed} is missing from nvidia-pytriton {probe['pytriton_version']} (no stub for "
                f"Python {probe['python_version']}?); use Python 3.8-3.13"
            )
    backends = _prepare_backends(path, dist, stub)
    install = TritonInstall(
        venv=path,
        tritonserver=binary,
        backends_dir=backends,
        libs_dir=libs,
        python_libdir=Path(probe["libdir"]),
        cache_dir=dist / "caches",
        versions={
            "python": probe["python_version"],
            "nvidia-pytriton": probe["pytriton_version"],
            "numpy": probe["numpy_version"],
            "onnxruntime": probe["onnxruntime_version"],
        },
    )
    _check_binary(install)
    return install


def _check_binary(install: TritonInstall) -> None:
    """The binary loads its libraries and prints its usage (``--help`` exits 1 by design)."""
    args = [str(install.tritonserver), "--help"]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=60.0, env=triton_env(install))
    except (OSError, subprocess.TimeoutExpired) as err:
        raise MissingDependencyError(f"running {install.tritonserver} failed: {err}") from err
    if "Usage: tritonserver" not in done.stdout + done.stderr:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-10:])
        raise MissingDependencyError(
            f"{install.tritonserver} does not start on this machine (exit {done.returncode}):\n{tail}"
        )


def _copy_if_changed(source: Path, dest: Path) -> None:
    """Copy unless identical; replace by rename, never by writing over a file a running server
    may be executing (that fails with ETXTBSY, 'Text file busy')."""
    if dest.exists() and dest.stat().st_size == source.stat().st_size and dest.read_bytes() == source.read_bytes():
        return
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.copy2(source, tmp)
    os.replace(tmp, dest)


def _prepare_backends(venv: Path, dist: Path, stub: Path) -> Path:
    """A backends dir whose python/ holds the backend library, its utils and this Python's stub.

    The wheel keeps the stubs aside per Python version; Triton looks for the stub next to
    ``libtriton_python.so``, so (like pytriton itself) we assemble a copy.
    """
    backends = venv / BACKENDS
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in (dist / "backends" / "python").iterdir():
        if source.is_file():
            _copy_if_changed(source, python_dir / source.name)
    _copy_if_changed(stub, python_dir / "triton_python_backend_stub")
    return backends


def directory_bytes(path: Path) -> int:
    """Total size of the regular files under ``path`` (symlinks not followed)."""
    return sum(p.lstat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())
