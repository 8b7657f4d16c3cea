"""How costs grow: operation latency against the number of live sessions (1,000 to
1,000,000), and change-detection time against value size. Writes two PNG plots
(matplotlib, in the ``bench`` extra) to ``benchmarks/results/``."""

from __future__ import annotations

import copy
import importlib
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cachetools

from statekit import SessionState, StateEngine
from statekit._changes import judge
from statekit._copying import open_value, stored_form

from ._timing import Measure, Target

TITLE = "scaling"
BASELINE = "1,000 sessions: event p50"
# statekit's latency grows with the live sessions at most as TTLCache's get does, in
# the same run (a dict's memory access grows too, as the table outgrows the caches).
TARGETS = [
    Target(
        f"{n:,} sessions: {op} p50",
        f"{n:,} sessions: TTLCache get p50",
        "grows",
        1.0,
        base=f"1,000 sessions: {op} p50",
        other_base="1,000 sessions: TTLCache get p50",
    )
    for op in ("event", "read")
    for n in (100_000, 1_000_000)
]
RESULTS = Path(__file__).resolve().parent / "results"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def latency_at(sessions: int, ops: int) -> dict[str, float]:
    """p50 latencies at ``sessions`` live sessions, each operation on a random session
    and each kind in its own pass (so that no operation finds another's session in the
    processor caches), beside the same-size baselines: a plain dict lookup by session
    id (the memory-access floor) and a ``TTLCache`` get."""
    engine = StateEngine(capacity=sessions * 2)
    counter: SessionState[int] = engine.session_state("counter", 0)
    sids = [engine.open_session() for _ in range(sessions)]
    plain = dict.fromkeys(sids, 0)
    cache: cachetools.TTLCache[str, int] = cachetools.TTLCache(
        maxsize=sessions * 2, ttl=3600, timer=time.monotonic
    )
    cache.update(plain)
    rng = random.Random(1)

    def picks() -> list[str]:
        return [sids[rng.randrange(sessions)] for _ in range(ops)]

    def timed(op: Callable[[str, int], object]) -> float:
        samples = []
        for i, sid in enumerate(picks()):
            start = time.perf_counter()
            op(sid, i)
            samples.append(time.perf_counter() - start)
        return percentile(samples, 0.5)

    def event(sid: str, i: int) -> None:
        with engine.event(sid) as ev:
            ev[counter] = i

    return {
        "event": timed(event),
        "read": timed(lambda sid, i: counter.get(sid)),
        "dict": timed(lambda sid, i: plain.get(sid)),
        "ttlcache": timed(lambda sid, i: cache.get(sid)),
    }


def detector_at(size: int) -> float:
    value = list(range(size))
    stored = stored_form(value)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        judge(stored, open_value(stored))
        best = min(best, time.perf_counter() - start)
    return best


def naive_at(size: int) -> float:
    value = list(range(size))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        copy.deepcopy(value) == value  # noqa: B015
        best = min(best, time.perf_counter() - start)
    return best


def plot(name: str, xs: list[int], series: dict[str, list[float]], ylabel: str) -> Path | None:
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")
    pyplot: Any = importlib.import_module("matplotlib.pyplot")
    figure, axes = pyplot.subplots(figsize=(6.4, 4))
    for label, ys in series.items():
        axes.plot(xs, [y * 1e6 for y in ys], marker="o", label=label)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel(name)
    axes.set_ylabel(ylabel)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / (name.split(" ")[0] + ".png")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path


def run(quick: bool = False) -> list[tuple[str, list[Measure]]]:
    sizes = [1_000, 10_000, 100_000] if quick else [1_000, 10_000, 100_000, 1_000_000]
    latencies = {size: latency_at(size, 2_000 if quick else 20_000) for size in sizes}
    value_sizes = [10, 100, 1_000, 10_000, 100_000]
    detector = [detector_at(n) for n in value_sizes]
    naive = [naive_at(n) for n in value_sizes]
    plot(
        "sessions (live)",
        sizes,
        {
            "one-state event p50": [latencies[s]["event"] for s in sizes],
            "read outside an event p50": [latencies[s]["read"] for s in sizes],
            "TTLCache get p50": [latencies[s]["ttlcache"] for s in sizes],
            "dict.get p50": [latencies[s]["dict"] for s in sizes],
        },
        "µs per operation",
    )
    plot(
        "values (list length)",
        value_sizes,
        {"statekit snapshot + compare": detector, "deepcopy + ==": naive},
        "µs",
    )
    rows = [
        Measure(name=f"{size:,} sessions: {what} p50", per_op=latencies[size][key])
        for key, what in (
            ("event", "event"),
            ("read", "read"),
            ("dict", "dict.get"),
            ("ttlcache", "TTLCache get"),
        )
        for size in sizes
    ]
    sizes_rows = [
        Measure(name=f"list of {n:,}: statekit", per_op=t)
        for n, t in zip(value_sizes, detector, strict=True)
    ] + [
        Measure(name=f"list of {n:,}: deepcopy + ==", per_op=t)
        for n, t in zip(value_sizes, naive, strict=True)
    ]
    base = rows[0]
    return [("latency vs live sessions", rows), ("detector vs value size", [base, *sizes_rows])]
