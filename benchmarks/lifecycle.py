"""Session lifecycle: opening sessions for a 20-state app (time and memory), the copy a
session's first read makes of a default, and reaping a mass expiry.

The peer is gradio's own session-state holder (``gradio.state_holder.StateHolder`` over
a Blocks of 20 ``gr.State`` and one textbox), measured only when gradio is installed.
"""

from __future__ import annotations

import copy
import importlib
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from statekit import StateEngine
from statekit._copying import open_value, stored_form
from statekit.testing import FakeClock

from ._timing import Measure, Target, best_per_op

TITLE = "session lifecycle"
BASELINE = "statekit"
TARGETS = [
    Target("statekit", "gradio StateHolder", "faster", 10),
    Target("statekit", "copy.deepcopy", "faster", 3),
]

DEFAULT: dict[str, Any] = {
    "user": {"name": "ann", "tags": ["a", "b"], "prefs": {"theme": "dark", "n": 3}},
    "items": [{"id": i, "price": 1.5, "name": f"item {i}"} for i in range(20)],
}


def twenty_state_engine(capacity: int) -> StateEngine:
    engine = StateEngine(capacity=capacity)
    for i in range(20):
        engine.session_state(f"s{i}", {"items": [], "n": 0})
    return engine


def peer_holder() -> Any | None:
    """gradio's StateHolder for a 21-component app, or None without gradio."""
    try:
        gr = importlib.import_module("gradio")
        state_holder = importlib.import_module("gradio.state_holder")
    except ImportError:
        return None
    with gr.Blocks() as demo:
        for _ in range(20):
            gr.State({"items": [], "n": 0})
        gr.Textbox()
    holder = state_holder.StateHolder()
    holder.set_blocks(demo)
    return holder


def bytes_per(make: Callable[[int], object], count: int) -> float:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [make(i) for i in range(count)]
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del kept
    return used / count


def open_case(quick: bool) -> list[Measure]:
    engine = twenty_state_engine(capacity=10_000_000)
    holder = peer_holder()
    counter = iter(range(10**9))

    contenders: dict[str, Callable[[int], object]] = {
        "statekit": lambda ops: [engine.open_session() for _ in range(ops)]
    }
    if holder is not None:
        contenders["gradio StateHolder"] = lambda ops: [
            holder[f"s{next(counter)}"] for _ in range(ops)
        ]
    measures = best_per_op(contenders, ops=200 if quick else 2000, rounds=3 if quick else 5)
    count = 500 if quick else 5000
    memory = [
        Measure(
            name="statekit memory per session",
            per_op=bytes_per(lambda i: engine.open_session(), count),
            unit="bytes",
        )
    ]
    if holder is not None:
        memory.append(
            Measure(
                name="gradio memory per session",
                per_op=bytes_per(lambda i: holder[f"m{i}"], count),
                unit="bytes",
            )
        )
    return measures + memory


def copy_case(quick: bool) -> list[Measure]:
    stored = stored_form(DEFAULT)
    assert open_value(stored) == copy.deepcopy(DEFAULT)
    return best_per_op(
        {
            "statekit": lambda ops: [open_value(stored) for _ in range(ops)],
            "copy.deepcopy": lambda ops: [copy.deepcopy(DEFAULT) for _ in range(ops)],
        },
        ops=500 if quick else 5000,
        rounds=3 if quick else 7,
    )


def expiry_case(quick: bool) -> list[Measure]:
    """Open N sessions with a value each, let them all expire, then (1) time ordinary
    operations while the backlog is reaped 8 at a time and (2) a full engine.reap()."""
    sessions = 100_000 if quick else 1_000_000
    clock = FakeClock()
    engine = StateEngine(clock=clock, idle_ttl=60, capacity=sessions * 2)
    note = engine.session_state("note", 0, on_delete=lambda value, reason: None)
    sids = [engine.open_session() for _ in range(sessions)]
    for sid in sids[:1000]:
        with engine.event(sid) as ev:
            ev[note] = 1
    clock.advance(61)
    latencies = []
    for _ in range(2000):
        start = time.perf_counter()
        engine.open_session()  # reaps up to 8 expired sessions on the way
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    start = time.perf_counter()
    reaped = engine.reap()
    elapsed = time.perf_counter() - start
    return [
        Measure(name="statekit", per_op=latencies[len(latencies) // 2]),
        Measure(name="op during mass expiry: p99", per_op=latencies[int(len(latencies) * 0.99)]),
        Measure(name="op during mass expiry: max", per_op=latencies[-1]),
        Measure(name=f"engine.reap(): µs per session ({reaped:,})", per_op=elapsed / reaped),
    ]


def run(quick: bool = False) -> list[tuple[str, list[Measure]]]:
    return [
        ("open a session of a 20-state app", open_case(quick)),
        ("deepcopy-on-init of a JSON-like default", copy_case(quick)),
        ("mass expiry (p50 of an open_session while reaping is 'statekit')", expiry_case(quick)),
    ]
