"""Autoregressive decoding of an ONNX decoder with KV cache, over any ``Runner``.

The decoder uses optimum's layout: inputs ``input_ids``, ``attention_mask``, ``position_ids`` and
``past_key_values.{i}.key`` / ``.value`` ([batch, kv_heads, past, head_dim]); outputs ``logits``
and ``present.{i}.key`` / ``.value``. ``DecoderLayout`` reads that layout from the graph (and names
what is missing), ``Generation`` decodes one sequence step by step: the first ``step`` runs the
prompt (prefill), each later one feeds back the last token and the cache that the model returned.
Greedy by default; temperature and top-k sampling draw from a generator seeded per request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from core.errors import InvalidInputError, KilnError

REQUIRED_INPUTS = ("input_ids", "attention_mask")
OPTIONAL_INPUTS = ("position_ids",)
PAST_NAME = "past_key_values.{i}.{kind}"
PRESENT_NAME = "present.{i}.{kind}"
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_FLOATS: dict[int, np.dtype] = {
    onnx.TensorProto.FLOAT: np.dtype(np.float32),
    onnx.TensorProto.FLOAT16: np.dtype(np.float16),
}
CONTEXT_METADATA = "max_position_embeddings"

Arrays = dict[str, np.ndarray]
RunFn = Callable[[Arrays], Arrays]


@dataclass(frozen=True)
class DecoderLayout:
    """What a decoder graph takes: its layer count, KV shape and dtype, and whether it wants positions."""

    layers: int
    kv_heads: int
    head_dim: int
    kv_dtype: np.dtype
    position_ids: bool
    max_context: int | None  # from the model's metadata, when it says

    def empty_cache(self) -> list[np.ndarray]:
        return [np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype) for _ in range(2 * self.layers)]


def expected_names() -> str:
    """The input/output names a decoder must have, for error messages."""
    return (
        f"inputs {', '.join(REQUIRED_INPUTS + OPTIONAL_INPUTS)}, past_key_values.0.key, past_key_values.0.value, "
        "... (one key/value pair per layer) and outputs logits, present.0.key, present.0.value, ... "
        "(optimum's layout, as 'optimum-cli export onnx --task text-generation-with-past' writes it)"
    )


def read_layout(path: Path, *, model: str = "") -> DecoderLayout:
    """The decoder layout of the ONNX file at ``path`` (weights are not read)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and friends for corrupt files
        raise InvalidInputError(f"decoder {model or str(path)!r}: cannot read {str(path)!r} as ONNX ({err})") from err
    return layout_of(proto, model=model or path.stem)


