from __future__ import annotations

import pytest

import statekit.stores.memory as memory
from statekit.stores import DeleteReason, Gone, MemoryStore, Store

from .store_contract import StoreContract


class TestMemoryStore(StoreContract):
    def make_store(self) -> Store:
        return MemoryStore()


def test_same_app_name_gives_same_namespace() -> None:
    store = MemoryStore()
    assert store.namespace("a") is store.namespace("a")
    assert store.namespace("a") is not store.namespace("b")


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
