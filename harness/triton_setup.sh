#!/usr/bin/env bash
# Pre-create the venv holding the real Triton 2.51 server (nvidia-pytriton wheel, numpy<2,
# onnxruntime) used by the `triton` tests and the Triton comparison benchmarks.
# Usage: harness/triton_setup.sh [DIR]   (default: $KILN_TRITON_VENV or .kiln-work/triton-venv)
# Idempotent: a valid venv is reused in well under a second; a fresh one takes ~30 s and ~430 MiB.
# Exit codes: 0 ready, 3 the wheel cannot be installed or run here (the tests then skip).
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
exec "$python" -m harness.triton.cli --setup "$@"