def layout_of(proto: onnx.ModelProto, *, model: str = "") -> DecoderLayout:
    """The decoder layout of a loaded ONNX model; a clear error names the inputs it lacks."""
    initializers = {t.name for t in proto.graph.initializer}
    inputs = {v.name: v for v in proto.graph.input if v.name not in initializers}
    outputs = {v.name for v in proto.graph.output}
    missing = [n for n in REQUIRED_INPUTS if n not in inputs]
    pasts = sorted((int(m.group(1)), m.group(2)) for n in inputs if (m := _PAST.match(n)))
    layers = max((i for i, _ in pasts), default=-1) + 1
    wanted = [(i, k) for i in range(layers) for k in ("key", "value")]
    missing += [PAST_NAME.format(i=i, kind=k) for i, k in wanted if (i, k) not in pasts]
    missing_out = [n for n in ["logits"] + [PRESENT_NAME.format(i=i, kind=k) for i, k in wanted] if n not in outputs]
    if missing or missing_out or layers == 0:
        lacking = missing + missing_out or ["past_key_values.0.key (no KV-cache inputs at all)"]
        raise InvalidInputError(
            f"model {model!r} is not a decoder with KV cache: it lacks {lacking}; its inputs are "
            f"{sorted(inputs)}. Kiln expects {expected_names()}"
        )
    first = inputs[PAST_NAME.format(i=0, kind="key")].type.tensor_type
    dtype = _FLOATS.get(first.elem_type)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in first.shape.dim]
    if dtype is None or len(dims) != 4 or dims[1] is None or dims[3] is None:
        raise InvalidInputError(
            f"model {model!r}: past_key_values.0.key must be float or float16 [batch, kv_heads, past, head_dim] "
            f"with fixed kv_heads and head_dim; it is elem_type {first.elem_type} with dims {dims}"
        )
    meta = {p.key: p.value for p in proto.metadata_props}
    context = int(meta[CONTEXT_METADATA]) if meta.get(CONTEXT_METADATA, "").isdigit() else None
    return DecoderLayout(layers, int(dims[1]), int(dims[3]), dtype, "position_ids" in inputs, context)


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is 0; otherwise softmax(logits / temperature) over the top ``top_k``."""

    temperature: float = 0.0
    top_k: int = 0  # 0: the whole vocabulary
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise InvalidInputError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InvalidInputError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")


def choose_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from a 1-D logits vector."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < scaled.size:
        cut = np.partition(scaled, -sampling.top_k)[-sampling.top_k]
        scaled = np.where(scaled >= cut, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


class Generation:
    """One sequence being decoded; ``step`` yields one token per call, ``close`` frees the KV cache.

    Not thread-safe: one step at a time (the server awaits each step before the next).
    """

    def __init__(
        self,
        run: RunFn,
        layout: DecoderLayout,
        prompt: Sequence[int],
        *,
        max_new_tokens: int,
        max_context: int,
        sampling: Sampling = Sampling(),
        stop_ids: Iterable[int] = (),
    ) -> None:
        if not prompt:
            raise InvalidInputError("the prompt is empty; send at least one token")
        if len(prompt) >= max_context:
            raise InvalidInputError(
                f"the prompt has {len(prompt)} tokens; this model's context is {max_context} tokens and needs room "
                "for at least one new token; shorten the prompt"
            )
        if max_new_tokens < 1:
            raise InvalidInputError(f"max_tokens must be >= 1, got {max_new_tokens}")
        self._run, self.layout, self.sampling = run, layout, sampling
        self.prompt = [int(t) for t in prompt]
        self.max_new_tokens = min(max_new_tokens, max_context - len(self.prompt))
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "stop" (a stop token), "length" (max_tokens or context)
        self._cache: list[np.ndarray] | None = layout.empty_cache()
        self._rng = np.random.default_rng(sampling.seed)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self._cache is None

    @property
    def cache_bytes(self) -> int:
        return sum(a.nbytes for a in self._cache) if self._cache is not None else 0

    def step(self) -> int | None:
        """Run the model once; the new token, or None when a stop token ended the sequence."""
        if self.finished:
            raise KilnError("generation already finished or was closed; start a new one")
        cache = self._cache
        assert cache is not None  # finished covers it; narrows the type
        fed = self.prompt if not self.tokens else self.tokens[-1:]
        start = len(self.prompt) + len(self.tokens) - len(fed)
        outputs = self._run(self._feed(fed, start, cache))
        if self._cache is None:  # closed while the model ran
            return None
        self._cache = [
            outputs[PRESENT_NAME.format(i=i, kind=k)] for i in range(self.layout.layers) for k in ("key", "value")
        ]
        token = choose_token(outputs["logits"][0, -1], self.sampling, self._rng)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            self._cache = None
            return None
        self.tokens.append(token)
        if len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
            self._cache = None
        return token

    def _feed(self, ids: list[int], start: int, cache: list[np.ndarray]) -> Arrays:
        total = start + len(ids)
        feed: Arrays = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
        }
        if self.layout.position_ids:
            feed["position_ids"] = np.arange(start, total, dtype=np.int64)[None]
        for i in range(self.layout.layers):
            feed[PAST_NAME.format(i=i, kind="key")] = cache[2 * i]
            feed[PAST_NAME.format(i=i, kind="value")] = cache[2 * i + 1]
        return feed

    def close(self) -> None:
        """Free the KV cache; a step in flight finishes but its result is dropped."""
        self._cache = None
        if self.finish_reason is None:
            self.finish_reason = "cancelled"


def generate(
    run: RunFn,
    layout: DecoderLayout,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    max_context: int,
    sampling: Sampling = Sampling(),
    stop_ids: Iterable[int] = (),
) -> list[int]:
    """Decode a whole sequence in this thread (the in-process floor for benchmarks, and shadow replays)."""
    generation = Generation(
        run,
        layout,
        prompt,
        max_new_tokens=max_new_tokens,
        max_context=max_context,
        sampling=sampling,
        stop_ids=stop_ids,
    )
    while not generation.finished:
        generation.step()
    return generation.tokens
