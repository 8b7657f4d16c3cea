"""Faults and hostile input on every store: engines sharing a store, values that no
longer decode or cannot be encoded, one value deleted once, damaged data under the
Redis prefix."""

from __future__ import annotations

import gc
import json
import logging
import sys
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from statekit import (
    BrowserKeys,
    CodecError,
    DeleteReason,
    GlobalState,
    JSONCodec,
    SessionNotFound,
    SessionState,
    SignedPickleCodec,
    StateEngine,
    StoreUnavailable,
    TokenProblem,
    ValueNotStorable,
)
from statekit.exceptions import SessionCorrupt
from statekit.stores import MemoryStore, Notice, Store
from statekit.stores._redis_failures import DamagedKey
from statekit.stores._redis_namespace import BUDGET_MIN
from statekit.stores.redis import RedisStore
from statekit.stores.sqlite import SQLiteStore
from statekit.testing import FakeClock, RedisServer, checked_store

from .conftest import StoreFactory

# A text any client can send: JSON allows a lone surrogate escape.
LONE = json.loads('"ann\\ud800"')
HUGE = 10**5000
SECRET = "s" * 32


def recorder() -> tuple[list[Any], Any]:
    calls: list[Any] = []
    return calls, lambda *args: calls.append(args)


@pytest.fixture
def moved_class() -> Iterator[types.ModuleType]:
    """A module with a dataclass, which the test removes as a deploy would."""
    name = f"statekit_test_moved_{uuid.uuid4().hex[:6]}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec("import dataclasses\n@dataclasses.dataclass\nclass Old:\n    a: int\n", module.__dict__)
    yield module
    sys.modules.pop(name, None)


# -- engines sharing one store ---------------------------------------------------------


