from __future__ import annotations

import pytest

import statekit.stores.memory as memory
from statekit.stores import DeleteReason, Gone, Loaded, MemoryStore, Notice, Store

from .store_contract import StoreContract


class TestMemoryStore(StoreContract):
    def make_store(self) -> Store:
        return MemoryStore()


def test_handles_of_one_app_share_state_and_notify_each_other() -> None:
    store = MemoryStore()
    one, two, other = store.namespace("a"), store.namespace("a"), store.namespace("b")
    seen: list[Notice] = []
    two.subscribe(seen.append)
    other.subscribe(seen.append)
    one.create_session("s", now=0, deadline=10, capacity=10)
    assert isinstance(two.load_session("s", now=1, touch_until=None), Loaded)
    one.commit("s", version=0, writes={"x": 1}, ttl_deadlines={}, now=1)
    two.commit("s", version=1, writes={"y": 1}, ttl_deadlines={}, now=1)  # own: not seen
    one.close_session("s", now=2, deadline=5)
    assert [(n.kind, n.sid, n.names, n.reason) for n in seen] == [
        ("changed", "s", ("x",), None),
        ("ended", "s", (), DeleteReason.CLOSED),
    ]


def test_shutdown_hands_back_every_session_once() -> None:
    ns = MemoryStore().namespace("app")
    ns.create_session("a", now=0, deadline=10, capacity=10)
    ns.create_session("b", now=0, deadline=10, capacity=10)
    ns.close_session("b", now=1, deadline=5)
    ended = ns.shutdown()
    assert sorted((e.sid, e.reason, e.was_closed) for e in ended) == [
        ("a", DeleteReason.SHUTDOWN, False),
        ("b", DeleteReason.SHUTDOWN, True),
    ]
    assert ns.session_count() == 0
    assert ns.shutdown() == ()


def test_tombstones_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "TOMBSTONES", 3)
    ns = memory.MemoryStore().namespace("app")
    for i in range(5):
        ns.create_session(f"s{i}", now=0, deadline=1, capacity=10)
    ns.reap(now=2, limit=10)
    assert ns.load_session("s0", now=3, touch_until=None) is None
    assert isinstance(ns.load_session("s4", now=3, touch_until=None), Gone)


@pytest.mark.parametrize("ending", ["evicted at capacity", "past its grace"])
def test_a_closed_session_is_heard_ended_once_by_another_engine(ending: str) -> None:
    # Fails if the store, removing a session closed before, notices its end again:
    # engine B's hook would then run a second time (as "evicted" or "closed").
    from statekit import StateEngine
    from statekit.testing import FakeClock

    clock = FakeClock()
    store = MemoryStore()
    a = StateEngine(store, app="shop", clock=clock, capacity=2, closed_ttl=60)
    b = StateEngine(store, app="shop", clock=clock, capacity=2, closed_ttl=60)
    heard: list[tuple[str, str, str]] = []
    a.on_close(lambda sid, reason: heard.append(("A", sid, reason.value)))
    b.on_close(lambda sid, reason: heard.append(("B", sid, reason.value)))
    sid = a.open_session()
    a.open_session()
    a.close_session(sid)
    assert sorted(heard) == [("A", sid, "closed"), ("B", sid, "closed")]
    if ending == "evicted at capacity":
        a.open_session()  # the closed session goes first
    else:
        clock.advance(61)
    assert not a.exists(sid)
    assert sorted(heard) == [("A", sid, "closed"), ("B", sid, "closed")]
