"""Helpers for the LLM streaming tests and benchmarks: a repository of tiny decoders (the baseline, a
byte-identical rebuild, one with a slower first token, one with other weights), a runner hook that
delays the prompt step, and a child ``kiln serve`` with that hook. The stream load is
``server.llm.load.StreamLoad`` (the quickstart uses it too)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from builders.examples import tiny_decoder_path
from builders.pipeline import build_model
from builders.request import BuildRequest, DecoderOptions
from harness.llama import TINY_SHAPE, build_decoder, random_weights
from harness.serve_bench import child_server
from runtime.runner import Runner, RunnerSpec, create_runner
from server.llm.load import StreamLoad

__all__ = ["StreamLoad", "build_llm_repository", "prefill_delaying_factory", "serve_llm_child"]

PREFILL_DELAY_S = 0.7  # every model's prompt step takes this long: a TTFT well above a busy box's ~0.15 s tails
SLOW_FIRST_FACTOR = 1.5  # models named slowfirst-*: their first token 50 % later
FINAL = "triton_final_response"


def build_llm_repository(root: Path, instances: int = 8) -> Path:
    """tiny-fp32-ort (baseline), same-fp32-ort (the same ONNX rebuilt), slowfirst-fp32-ort (same
    weights; the runner hook delays its prompt step 1.5x), changed-fp32-ort (other random weights)."""
    repo = root / "repo"
    changed = root / "changed.onnx"
    onnx.save(build_decoder(TINY_SHAPE, random_weights(TINY_SHAPE, 17)), str(changed))
    sources = [("tiny", tiny_decoder_path()), ("same", tiny_decoder_path()), ("slowfirst", tiny_decoder_path()),
               ("changed", changed)]  # fmt: skip
    for name, source in sources:
        options = DecoderOptions(max_new_tokens=64, check_tokens=4)
        build_model(BuildRequest(model=source, name=name, repo=repo, instances=instances, decoder=options))
    return repo


class _PrefillDelayed:
    def __init__(self, inner: Runner, delay_s: float) -> None:
        self._inner, self._delay_s = inner, delay_s
        self.output_names = inner.output_names

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if inputs["input_ids"].shape[-1] > 1:  # the prompt step: it makes the first token
            time.sleep(self._delay_s)
        return self._inner.run(inputs)

    def close(self) -> None:
        self._inner.close()


def prefill_delaying_factory(spec: RunnerSpec) -> Runner:
    """The server's runner factory with a fixed prompt-step delay (1.5x for ``slowfirst-*``)."""
    factor = SLOW_FIRST_FACTOR if spec.model.startswith("slowfirst") else 1.0
    return _PrefillDelayed(create_runner(spec), float(os.environ.get(DELAY_ENV, PREFILL_DELAY_S)) * factor)


DELAY_ENV = "KILN_TEST_PREFILL_DELAY_S"
SERVE_CHILD = (
    f"import os, sys, asyncio; os.environ['{DELAY_ENV}'] = sys.argv[2]; "
    "from harness.llm import prefill_delaying_factory; "
    "from server.app import make_options, serve; "
    "asyncio.run(serve(sys.argv[1], make_options('127.0.0.1', 0, None, 64, "
    "runner_factory=prefill_delaying_factory)))"
)


def serve_llm_child(repo: Path, delay_s: float = PREFILL_DELAY_S) -> contextlib.AbstractContextManager[str]:
    """``kiln serve`` of ``repo`` with the prompt-step delay, in a child process; yields HOST:PORT.

    A separate process keeps the server's Python work off the test process (the gateway and the
    load clients), so latency tails on a busy machine stay those of the gateway."""
    return child_server([sys.executable, "-c", SERVE_CHILD, str(repo), str(delay_s)])
