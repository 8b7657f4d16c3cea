"""Write then read one session value: statekit inside an event, against a
``cachetools.TTLCache`` set+get and a plain dict set+get keyed by session id."""

from __future__ import annotations

import importlib
import itertools
import time
from collections.abc import Callable

import cachetools

from statekit import SessionState, StateEngine

from ._timing import Measure, Target, best_per_op

TITLE = "session value write+read"
BASELINE = "TTLCache set+get"
TARGETS = [
    Target("statekit event (write+read)", "gradio session value write+read", "faster", 12),
    Target("statekit read outside an event", "TTLCache get", "within", 2),
]


def contenders(sessions: int = 1000) -> dict[str, Callable[[int], None]]:
    engine = StateEngine(capacity=sessions * 2)
    counter: SessionState[int] = engine.session_state("counter", 0)
    sids = [engine.open_session() for _ in range(sessions)]
    cache: cachetools.TTLCache[str, int] = cachetools.TTLCache(
        maxsize=sessions * 2, ttl=3600, timer=time.monotonic
    )
    plain: dict[str, int] = {}

    def statekit_event(ops: int) -> None:
        for sid, i in zip(itertools.cycle(sids), range(ops), strict=False):
            with engine.event(sid) as ev:
                ev[counter] = i
                ev[counter]

    def statekit_peek(ops: int) -> None:
        for sid, _ in zip(itertools.cycle(sids), range(ops), strict=False):
            counter.get(sid)

    def ttlcache(ops: int) -> None:
        for sid, i in zip(itertools.cycle(sids), range(ops), strict=False):
            cache[sid] = i
            cache[sid]

    def ttlcache_get(ops: int) -> None:
        for sid, _ in zip(itertools.cycle(sids), range(ops), strict=False):
            cache.get(sid)

    def dict_rw(ops: int) -> None:
        for sid, i in zip(itertools.cycle(sids), range(ops), strict=False):
            plain[sid] = i
            plain[sid]

    ttlcache(sessions)
    found: dict[str, Callable[[int], None]] = {}
    peer = gradio_write_read()
    if peer is not None:
        found["gradio session value write+read"] = peer
    return found | {
        "statekit event (write+read)": statekit_event,
        BASELINE: ttlcache,
        "dict set+get": dict_rw,
        "statekit read outside an event": statekit_peek,
        "TTLCache get": ttlcache_get,
    }


def gradio_write_read() -> Callable[[int], None] | None:
    """The peer: a value written then read in gradio's own per-session state holder
    (an app with one ``gr.State`` and a textbox), or None without gradio."""
    try:
        gr = importlib.import_module("gradio")
        state_holder = importlib.import_module("gradio.state_holder")
    except ImportError:
        return None
    with gr.Blocks() as demo:
        state = gr.State(0)
        gr.Textbox()
    holder = state_holder.StateHolder()
    holder.set_blocks(demo)
    session = holder["bench"]
    key = state._id

    def write_read(ops: int) -> None:
        for i in range(ops):
            session[key] = i
            session[key]

    return write_read


def run(quick: bool = False) -> list[tuple[str, list[Measure]]]:
    return [("1,000 live sessions", best_per_op(contenders(), ops=2_000 if quick else 20_000))]
