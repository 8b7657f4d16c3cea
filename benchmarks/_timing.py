"""Side-by-side timing: every contender of a case is measured in the same run, in
interleaved rounds, and the best round is kept (the least disturbed by the machine)."""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs


@attrs.frozen(kw_only=True)
class Measure:
    """The best time per operation of one contender, in seconds."""

    name: str
    per_op: float


def best_per_op(
    contenders: dict[str, Callable[[int], None]], *, ops: int, rounds: int = 7
) -> list[Measure]:
    """Time ``fn(ops)`` for each contender, ``rounds`` times interleaved; keep the best."""
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn(ops)
            elapsed = time.perf_counter() - start
            best[name] = min(best[name], elapsed / ops)
    return [Measure(name=name, per_op=best[name]) for name in contenders]
