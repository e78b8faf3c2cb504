"""Pure routing decisions: weighted random, sticky (weighted rendezvous hashing) and pinning.

Sticky routing uses weighted rendezvous (highest random weight) hashing: each variant scores a key
as ``-weight / ln(h)`` with ``h`` a uniform hash of (key, variant) in (0, 1); the highest score
wins. The same key always lands on the same variant while weights are unchanged, a variant gets
its weight's share of keys, and a weight change moves only the keys that must move (those that
enter or leave the changed variants). Removing an ejected variant moves only its own keys.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from core.errors import NotFoundError

PIN_HEADER = "kiln-variant"
_HASH_SCALE = float(2**64)


@dataclass(frozen=True)
class Choice:
    """The routing decision for one request."""

    index: int  # index into the route's variants
    reason: str  # "weighted" | "sticky" | "pinned" | "fallback"


@dataclass(frozen=True)
class WeightedSet:
    """Variant names and weights prepared for fast repeated choices."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    cumulative: tuple[float, ...]
    salts: tuple[bytes, ...]

    @classmethod
    def build(cls, names: Sequence[str], weights: Sequence[float]) -> WeightedSet:
        running, cumulative = 0.0, []
        for weight in weights:
            running += weight
            cumulative.append(running)
        salts = tuple(hashlib.blake2b(n.encode(), digest_size=16).digest() for n in names)
        return cls(tuple(names), tuple(float(w) for w in weights), tuple(cumulative), salts)


def key_uniform(key: bytes, salt: bytes) -> float:
    """A uniform hash of ``key`` for one variant, in the open interval (0, 1)."""
    digest = hashlib.blake2b(key, digest_size=8, key=salt).digest()
    return (int.from_bytes(digest, "little") + 0.5) / _HASH_SCALE


def choose_weighted(options: WeightedSet, draw: float, allowed: Sequence[bool] | None = None) -> int:
    """Index chosen by weight for a uniform ``draw`` in [0, 1); ``allowed`` masks out variants.

    Masked-out variants' share goes to the others in proportion to their weights. When every
    allowed variant has weight 0 (or none is allowed), falls back to the first allowed, else 0.
    """
    if allowed is None:
        total = options.cumulative[-1]
        if total <= 0.0:
            return 0
        index = bisect.bisect_right(options.cumulative, draw * total)
        return min(index, len(options.names) - 1)
    weights = [w if ok else 0.0 for w, ok in zip(options.weights, allowed, strict=True)]
    total = sum(weights)
    if total <= 0.0:
        return next((i for i, ok in enumerate(allowed) if ok), 0)
    target, running = draw * total, 0.0
    last = 0
    for index, weight in enumerate(weights):
        if weight <= 0.0:
            continue
        running += weight
        last = index
        if target < running:
            return index
    return last


def choose_sticky(options: WeightedSet, key: bytes, allowed: Sequence[bool] | None = None) -> int:
    """Weighted rendezvous hashing: the variant with the highest ``-w / ln(h(key, variant))``."""
    best, best_score = -1, -math.inf
    for index, (weight, salt) in enumerate(zip(options.weights, options.salts, strict=True)):
        if weight <= 0.0 or (allowed is not None and not allowed[index]):
            continue
        score = -weight / math.log(key_uniform(key, salt))
        if score > best_score:
            best, best_score = index, score
    if best >= 0:
        return best
    if allowed is not None:
        return next((i for i, ok in enumerate(allowed) if ok), 0)
    return 0


def choose_pinned(options: WeightedSet, name: str) -> int:
    """Index of the variant a ``kiln-variant`` header pins (any weight, even 0)."""
    try:
        return options.names.index(name)
    except ValueError as err:
        raise NotFoundError(
            f"{PIN_HEADER} pins variant {name[:60]!r}, which this route does not have; "
            f"its variants are {list(options.names)}"
        ) from err


def choose_variant(
    options: WeightedSet,
    *,
    draw: float,
    key: bytes | None = None,
    pin: str | None = None,
    allowed: Sequence[bool] | None = None,
) -> Choice:
    """One routing decision: a pin wins, then a sticky key, then a weighted draw."""
    if pin is not None:
        return Choice(choose_pinned(options, pin), "pinned")
    if key is not None:
        return Choice(choose_sticky(options, key, allowed), "sticky")
    return Choice(choose_weighted(options, draw, allowed), "weighted")
