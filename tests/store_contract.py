"""The contract every store implements, run against each store by subclassing.

A subclass provides ``make_store()``; every test then talks to the store's namespace
directly, through the :class:`~statekit.stores.StoreNamespace` protocol only. A store
whose namespaces also offer the async calls (``AsyncStoreNamespace``) runs the contract
once more through them (:class:`Awaited`).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import pytest

from statekit import SessionExpired, SessionNotFound, StoreConflict
from statekit._codec import Codec
from statekit.stores import (
    Busy,
    DeleteReason,
    Ended,
    Gone,
    Lease,
    Loaded,
    Notice,
    SessionIdTaken,
    Store,
    StoreNamespace,
)


class _Decoded:
    """A namespace seen through its store's codec, so that one contract reads the same
    for stores that keep objects and stores that keep bytes."""

    def __init__(self, ns: StoreNamespace, codec: Codec) -> None:
        self._ns = ns
        self._codec = codec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ns, name)

    def _ended(self, ended: Ended) -> Ended:
        values = {k: self._codec.decode(v) for k, v in ended.values.items()}
        return attrs.evolve(ended, values=values)

    def _outcome(self, outcome: Any) -> Any:
        if isinstance(outcome, Loaded):
            values = {k: self._codec.decode(v) for k, v in outcome.values.items()}
            expired = tuple(self._ended(e) for e in outcome.expired)
            return attrs.evolve(outcome, values=values, expired=expired)
        if isinstance(outcome, Gone) and outcome.ended is not None:
            return attrs.evolve(outcome, ended=self._ended(outcome.ended))
        return outcome

    def create_session(self, sid: str, **kw: Any) -> tuple[Ended, ...]:
        return tuple(self._ended(e) for e in self._ns.create_session(sid, **kw))

    def load_session(self, sid: str, **kw: Any) -> Any:
        return self._outcome(self._ns.load_session(sid, **kw))

    def peek(self, sid: str, name: str, **kw: Any) -> Any:
        return self._outcome(self._ns.peek(sid, name, **kw))

    def close_session(self, sid: str, **kw: Any) -> Any:
        return self._outcome(self._ns.close_session(sid, **kw))

    def commit(self, sid: str, *, writes: Mapping[str, Any], **kw: Any) -> int:
        encoded = {k: self._codec.encode(v) for k, v in writes.items()}
        return self._ns.commit(sid, writes=encoded, **kw)

    def reap(self, **kw: Any) -> tuple[Ended, ...]:
        return tuple(self._ended(e) for e in self._ns.reap(**kw))

    def global_get(self, name: str) -> tuple[Any, int] | None:
        found = self._ns.global_get(name)
        return None if found is None else (self._codec.decode(found[0]), found[1])

    def global_cas(self, name: str, *, version: int | None, value: Any) -> int | None:
        return self._ns.global_cas(name, version=version, value=self._codec.encode(value))


class Awaited:
    """A namespace whose protocol methods are its async ones (``aload_session`` for
    ``load_session``, ...), each awaited on ``loop`` — an event loop running in another
    thread, the one its store's asyncio client belongs to — and answered as the
    blocking method would be: the contract run through it checks each async method."""

    #: The protocol's calls, each of which has an async form.
    CALLS = frozenset(
        {
            "create_session",
            "load_session",
            "peek",
            "commit",
            "release",
            "close_session",
            "reap",
            "session_count",
            "global_get",
            "global_cas",
            "global_add",
            "shutdown",
        }
    )

    def __init__(self, ns: StoreNamespace, loop: asyncio.AbstractEventLoop) -> None:
        self._ns = ns
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        if name not in self.CALLS:  # subscribe, and attributes: as they are
            return getattr(self._ns, name)
        twin = getattr(self._ns, "a" + name)

        def awaited(*args: Any, **kwargs: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(twin(*args, **kwargs), self._loop).result(30)

        return awaited


class StoreContract:
    def make_store(self) -> Store:
        raise NotImplementedError

    def through(self, ns: StoreNamespace) -> StoreNamespace:
        """How the contract reaches a namespace (as it is, unless a subclass says)."""
        return ns

    @pytest.fixture
    def store(self) -> Iterator[Store]:
        store = self.make_store()
        yield store
        close = getattr(store, "close", None)
        if close is not None:
            close()

    @pytest.fixture
    def ns(self, store: Store) -> StoreNamespace:
        ns = self.through(store.namespace(f"contract-{uuid.uuid4().hex[:8]}"))
        if store.codec is None:
            return ns
        return _Decoded(ns, store.codec)

    @staticmethod
    def new(ns: StoreNamespace, sid: str = "s1", *, now: float = 0.0, ttl: float = 10) -> str:
        assert ns.create_session(sid, now=now, deadline=now + ttl, capacity=100) == ()
        return sid

    @staticmethod
    def load(ns: StoreNamespace, sid: str, now: float = 1.0) -> Loaded:
        loaded = ns.load_session(sid, now=now, touch_until=now + 10)
        assert isinstance(loaded, Loaded)
        return loaded

    # -- sessions ---------------------------------------------------------------

    def test_store_satisfies_protocol(self, store: Store) -> None:
        assert isinstance(store, Store)
        assert isinstance(store.namespace("protocol"), StoreNamespace)

    def test_new_session_loads_empty_at_version_zero(self, ns: StoreNamespace) -> None:
        self.new(ns)
        loaded = self.load(ns, "s1")
        assert (loaded.sid, loaded.version, loaded.closed, dict(loaded.values)) == (
            "s1",
            0,
            False,
            {},
        )

    def test_an_id_already_stored_is_refused_and_nothing_changes(self, ns: StoreNamespace) -> None:
        self.new(ns)
        ns.commit("s1", version=0, writes={"a": 1}, ttl_deadlines={}, now=1)
        with pytest.raises(SessionIdTaken):
            ns.create_session("s1", now=2, deadline=100, capacity=10)
        loaded = self.load(ns, "s1")
        assert (loaded.version, dict(loaded.values)) == (1, {"a": 1})

    def test_unknown_session_is_none(self, ns: StoreNamespace) -> None:
        assert ns.load_session("nope", now=0, touch_until=10) is None

    def test_commit_writes_all_and_bumps_version(self, ns: StoreNamespace) -> None:
        self.new(ns)
        version = ns.commit("s1", version=0, writes={"a": [1], "b": "x"}, ttl_deadlines={}, now=1)
        assert version == 1
        loaded = self.load(ns, "s1")
        assert loaded.version == 1
        assert dict(loaded.values) == {"a": [1], "b": "x"}

    def test_stale_version_is_refused_and_writes_nothing(self, ns: StoreNamespace) -> None:
        self.new(ns)
        ns.commit("s1", version=0, writes={"a": 1}, ttl_deadlines={}, now=1)
        with pytest.raises(StoreConflict):
            ns.commit("s1", version=0, writes={"a": 2, "b": 3}, ttl_deadlines={}, now=1)
        assert dict(self.load(ns, "s1").values) == {"a": 1}

    def test_commit_to_unknown_session_raises(self, ns: StoreNamespace) -> None:
        with pytest.raises(SessionNotFound):
            ns.commit("ghost", version=0, writes={"a": 1}, ttl_deadlines={}, now=1)

    def test_load_slides_the_deadline(self, ns: StoreNamespace) -> None:
        self.new(ns, ttl=10)
        ns.load_session("s1", now=9, touch_until=19)
        assert isinstance(ns.load_session("s1", now=18, touch_until=None), Loaded)
        assert ns.reap(now=18.5, limit=10) == ()

    def test_peek_reads_one_value_and_claims_it_when_expired(self, ns: StoreNamespace) -> None:
        self.new(ns, ttl=100)
        ns.commit("s1", version=0, writes={"a": 1, "t": 2}, ttl_deadlines={"t": 5}, now=0)
        peeked = ns.peek("s1", "a", now=1, touch_until=101)
        assert isinstance(peeked, Loaded)
        assert peeked.values["a"] == 1
        late = ns.peek("s1", "t", now=6, touch_until=106)
        assert isinstance(late, Loaded)
        assert "t" not in late.values
        assert [(e.state, dict(e.values)) for e in late.expired] == [("t", {"t": 2})]
        assert ns.peek("ghost", "a", now=6, touch_until=None) is None

    def test_look_without_touch_does_not_slide(self, ns: StoreNamespace) -> None:
        self.new(ns, ttl=10)
        ns.load_session("s1", now=9, touch_until=None)
        assert [e.sid for e in ns.reap(now=10, limit=10)] == ["s1"]

    def test_expired_session_is_claimed_once_on_load(self, ns: StoreNamespace) -> None:
        self.new(ns, ttl=10)
        ns.commit("s1", version=0, writes={"a": 1}, ttl_deadlines={}, now=1)
        first = ns.load_session("s1", now=10, touch_until=20)
        assert isinstance(first, Gone)
        assert first.reason is DeleteReason.IDLE
        assert first.ended is not None
        assert dict(first.ended.values) == {"a": 1}
        second = ns.load_session("s1", now=11, touch_until=21)
        assert isinstance(second, Gone)
        assert second.ended is None
        assert ns.reap(now=100, limit=10) == ()

    def test_commit_after_expiry_raises_expired(self, ns: StoreNamespace) -> None:
        self.new(ns, ttl=10)
        ns.reap(now=10, limit=10)
        with pytest.raises(SessionExpired) as info:
            ns.commit("s1", version=0, writes={"a": 1}, ttl_deadlines={}, now=12)
        assert info.value.reason == "idle"

    def test_close_keeps_values_until_grace_ends(self, ns: StoreNamespace) -> None:
        self.new(ns, ttl=10)
        ns.commit("s1", version=0, writes={"a": 1}, ttl_deadlines={}, now=1)
        assert ns.close_session("s1", now=2, deadline=7) is True
        assert ns.close_session("s1", now=3, deadline=8) is False
        loaded = ns.load_session("s1", now=6, touch_until=16)
        assert isinstance(loaded, Loaded)
        assert loaded.closed
        assert dict(loaded.values) == {"a": 1}
        (ended,) = ns.reap(now=7, limit=10)
        assert (ended.sid, ended.reason, ended.was_closed) == ("s1", DeleteReason.CLOSED, True)
        assert dict(ended.values) == {"a": 1}

    def test_close_unknown_or_expired(self, ns: StoreNamespace) -> None:
        assert ns.close_session("ghost", now=0, deadline=5) is None
        self.new(ns, ttl=10)
        gone = ns.close_session("s1", now=10, deadline=15)
        assert isinstance(gone, Gone)
        assert gone.ended is not None
        assert gone.ended.reason is DeleteReason.IDLE

    # -- lifetimes ---------------------------------------------------------------

    def test_reap_in_deadline_order_with_limit(self, ns: StoreNamespace) -> None:
        # As the engine does: one idle ttl (10), deadlines given in time order.
        for i in range(4):
            self.new(ns, f"s{i}", now=i, ttl=10)
        ns.load_session("s0", now=4, touch_until=14)  # s0 now expires last
        ns.load_session("s2", now=5, touch_until=15)
        first = ns.reap(now=20, limit=2)
        rest = ns.reap(now=20, limit=10)
        assert [e.sid for e in first] == ["s1", "s3"]
        assert [e.sid for e in rest] == ["s0", "s2"]
        assert ns.session_count() == 0

    def test_reap_takes_only_what_is_due(self, ns: StoreNamespace) -> None:
        for i in range(3):
            self.new(ns, f"s{i}", now=i, ttl=10)
        assert [e.sid for e in ns.reap(now=11, limit=10)] == ["s0", "s1"]
        assert ns.session_count() == 1

    def test_reap_mixes_value_ttls_and_sessions_in_order(self, ns: StoreNamespace) -> None:
        self.new(ns, "s1", now=0, ttl=10)
        self.new(ns, "s2", now=1, ttl=10)
        ns.commit("s2", version=0, writes={"tok": "t", "keep": 1}, ttl_deadlines={"tok": 3}, now=1)
        assert [(e.sid, e.state) for e in ns.reap(now=5, limit=10)] == [("s2", "tok")]
        assert dict(self.load(ns, "s2", now=5).values) == {"keep": 1}
        self.new(ns, "s3", now=6, ttl=10)
        ns.commit("s3", version=0, writes={"tok": "u"}, ttl_deadlines={"tok": 12}, now=6)
        reaped = ns.reap(now=50, limit=10)
        assert [(e.sid, e.state, e.reason) for e in reaped] == [
            ("s1", None, DeleteReason.IDLE),
            ("s3", "tok", DeleteReason.TTL),
            ("s2", None, DeleteReason.IDLE),
            ("s3", None, DeleteReason.IDLE),
        ]
        assert dict(reaped[1].values) == {"tok": "u"}
        assert dict(reaped[2].values) == {"keep": 1}

    def test_value_ttl_expires_on_load_and_rewrite_extends_it(self, ns: StoreNamespace) -> None:
        self.new(ns, ttl=100)
        version = ns.commit("s1", version=0, writes={"t": 1}, ttl_deadlines={"t": 5}, now=0)
        ns.commit("s1", version=version, writes={"t": 2}, ttl_deadlines={"t": 9}, now=4)
        assert dict(self.load(ns, "s1", now=6).values) == {"t": 2}
        loaded = self.load(ns, "s1", now=9)
        assert dict(loaded.values) == {}
        assert [(e.state, dict(e.values)) for e in loaded.expired] == [("t", {"t": 2})]
        assert ns.reap(now=18, limit=10) == ()  # claimed once, by that load

    def test_a_value_written_without_a_deadline_loses_the_one_it_had(
        self, ns: StoreNamespace
    ) -> None:
        """One value, and 250 at once (past what a Redis commit reads of their
        deadlines first): rewritten without a deadline, none expires. Fails if a
        commit kept a deadline it was not given."""
        self.new(ns, ttl=100)
        many = {f"m{i}": i for i in range(250)}
        version = ns.commit(
            "s1",
            version=0,
            writes={"t": 1, **many},
            ttl_deadlines=dict.fromkeys(["t", *many], 5.0),
            now=0,
        )
        version = ns.commit("s1", version=version, writes={"t": 2}, ttl_deadlines={}, now=1)
        ns.commit("s1", version=version, writes=many, ttl_deadlines={}, now=2)
        loaded = self.load(ns, "s1", now=9)
        assert dict(loaded.values) == {"t": 2, **many}
        assert list(loaded.expired) == []
        assert ns.reap(now=15, limit=1000) == ()  # before the session's own deadline

    def test_each_expired_entry_is_claimed_by_one_reaper(self, ns: StoreNamespace) -> None:
        for i in range(400):
            ns.create_session(f"s{i}", now=0, deadline=float(i % 7), capacity=10_000)
        claimed: list[Ended] = []
        lock = threading.Lock()
        start = threading.Barrier(8)

        def reaper() -> None:
            start.wait()
            while batch := ns.reap(now=10, limit=3):
                with lock:
                    claimed.extend(batch)

        threads = [threading.Thread(target=reaper) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(e.sid for e in claimed) == sorted(f"s{i}" for i in range(400))
        assert ns.session_count() == 0

    # -- capacity ----------------------------------------------------------------

    def test_capacity_evicts_closed_then_least_recently_used(self, ns: StoreNamespace) -> None:
        for sid in ("a", "b", "c"):
            ns.create_session(sid, now=0, deadline=100, capacity=3)
        ns.load_session("a", now=1, touch_until=101)  # b is now least recently used
        ns.close_session("c", now=1, deadline=50)
        first = ns.create_session("d", now=2, deadline=102, capacity=3)
        second = ns.create_session("e", now=2, deadline=102, capacity=3)
        assert [(e.sid, e.reason, e.was_closed) for e in first] == [
            ("c", DeleteReason.EVICTED, True)
        ]
        assert [(e.sid, e.reason) for e in second] == [("b", DeleteReason.EVICTED)]
        assert ns.session_count() == 3
        evicted = ns.load_session("b", now=3, touch_until=None)
        assert isinstance(evicted, Gone)
        assert evicted.reason is DeleteReason.EVICTED

    def test_capacity_victim_already_due_keeps_its_true_reason(self, ns: StoreNamespace) -> None:
        ns.create_session("old", now=0, deadline=5, capacity=1)
        (ended,) = ns.create_session("new", now=6, deadline=16, capacity=1)
        assert (ended.sid, ended.reason) == ("old", DeleteReason.IDLE)

    # -- globals -----------------------------------------------------------------

    def test_global_compare_and_set(self, ns: StoreNamespace) -> None:
        assert ns.global_get("g") is None
        assert ns.global_cas("g", version=None, value=[1]) == 1
        assert ns.global_cas("g", version=None, value=[2]) is None
        assert ns.global_get("g") == ([1], 1)
        assert ns.global_cas("g", version=1, value=[3]) == 2
        assert ns.global_get("g") == ([3], 2)

    def test_global_add_is_atomic_under_threads(self, ns: StoreNamespace) -> None:
        def work() -> None:
            for _ in range(2000):
                ns.global_add("n", 1, default=0)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        found = ns.global_get("n")
        assert found is not None
        assert found[0] == 16_000

    def test_namespaces_are_separate(self, store: Store) -> None:
        one = store.namespace(f"one-{uuid.uuid4().hex[:6]}")
        two = store.namespace(f"two-{uuid.uuid4().hex[:6]}")
        self.new(one)
        assert one.global_add("n", 5, default=0) == 5
        assert two.load_session("s1", now=0, touch_until=None) is None
        assert two.global_get("n") is None
        assert two.session_count() == 0


class SharedStoreContract(StoreContract):
    """What stores shared by several processes add: leases and notices. Values are
    bytes made by the store's codec."""

    def test_store_is_shared_with_a_codec(self, store: Store) -> None:
        assert store.shared
        assert store.codec is not None

    def test_lease_excludes_other_events_until_released(self, ns: StoreNamespace) -> None:
        self.new(ns, ttl=100)
        first = ns.load_session("s1", now=1, touch_until=101, lease=Lease(token="a", until=31))
        assert isinstance(first, Loaded)
        busy = ns.load_session("s1", now=2, touch_until=102, lease=Lease(token="b", until=32))
        assert busy == Busy(until=31)
        assert isinstance(ns.load_session("s1", now=2, touch_until=None), Loaded)  # a peek
        ns.release("s1", lease="a")
        again = ns.load_session("s1", now=3, touch_until=103, lease=Lease(token="b", until=33))
        assert isinstance(again, Loaded)

    def test_lapsed_lease_can_be_taken_and_fences_the_slow_commit(
        self, ns: StoreNamespace
    ) -> None:
        self.new(ns, ttl=100)
        ns.load_session("s1", now=1, touch_until=101, lease=Lease(token="slow", until=5))
        taken = ns.load_session("s1", now=6, touch_until=106, lease=Lease(token="fast", until=36))
        assert isinstance(taken, Loaded)
        with pytest.raises(StoreConflict):
            ns.commit("s1", version=0, writes={"a": b"1"}, ttl_deadlines={}, now=7, lease="slow")
        assert (
            ns.commit("s1", version=0, writes={"a": b"2"}, ttl_deadlines={}, now=7, lease="fast")
            == 1
        )
        assert dict(self.load(ns, "s1", now=8).values) == {"a": b"2"}

    def test_commit_without_release_keeps_the_lease(self, ns: StoreNamespace) -> None:
        self.new(ns, ttl=100)
        ns.load_session("s1", now=1, touch_until=101, lease=Lease(token="a", until=31))
        ns.commit(
            "s1", version=0, writes={"x": b"1"}, ttl_deadlines={}, now=2, lease="a", release=False
        )
        busy = ns.load_session("s1", now=3, touch_until=103, lease=Lease(token="b", until=33))
        assert isinstance(busy, Busy)
        ns.commit("s1", version=1, writes={"y": b"1"}, ttl_deadlines={}, now=3, lease="a")
        free = ns.load_session("s1", now=4, touch_until=104, lease=Lease(token="b", until=34))
        assert isinstance(free, Loaded)

    def test_other_handles_receive_notices(self, store: Store) -> None:
        import threading
        import uuid

        app = f"notices-{uuid.uuid4().hex[:6]}"
        writer, reader = store.namespace(app), store.namespace(app)
        received: list[Notice] = []
        got_all = threading.Event()

        def on_notice(notice: Notice) -> None:
            received.append(notice)
            if len(received) >= 2:
                got_all.set()

        unsubscribe = reader.subscribe(on_notice)
        try:
            writer.create_session("s1", now=0, deadline=100, capacity=10)
            writer.commit("s1", version=0, writes={"cart": b"[]"}, ttl_deadlines={}, now=1)
            writer.close_session("s1", now=2, deadline=50)
            assert got_all.wait(5)
        finally:
            unsubscribe()
        assert [(n.kind, n.sid, n.names, n.reason) for n in received[:2]] == [
            ("changed", "s1", ("cart",), None),
            ("ended", "s1", (), DeleteReason.CLOSED),
        ]
        assert all(n.origin != reader.origin for n in received)  # type: ignore[attr-defined]
