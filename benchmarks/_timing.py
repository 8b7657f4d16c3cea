"""Side-by-side timing: every contender of a case is measured in the same run, in
interleaved rounds, and the best round is kept (the least disturbed by the machine)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import attrs


@attrs.frozen(kw_only=True)
class Measure:
    """The best time per operation of one contender, in seconds, or why it failed; or,
    with ``unit="bytes"``, a size per operation in bytes (not a time: it is printed in
    its own column and never compared with the times)."""

    name: str
    per_op: float | None
    error: str | None = None
    unit: str = "s"


def best_per_op(
    contenders: Mapping[str, Callable[[int], object]],
    *,
    ops: int,
    rounds: int = 7,
    statistic: str = "best",
) -> list[Measure]:
    """Time ``fn(ops)`` for each contender, ``rounds`` times interleaved; keep the best
    round, or (``statistic="median"``) the median one, which suits I/O whose latency
    jumps between levels for seconds at a time (loopback networking on a shared VM).

    A contender that raises is reported with its error and not timed again.
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    errors: dict[str, str] = {}
    for _ in range(rounds):
        for name, fn in contenders.items():
            if name in errors:
                continue
            start = time.perf_counter()
            try:
                fn(ops)
            except Exception as exc:
                errors[name] = type(exc).__name__
                continue
            times[name].append((time.perf_counter() - start) / ops)
    keep = min if statistic == "best" else statistics.median
    return [
        Measure(name=name, per_op=None, error=errors[name])
        if name in errors
        else Measure(name=name, per_op=keep(times[name]))
        for name in contenders
    ]


@attrs.frozen
class Target:
    """A ratio the issue sets, checked in every group that measured both contenders:
    ``faster``: ``other`` takes at least ``ratio`` times as long as ``ours``;
    ``within``: ``ours`` takes at most ``ratio`` times as long as ``other``;
    ``adds``: what ``ours`` adds to ``base`` is at most ``ratio`` times what ``other``
    adds to it (``(ours - base) / (other - base)``);
    ``grows``: ``ours`` grew from ``base`` at most ``ratio`` times as much as ``other``
    grew from ``other_base`` (``(ours / base) / (other / other_base)``)."""

    ours: str
    other: str
    kind: str  # "faster" | "within" | "adds"
    ratio: float
    base: str = ""
    other_base: str = ""

    def check(self, measures: list[Measure]) -> dict[str, object] | None:
        times = {m.name: m.per_op for m in measures}
        ours, other = times.get(self.ours), times.get(self.other)
        if not ours or not other:
            return None
        if self.kind == "grows":
            base, other_base = times.get(self.base), times.get(self.other_base)
            if not base or not other_base:
                return None
            ours_growth, other_growth = ours / base, other / other_base
            found = ours_growth / other_growth
            text = (
                f"{self.ours} grew {ours_growth:.2f}x from {self.base}; {self.other} "
                f"grew {other_growth:.2f}x (target: at most {self.ratio:g}x its growth)"
            )
            met = found <= self.ratio
        elif self.kind == "adds":
            base = times.get(self.base)
            if not base or other <= base:
                return None
            found = (ours - base) / (other - base)
            text = (
                f"{self.ours} adds {(ours - base) * 1e6:.1f} µs to {self.base}, "
                f"{found:.2f}x what {self.other} adds (target within {self.ratio:g}x)"
            )
            met = found <= self.ratio
        elif self.kind == "faster":
            found = other / ours
            text = f"{self.ours} is {found:.2f}x faster than {self.other} (target {self.ratio:g}x)"
            met = found >= self.ratio
        else:
            found = ours / other
            text = f"{self.ours} takes {found:.2f}x {self.other} (target within {self.ratio:g}x)"
            met = found <= self.ratio
        return {"target": text, "ratio": round(found, 2), "met": met}