def test_one_engines_shutdown_leaves_another_engines_state(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    """Two engines on one store and app share its state; shutting one down ends only
    what belongs to it (its per-process objects). On the memory store the data lives
    until the last engine shuts down, and that one's callbacks run, once each.

    Fails if ``a.shutdown()`` clears the shared data (b's session is then unknown and
    b's callbacks never run) or runs callbacks of b's."""
    store = make_store()
    memory = isinstance(store, MemoryStore)
    a = StateEngine(store, app="shop", clock=clock)
    b = StateEngine(store, app="shop", clock=clock)
    a_deleted, a_on_delete = recorder()
    b_deleted, b_on_delete = recorder()
    a.session_state("cart", [], on_delete=a_on_delete)
    cart: SessionState[list[str]] = b.session_state("cart", [], on_delete=b_on_delete)
    visitors = b.global_state("visitors", 0)
    a_closed, a_on_close = recorder()
    b_closed, b_on_close = recorder()
    a.on_close(a_on_close)
    b.on_close(b_on_close)
    a_cleaned, a_cleanup = recorder()
    b_cleaned, b_cleanup = recorder()
    a_objects = a.registry("conn", lambda sid: ["a", sid], a_cleanup)
    b_objects = b.registry("conn", lambda sid: ["b", sid], b_cleanup)

    sid = b.open_session()
    a_objects.open(sid)
    b_objects.open(sid)
    with b.event(sid) as ev:
        ev[cart].append("milk")
    visitors.increment()

    a.shutdown()
    assert a_cleaned == [(["a", sid],)]  # a's own object, once
    assert cart.get(sid) == ["milk"]  # b's session, values and globals are intact
    assert visitors.get() == 1
    with b.event(sid) as ev:
        ev[cart].append("bread")
    assert b_objects.get(sid) == ["b", sid]
    assert (a_deleted, b_deleted, a_closed, b_closed, b_cleaned) == ([], [], [], [], [])

    b.shutdown()
    assert b_cleaned == [(["b", sid],)]
    if memory:  # the last engine ends the data: its callbacks run, once each
        assert b_deleted == [(["milk", "bread"], DeleteReason.SHUTDOWN)]
        assert b_closed == [(sid, DeleteReason.SHUTDOWN)]
    else:  # a durable store keeps it for the next engine
        assert (b_deleted, b_closed) == ([], [])
        c = StateEngine(make_store(), app="shop", clock=clock)
        assert c.session_state("cart", []).get(sid) == ["milk", "bread"]
        c.shutdown()
    assert (a_deleted, a_closed) == ([], [])  # nothing of b's ran in a
    assert a_cleaned == [(["a", sid],)]


def test_an_engine_dropped_without_shutdown_does_not_keep_the_data_forever() -> None:
    store = MemoryStore()
    deleted, on_delete = recorder()
    kept = StateEngine(store, app="shop")
    note = kept.session_state("note", "", on_delete=on_delete)
    dropped = StateEngine(store, app="shop")
    sid = kept.open_session()
    with kept.event(sid) as ev:
        ev[note] = "x"
    del dropped
    gc.collect()
    kept.shutdown()
    assert deleted == [("x", DeleteReason.SHUTDOWN)]


def test_a_new_engine_after_the_last_shutdown_starts_empty() -> None:
    store = MemoryStore()
    first = StateEngine(store, app="shop")
    sid = first.open_session()
    first.shutdown()
    second = StateEngine(store, app="shop")
    assert not second.exists(sid)
    assert second.session_count() == 0
    second.shutdown()


# -- values that no longer decode ------------------------------------------------------


def test_a_global_that_no_longer_decodes_can_be_set_and_says_why_it_cannot_be_read(
    make_store: StoreFactory, clock: FakeClock, moved_class: types.ModuleType
) -> None:
    """A deploy moved the class of a stored global. ``set()`` must still replace it
    (it used to decode the old value first and raise); ``get()`` and ``update()`` of a
    strict state raise a CodecError that names the state."""
    engine = StateEngine(make_store(), app="shop", clock=clock)
    holder: GlobalState[Any] = engine.global_state("holder", None, strict=True)
    fired, on_change = recorder()
    holder.on_change(on_change)
    holder.set(moved_class.Old(1))
    del sys.modules[moved_class.__name__]
    for call in (holder.get, lambda: holder.update(lambda v: v)):
        with pytest.raises(CodecError, match="global state 'holder'") as info:
            call()
        assert info.value.state == "holder"
    holder.set({"migrated": True})
    assert holder.get() == {"migrated": True}
    assert fired[-1] == ({"migrated": True},)  # a change: listeners heard of it
    engine.shutdown()


def test_a_session_value_that_no_longer_decodes_says_which_state(
    make_store: StoreFactory, clock: FakeClock, moved_class: types.ModuleType
) -> None:
    engine = StateEngine(make_store(), app="shop", clock=clock)
    holder: SessionState[Any] = engine.session_state("holder", None, strict=True)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[holder] = [moved_class.Old(1)]
    del sys.modules[moved_class.__name__]
    with pytest.raises(CodecError, match="session state 'holder'"):
        holder.get(sid)
    with pytest.raises(CodecError, match="session state 'holder'"), engine.event(sid) as ev:
        ev[holder]
    with engine.event(sid) as ev:  # assigning replaces it without reading it
        ev[holder] = ["migrated"]
    assert holder.get(sid) == ["migrated"]
    engine.shutdown()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_with_signed_pickles_a_moved_class_can_be_replaced(
    kind: str,
    tmp_path: Path,
    redis_server: RedisServer,
    clock: FakeClock,
    moved_class: types.ModuleType,
) -> None:
    """With SignedPickleCodec (chosen for values JSON cannot carry), a moved class used
    to make set() and assignment raise a raw AttributeError: nothing could replace it."""
    codec = SignedPickleCodec([SECRET])
    store: Store = (
        SQLiteStore(tmp_path / "p.db", codec=codec)
        if kind == "sqlite"
        else RedisStore(redis_server.url, prefix=f"p{uuid.uuid4().hex[:6]}", codec=codec)
    )
    engine = StateEngine(store, app="shop", clock=clock)
    holder: SessionState[Any] = engine.session_state("holder", None, strict=True)
    shared: GlobalState[Any] = engine.global_state("shared", None, strict=True)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[holder] = moved_class.Old(1)
    shared.set(moved_class.Old(2))
    del sys.modules[moved_class.__name__]
    with pytest.raises(CodecError, match="session state 'holder'"):
        holder.get(sid)
    with pytest.raises(CodecError, match="global state 'shared'"):
        shared.get()
    with engine.event(sid) as ev:
        ev[holder] = "replaced"
    shared.set("replaced")
    assert (holder.get(sid), shared.get()) == ("replaced", "replaced")
    engine.shutdown()


# -- one value, one deletion ------------------------------------------------------------


class LenientCodec:
    """JSON, except that empty bytes read as an empty string: with it, a phantom
    deletion of a value that was already gone would run its callback."""

    name = "lenient-json"
    _json = JSONCodec()

    def encode(self, value: Any) -> bytes:
        return self._json.encode(value)

    def decode(self, data: bytes) -> Any:
        return "" if data == b"" else self._json.decode(data)


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_a_value_with_a_ttl_in_an_expired_session_is_deleted_once(
    kind: str, tmp_path: Path, redis_server: RedisServer, clock: FakeClock
) -> None:
    """The session's idle deadline and its value's own ttl deadline are both due when
    reaping runs. Redis used to claim the session, then the value again (already gone):
    ``reap()`` counted 2 and the callback ran twice (``idle``, then ``ttl``)."""
    store: Store
    if kind == "memory":
        store = MemoryStore()
    elif kind == "sqlite":
        store = SQLiteStore(tmp_path / "s.db", codec=LenientCodec())
    else:
        store = RedisStore(
            redis_server.url, prefix=f"p{uuid.uuid4().hex[:6]}", codec=LenientCodec()
        )
    engine = StateEngine(store, app="shop", clock=clock, idle_ttl=10)
    deleted, on_delete = recorder()
    token = engine.session_state("token", "", ttl=100, on_delete=on_delete)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[token] = "abc"
    clock.advance(200)
    assert engine.reap() == 1
    assert deleted == [("abc", DeleteReason.IDLE)]
    engine.shutdown()


# -- values a codec cannot encode ------------------------------------------------------


def shared_engine(kind: str, tmp_path: Path, server: RedisServer, clock: FakeClock) -> StateEngine:
    store: Store
    if kind == "sqlite":
        store = SQLiteStore(tmp_path / "v.db")
    elif kind == "redis":
        store = RedisStore(server.url, prefix=f"v{uuid.uuid4().hex[:6]}")
    else:  # the memory store, checking values as the shared stores would
        store = checked_store()
    return StateEngine(store, app="shop", clock=clock)


@pytest.mark.parametrize("kind", ["sqlite", "redis", "checked memory"])
def test_unencodable_values_say_where_they_are_and_write_nothing(
    kind: str, tmp_path: Path, redis_server: RedisServer, clock: FakeClock
) -> None:
    """A lone surrogate (any client can send one in JSON) and an int too long to write
    as text used to escape as UnicodeEncodeError and ValueError."""
    engine = shared_engine(kind, tmp_path, redis_server, clock)
    cart: SessionState[list[Any]] = engine.session_state("cart", [])
    note = engine.session_state("note", "")
    big = engine.global_state("big", 0)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[cart] = ["kept"]
    for value, where in (
        (["kept", 1, 2, {"name": LONE}], "[3]['name']"),
        (["kept", HUGE], "[1]"),
    ):
        with pytest.raises(ValueNotStorable) as info, engine.event(sid) as ev:
            ev[cart] = value
        assert info.value.where == where
        assert info.value.state == "cart"
        assert f"cart{where} is " in str(info.value)
        assert repr(LONE) not in str(info.value)  # never the value itself
    with pytest.raises(ValueNotStorable, match="lone surrogate"), engine.event(sid) as ev:
        ev[note] = LONE  # a str on its own, not only inside a container
    assert cart.get(sid) == ["kept"]  # nothing was written
    assert note.get(sid) == ""
    with pytest.raises(ValueNotStorable, match="more than 4300 digits"):
        big.set(HUGE)
    with pytest.raises(ValueNotStorable, match="more than 4300 digits"):
        big.increment(HUGE)
    assert big.get() == 0
    engine.shutdown()


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_browser_values_that_cannot_be_encoded_are_refused_naming_the_state(
    kind: str, tmp_path: Path, redis_server: RedisServer, clock: FakeClock
) -> None:
    engine = (
        StateEngine(clock=clock)
        if kind == "memory"
        else shared_engine(kind, tmp_path, redis_server, clock)
    )
    login = engine.browser_state("login", {"user": ""}, keys=BrowserKeys([SECRET]))
    sid = engine.open_session()
    with pytest.raises(ValueNotStorable) as info, engine.event(sid) as ev:
        ev[login] = {"user": LONE}
    assert info.value.where == "['user']"
    assert "login['user']" in str(info.value)
    engine.shutdown()


def test_browser_decoding_never_raises_whatever_the_binding() -> None:
    keys = BrowserKeys([SECRET])
    token = keys.encode({"a": 1}, storage_key="k", now=0.0, bind="user")
    for bind in ("user\ud800", LONE, "\udc80", "\x00"):
        decoded = keys.decode(token, storage_key="k", now=0.0, bind=bind)
        assert decoded.problem is TokenProblem.WRONG_STORAGE_KEY
        own = keys.encode([1], storage_key="k", now=0.0, bind=bind)
        assert keys.decode(own, storage_key="k", now=0.0, bind=bind).value == [1]
        refused = keys.decode(own, storage_key="k", now=0.0, bind="user")
        assert refused.problem is TokenProblem.WRONG_STORAGE_KEY


def test_keys_and_members_a_codec_refuses_are_located_without_being_quoted(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A huge int as a dict key or set member used to escape as a raw ValueError (the
    message itself called repr() on it), and keys were quoted whole: a key may be a
    secret."""
    engine = StateEngine(SQLiteStore(tmp_path / "k.db"), app="shop", clock=clock)
    things: SessionState[Any] = engine.session_state("things", None)
    sid = engine.open_session()
    secret_key = "card=4111111111111111 " + LONE
    for value, where in (
        ({HUGE: "x"}, " (key 0 of the dict)"),
        ({HUGE}, " (member 0 of the set)"),
        ({"a": 1, secret_key: 2}, " (key 1 of the dict)"),
        ({"ok": {secret_key: [LONE]}}, "['ok'] (key 0 of the dict)"),
        ({"ok": {"card=4111111111111111 ": [LONE]}}, "['ok'] (under key 0 of the dict)[0]"),
        ({"sk_live_4111111111111111": [LONE]}, " (under key 0 of the dict)[0]"),
        ({"4111111111111111": [LONE]}, " (under key 0 of the dict)[0]"),
        ({4111111111111111: [LONE]}, " (under key 0 of the dict)[0]"),
        ({"line_items": [LONE]}, "['line_items'][0]"),
    ):
        with pytest.raises(ValueNotStorable) as info, engine.event(sid) as ev:
            ev[things] = value
        assert info.value.where == where
        assert "4111" not in str(info.value)
    engine.shutdown()


def test_a_checked_store_refuses_defaults_when_declared(clock: FakeClock) -> None:
    engine = StateEngine(checked_store(), clock=clock)
    for default in (LONE, HUGE, [object()]):
        with pytest.raises(ValueNotStorable):
            engine.session_state(f"s{id(default)}", default)
        with pytest.raises(ValueNotStorable):
            engine.global_state(f"g{id(default)}", default)
    engine.shutdown()


def test_the_memory_store_checks_values_only_when_asked(clock: FakeClock) -> None:
    plain = StateEngine(clock=clock)
    checked = StateEngine(checked_store(), clock=clock)
    for engine, refuses in ((plain, False), (checked, True)):
        note: SessionState[Any] = engine.session_state("note", "")
        things: SessionState[Any] = engine.session_state("things", [])
        sid = engine.open_session()
        for state, value in ((note, LONE), (note, HUGE), (things, [object()])):
            if refuses:
                with pytest.raises(ValueNotStorable), engine.event(sid) as ev:
                    ev[state] = value
            else:
                with engine.event(sid) as ev:
                    ev[state] = value
        engine.shutdown()
    with pytest.raises(TypeError, match="check_values takes a codec"):
        MemoryStore(check_values="json")  # type: ignore[arg-type]


# -- damaged data under the Redis prefix -----------------------------------------------


@pytest.fixture
def redis_engine(redis_server: RedisServer, clock: FakeClock) -> Iterator[StateEngine]:
    store = RedisStore(redis_server.url, prefix=f"g{uuid.uuid4().hex[:6]}")
    engine = StateEngine(store, app="shop", clock=clock, idle_ttl=60, capacity=3)
    yield engine
    engine.shutdown()
    store.close()


def keys_of(engine: StateEngine) -> tuple[Any, str]:
    ns: Any = engine.store.namespace(engine.app)
    return engine.store.client, ns.P  # type: ignore[attr-defined]


def test_junk_in_the_deadline_index_is_removed_and_reaping_goes_on(
    redis_engine: StateEngine, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """One junk member used to make every reap() fail forever (a Lua error), silently
    for ordinary calls, so that no session was ever reaped again."""
    engine = redis_engine
    client, P = keys_of(engine)
    deleted, on_delete = recorder()
    note = engine.session_state("note", "", on_delete=on_delete)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[note] = "x"
    junk = ["garbage", "s\0no-such-session", "v\0no-second-separator", "v\0gone\0note"]
    client.zadd(P + "dl", dict.fromkeys(junk, 0))
    clock.advance(61)
    with caplog.at_level(logging.WARNING, logger="statekit"):
        assert engine.reap() == 1
    assert deleted == [("x", DeleteReason.IDLE)]
    assert client.zcard(P + "dl") == 0  # the junk is gone too
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1  # one warning per reap, however much junk
    assert f"removed {len(junk)} damaged entries from {P + 'dl'!r}" in warnings[0]
    assert "no-such-session" not in warnings[0]  # ids are never logged whole
    engine.open_session()  # ordinary calls work


def test_a_pile_of_junk_is_cleared_in_short_scripts_and_due_entries_still_reaped(
    redis_engine: StateEngine, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Index entries left behind by sessions the server dropped (a day-long outage
    outlives the keys' backstop ttl) can pile up. No single script may look at all of
    them (it would hold up every client of the server), and a reap must still reach
    the due entry behind them: it returns fewer than asked only when none are due
    (engine.reap() relies on that to know it is done)."""
    engine = redis_engine
    client, P = keys_of(engine)
    ns: Any = engine.store.namespace(engine.app)
    sid = engine.open_session()
    client.zadd(P + "dl", {f"s\0ghost-{i}": 0 for i in range(10_000)})
    calls: list[int] = []
    original = RedisStore.run

    def counted(self: RedisStore, script: Any, keys: list[str], args: list[Any], **kw: Any) -> Any:
        if script == "REAP":  # ARGV: the app's settings, now, limit, n, n ids, members
            calls.append(len(args) - 4 - int(args[3]))  # the members it looks at
        return original(self, script, keys, args, **kw)

    monkeypatch.setattr(RedisStore, "run", counted)
    clock.advance(61)
    ended = ns.reap(now=clock(), limit=8)
    assert [e.sid for e in ended] == [sid]
    client.zadd(P + "dl", {f"s\0ghost-{i}": 0 for i in range(10_000)})
    assert engine.reap(limit=5) == 0  # the engine asks until the store says none are due
    assert client.zcard(P + "dl") == 0
    assert client.zcard(P + "dl") == 0
    assert max(calls) <= BUDGET_MIN  # no script looks at more than its budget
    assert len(calls) >= 10_000 // max(calls)  # several short scripts, not one long one
    remembered = [client.get(key) for key in client.keys(P + "q:*")]
    assert not any(b"ghost" in reply for reply in remembered)  # junk is not remembered


def test_an_index_entry_naming_a_live_value_without_a_ttl_deletes_nothing(
    redis_engine: StateEngine, clock: FakeClock
) -> None:
    """A forged deadline-index member pointing at a value that has no ttl of its own
    used to delete it as if its ttl had passed."""
    engine = redis_engine
    client, P = keys_of(engine)
    note = engine.session_state("note", "")
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[note] = "keep me"
    client.zadd(P + "dl", {f"v\0{sid}\0note": 0})
    assert engine.reap() == 0
    assert note.get(sid) == "keep me"


def test_junk_in_the_capacity_order_holds_no_place(
    redis_engine: StateEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Entries of the least-recently-used order that name no session used to be
    'evicted' as if they were sessions: close hooks ran for ids never issued."""
    engine = redis_engine
    client, P = keys_of(engine)
    ended, on_close = recorder()
    engine.on_close(on_close)
    client.zadd(P + "lru", {"ghost-1": 0, "ghost-2": 0})
    with caplog.at_level(logging.WARNING, logger="statekit"):
        sids = [engine.open_session() for _ in range(3)]  # capacity 3: only ghosts go
    assert all(engine.exists(sid) for sid in sids)
    assert engine.session_count() == 3
    assert ended == []
    assert sum("damaged entry" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize("index", ["dl", "lru", "closed"])
def test_a_damaged_index_is_named_and_nothing_is_half_written(
    redis_engine: StateEngine, clock: FakeClock, index: str
) -> None:
    """An index key of another type used to make scripts fail after their first writes
    (Redis does not undo them): a commit wrote its value without its version, a close
    marked the session without indexing it, each reap deleted a session and lost its
    callbacks, and the error blamed a healthy session."""
    engine = redis_engine
    client, P = keys_of(engine)
    deleted, on_delete = recorder()
    note = engine.session_state("note", "", ttl=30, on_delete=on_delete)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[note] = "before"
    before = client.hgetall(P + "s:" + sid)
    saved = client.dump(P + index)
    client.delete(P + index)
    client.set(P + index, "a string")
    clock.advance(61)
    calls: list[Callable[[], object]] = [
        engine.open_session,
        lambda: engine.close_session(sid),
        engine.reap,
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable, match=f"the key '{P}{index}' holds another type"):
            call()
    with pytest.raises(StoreUnavailable, match="holds another type"), engine.event(sid) as ev:
        ev[note] = "after"
    assert client.hgetall(P + "s:" + sid) == before  # nothing half-written
    assert deleted == []
    client.delete(P + index)  # the operator repairs it
    if saved is not None:
        client.restore(P + index, 0, saved)
    # The value's ttl and the session's idle time passed meanwhile: both reaped now.
    assert engine.reap() == 2
    assert deleted == [("before", DeleteReason.TTL)]


def test_a_damaged_index_stops_only_what_would_write_to_it(
    redis_engine: StateEngine, clock: FakeClock
) -> None:
    """Loads and commits check the indexes only before writing to one (a type check
    is a server call of its own, on every event otherwise). An event that writes no
    index entry goes on; one that would (a deadline that slides, a value's own ttl) is
    refused before it writes anything. Fails if the lazy check let a write through to
    a damaged index, or if it refused events that do not touch it."""
    engine = redis_engine
    client, P = keys_of(engine)
    count = engine.session_state("count", 0)
    note = engine.session_state("note", "", ttl=30)
    sid = engine.open_session()
    # A session whose value has a deadline of its own, written while the index is whole.
    ns: Any = engine.store.namespace(engine.app)
    other = engine.open_session()
    now = engine.clock()
    version = ns.commit(
        other, version=0, writes={"note": b'"x"'}, ttl_deadlines={"note": now + 30}, now=now
    )
    client.delete(P + "dl")
    client.set(P + "dl", "a string")
    with engine.event(sid) as ev:  # no slide, no value deadline: no index written
        ev[count] = 1
    assert count.get(sid) == 1
    with pytest.raises(StoreUnavailable, match="holds another type"), engine.event(sid) as ev:
        ev[note] = "with a ttl"  # would index the value's deadline
    clock.advance(20)  # the next load slides the session's deadline
    before = client.hgetall(P + "s:" + sid)
    with pytest.raises(StoreUnavailable, match="holds another type"), engine.event(sid) as ev:
        ev[count] = 2
    assert client.hgetall(P + "s:" + sid) == before  # not even the lease was taken
    assert client.get(P + "dl") == b"a string"
    # A commit taking away a value's deadline would remove its index entry: refused.
    kept = client.hgetall(P + "s:" + other)
    with pytest.raises(StoreUnavailable, match="holds another type"):
        ns.commit(other, version=version, writes={"note": b'"y"'}, ttl_deadlines={}, now=now)
    assert client.hgetall(P + "s:" + other) == kept


def test_a_slide_refused_by_a_damaged_capacity_order_writes_nothing(
    redis_engine: StateEngine, clock: FakeClock
) -> None:
    """A load that slides its session's deadline writes the deadline index first, then
    the capacity order: with the order damaged, the index entry is put back and
    nothing else is written (not the session's deadline, not the lease). Fails if the
    index kept the new deadline, or the hash changed."""
    engine = redis_engine
    client, P = keys_of(engine)
    count = engine.session_state("count", 0)
    sid = engine.open_session()
    member = f"s\0{sid}"
    indexed = client.zscore(P + "dl", member)
    client.delete(P + "lru")
    client.set(P + "lru", "a string")
    clock.advance(20)  # the next load slides the session's deadline
    before = client.hgetall(P + "s:" + sid)
    refused = pytest.raises(StoreUnavailable, match=f"the key '{P}lru' holds another type")
    with refused, engine.event(sid) as ev:
        ev[count] = 1
    assert client.hgetall(P + "s:" + sid) == before
    assert client.zscore(P + "dl", member) == indexed
    client.zrem(P + "dl", member)  # not indexed (a bug, a hand's edit): left so
    again = pytest.raises(StoreUnavailable, match=f"the key '{P}lru' holds another type")
    with again, engine.event(sid) as ev:
        ev[count] = 1
    assert client.zscore(P + "dl", member) is None
    client.zadd(P + "dl", {member: indexed})
    client.delete(P + "lru")  # the operator repairs it
    with engine.event(sid) as ev:
        ev[count] = 1
    assert client.zscore(P + "dl", member) > indexed  # slid now
    assert client.zscore(P + "lru", sid) is not None


def test_a_slide_the_server_refuses_for_memory_says_so_not_damage() -> None:
    """A load whose slide the server refuses for its own reasons (out of memory under
    ``noeviction``; the same path takes a demoted master's READONLY) raises what the
    server said, with nothing written, and works again once the server does; a read
    outside an event is still answered. Fails if every refusal reads as a damaged index
    (DamagedKey, telling an operator to delete the deadline index, and hiding a
    READONLY from a Sentinel client, which follows a failover on it), or if the read
    fails too."""
    server = RedisServer().start()
    try:
        client = redis.Redis(port=server.port)
        clock = FakeClock()
        store = RedisStore(server.url, prefix="oom")
        engine = StateEngine(store, app="shop", clock=clock, idle_ttl=60)
        count = engine.session_state("count", 0)
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[count] = 1
        P = store.namespace("shop").P
        before = client.hgetall(P + "s:" + sid)
        indexed = client.zscore(P + "dl", f"s\0{sid}")
        clock.advance(20)  # the next load slides the session's deadline
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", client.info("memory")["used_memory"] - 100_000)
        try:
            # A read outside an event is answered all the same (Redis serves reads),
            # without its slide; the event, which must write, is refused.
            assert count.get(sid) == 1
            refused = pytest.raises(StoreUnavailable, match="OutOfMemoryError")
            with refused as raised, engine.event(sid):
                pass
            assert not isinstance(raised.value, DamagedKey)
            assert client.hgetall(P + "s:" + sid) == before
            assert client.zscore(P + "dl", f"s\0{sid}") == indexed
        finally:
            client.config_set("maxmemory", 0)
        with engine.event(sid) as ev:
            ev[count] += 1
        assert count.get(sid) == 2
        engine.shutdown()
        store.close()
        client.close()
    finally:
        server.stop()


def test_a_slide_moves_the_keys_ttl_when_its_backstop_would_run_short(
    redis_engine: StateEngine, clock: FakeClock
) -> None:
    """A slide moves the session key's TTL (a backstop a day past the deadline) only
    when less than half a day of it would be left past the new deadline: an engine
    with a longer idle ttl (a setting changed in a rollout) must move it, or the key
    would vanish before the session's deadline. Fails if the TTL is never moved."""
    engine = redis_engine  # idle_ttl=60
    client, P = keys_of(engine)
    sid = engine.open_session()
    key = P + "s:" + sid
    assert client.pttl(key) < (60 + 86_400) * 1000 + 5_000
    longer = StateEngine(engine.store, app=engine.app, clock=clock, idle_ttl=2 * 86_400)
    try:
        clock.advance(20)
        with longer.event(sid):
            pass
        assert client.pttl(key) > (2 * 86_400 + 43_200) * 1000
    finally:
        longer.shutdown()


def test_a_version_too_large_to_count_on_is_damage_not_a_torn_write(
    redis_engine: StateEngine,
) -> None:
    engine = redis_engine
    client, P = keys_of(engine)
    note = engine.session_state("note", "")
    total = engine.global_state("total", 0)
    sid = engine.open_session()
    total.increment()
    client.hset(P + "s:" + sid, "_v", "9223372036854775807")
    client.hset(P + "g:total", "n", "9223372036854775807")
    with pytest.raises(SessionCorrupt), engine.event(sid) as ev:
        ev[note] = "torn?"
    assert client.hget(P + "s:" + sid, "v:note") is None
    for call in (total.increment, lambda: total.set(5), total.get):
        with pytest.raises(CodecError, match="global state 'total'"):
            call()
    assert client.hget(P + "g:total", "v") == b"1"


def test_a_deadline_index_behind_the_sessions_own_deadline_deletes_nothing(
    redis_engine: StateEngine, clock: FakeClock
) -> None:
    """The session's own deadline rules: an index entry saying it is due earlier
    (forged, or left by a bug) used to delete a live session."""
    engine = redis_engine
    client, P = keys_of(engine)
    sid = engine.open_session()
    deadline = float(client.hget(P + "s:" + sid, "_d"))
    client.zadd(P + "dl", {f"s\0{sid}": 0})
    assert engine.reap() == 0
    assert engine.exists(sid)
    assert client.zscore(P + "dl", f"s\0{sid}") == deadline  # indexed anew
    clock.advance(61)
    assert engine.reap() == 1


def test_a_key_of_another_type_is_reported_as_damaged(
    redis_engine: StateEngine, clock: FakeClock
) -> None:
    """A session or global key holding a string instead of a hash used to give
    'unavailable, retry', and in the middle of a reap lost the callbacks of what that
    reap had already removed (Lua does not roll back)."""
    engine = redis_engine
    client, P = keys_of(engine)
    deleted, on_delete = recorder()
    note = engine.session_state("note", "", on_delete=on_delete)
    total = engine.global_state("total", 0)
    first, broken, last = (engine.open_session() for _ in range(3))
    for sid in (first, last):
        with engine.event(sid) as ev:
            ev[note] = sid[:4]
    client.delete(P + "s:" + broken)
    client.set(P + "s:" + broken, "a string")
    with pytest.raises(SessionCorrupt, match="another type"), engine.event(broken):
        pass
    with pytest.raises(SessionCorrupt):
        note.get(broken)
    assert not engine.exists(broken)
    client.set(P + "g:total", "a string")
    for call in (total.get, total.increment, lambda: total.set(5)):
        with pytest.raises(CodecError, match="global state 'total'"):
            call()
    clock.advance(61)
    assert engine.reap() == 2  # both good sessions, around the broken one
    assert sorted(deleted) == sorted(
        [(first[:4], DeleteReason.IDLE), (last[:4], DeleteReason.IDLE)]
    )
    assert client.get(P + "s:" + broken) == b"a string"  # left for an operator


@pytest.mark.parametrize(
    ("field", "junk"),
    [
        ("_d", "not a number"),
        ("_d", "nan"),
        ("_d", "inf"),
        ("_v", "not a number"),
        ("_v", "-5"),
        ("_v", "9" * 16),
        ("t:note", "not a number"),
        ("t:note", "nan"),
        ("_lu", "not a number"),
        ("_lu", "inf"),
    ],
)
def test_a_damaged_session_says_so_naming_it_and_is_left_in_place(
    redis_engine: StateEngine, field: str, junk: str
) -> None:
    """A junk deadline used to give a raw ValueError on state.get and 'unavailable,
    retry when it is back' on events, although the server was up. Lua reads 'nan' and
    'inf' as numbers: a session with such a deadline was served for ever; and a read
    outside an event took a version the scripts refuse (negative, past 15 digits)."""
    engine = redis_engine
    client, P = keys_of(engine)
    note = engine.session_state("note", "", ttl=30)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[note] = "x"
    if field == "_lu":
        client.hset(P + "s:" + sid, "_l", "someone-else")
    client.hset(P + "s:" + sid, field, junk)
    before = client.hgetall(P + "s:" + sid)
    with pytest.raises(SessionCorrupt, match="damaged") as info, engine.event(sid):
        pass
    assert isinstance(info.value, SessionNotFound)  # hosts that reopen recover
    assert sid not in str(info.value)  # the id is a secret
    if field != "_lu":  # reads take no lease
        with pytest.raises(SessionCorrupt):
            note.get(sid)
    assert client.hgetall(P + "s:" + sid) == before  # left in place, unchanged
    assert not engine.exists(sid)  # not a session anyone can use


def test_a_damaged_value_deadline_does_not_outrank_a_session_past_its_own(
    redis_engine: StateEngine, clock: FakeClock
) -> None:
    """A load reads the whole session in one pass and meets a damaged value deadline
    before it knows whether the session is still alive: a session past its idle
    deadline still ends as idle (its hook runs, once), not as damaged and left in
    place; a live one with the same field says it is damaged. Fails if the damaged
    field is answered as soon as the pass meets it."""
    engine = redis_engine
    client, P = keys_of(engine)
    ended: list[tuple[str, DeleteReason]] = []
    engine.on_close(lambda sid, reason: ended.append((sid, reason)))
    note = engine.session_state("note", "", ttl=30)
    old, live = engine.open_session(), engine.open_session()
    for sid in (old, live):
        with engine.event(sid) as ev:
            ev[note] = "x"
        client.hset(P + "s:" + sid, "t:note", "junk")
    clock.advance(61)
    client.hset(P + "s:" + live, "_d", str(clock() + 60))
    with pytest.raises(SessionNotFound) as info, engine.event(old):
        pass
    assert not isinstance(info.value, SessionCorrupt)
    assert ended == [(old, DeleteReason.IDLE)]
    with pytest.raises(SessionCorrupt, match="damaged"), engine.event(live):
        pass


def test_a_deadline_that_is_not_a_number_never_stops_reaping(
    redis_engine: StateEngine, clock: FakeClock
) -> None:
    """A session whose deadline reads 'nan' was indexed again at that deadline by
    every reap, which Redis refused: every reap() then failed ('unavailable'), and no
    other session of the app was reaped again. Fails if reaping stops at it."""
    engine = redis_engine
    client, P = keys_of(engine)
    ended: list[str] = []
    engine.on_close(lambda sid, reason: ended.append(sid))
    damaged, good = engine.open_session(), engine.open_session()
    client.hset(P + "s:" + damaged, "_d", "nan")
    clock.advance(61)
    assert engine.reap() == 1
    assert ended == [good]
    with pytest.raises(SessionCorrupt), engine.event(damaged):
        pass


def test_a_global_with_a_damaged_version_is_never_incremented(redis_engine: StateEngine) -> None:
    """The server-side add used to write before it checked the version: each call said
    'nothing was written' and yet counted."""
    engine = redis_engine
    client, P = keys_of(engine)
    total = engine.global_state("total", 0)
    total.increment()
    client.hset(P + "g:total", "n", "junk")
    for _ in range(3):
        with pytest.raises(CodecError, match="global state 'total'"):
            total.increment()
    assert client.hget(P + "g:total", "v") == b"1"


def test_a_stray_value_deadline_is_removed_by_the_next_load(redis_engine: StateEngine) -> None:
    """A deadline field without its value used to stay forever, and made every load
    remember its whole reply."""
    engine = redis_engine
    client, P = keys_of(engine)
    sid = engine.open_session()
    client.hset(P + "s:" + sid, "t:ghost", "1")
    for _ in range(2):
        with engine.event(sid):
            pass
    assert client.hget(P + "s:" + sid, "t:ghost") is None
    assert not client.keys(P + "q:*") or all(
        b"ghost" not in client.get(key) for key in client.keys(P + "q:*")
    )


def test_junk_notices_are_ignored_and_counted(redis_engine: StateEngine) -> None:
    """Each junk message used to look like a lost connection: a full resync."""
    engine = redis_engine
    client, _ = keys_of(engine)
    ns: Any = engine.store.namespace(engine.app)
    received: list[Notice] = []
    arrived = threading.Event()

    def on_notice(notice: Notice) -> None:
        received.append(notice)
        if notice.kind == "changed":
            arrived.set()

    unsubscribe = ns.subscribe(on_notice)
    junk = [
        b"not json",
        b"[1, 2]",
        b"{}",
        json.dumps({"k": "exploded", "s": "x"}).encode(),
        json.dumps({"k": "ended", "s": "x", "r": "no-such-reason"}).encode(),
        json.dumps({"k": "changed", "s": 5}).encode(),
        json.dumps({"k": "changed", "s": "x", "n": [1]}).encode(),
    ]
    for message in junk:
        client.publish(ns.channel, message)
    other = StateEngine(RedisStore(engine.store.url, prefix=engine.store.prefix), app="shop")  # type: ignore[attr-defined]
    note = other.session_state("note", "")
    sid = other.open_session()
    with other.event(sid) as ev:
        ev[note] = "real"
    assert arrived.wait(10)
    assert [n.kind for n in received] == ["changed"]  # no resync, no junk
    assert ns.ignored_notices == len(junk)
    unsubscribe()
    other.shutdown()


def test_a_server_busy_with_a_long_script_is_unavailable_not_damaged(
    clock: FakeClock,
) -> None:
    """While another client's script runs past the server's busy threshold, every
    command gets a BUSY error reply. That is not damaged data: reads must say the store
    is unavailable (retry later), not that the session is corrupt (which a host answers
    by dropping the session) or that a global must be deleted."""
    import redis

    server = RedisServer().start()
    try:
        admin = redis.Redis.from_url(server.url)
        admin.config_set("busy-reply-threshold", 50)
        engine = StateEngine(RedisStore(server.url, prefix="busy"), app="shop", clock=clock)
        note = engine.session_state("note", "")
        total = engine.global_state("total", 0)
        sid = engine.open_session()
        total.increment()
        spin = threading.Thread(
            target=lambda: redis.Redis.from_url(server.url).eval(
                "local t = tonumber(redis.call('TIME')[1]) + 2 "
                "while tonumber(redis.call('TIME')[1]) < t do end",
                0,
            )
        )
        spin.start()
        busy = redis.Redis.from_url(server.url)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the server answers BUSY
            try:
                busy.ping()
            except redis.exceptions.ResponseError:
                break
            time.sleep(0.01)
        for call in (lambda: note.get(sid), total.get, engine.session_count):
            with pytest.raises(StoreUnavailable) as info:
                call()
            assert not isinstance(info.value, SessionCorrupt)
        spin.join(30)
        assert (note.get(sid), total.get()) == ("", 1)  # all there once it is done
        engine.shutdown()
        engine.store.close()  # type: ignore[attr-defined]
        busy.close()
        admin.close()
    finally:
        server.stop()
