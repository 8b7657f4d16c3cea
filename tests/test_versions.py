"""Values that survive deploys: a state's ``version`` and ``migrate``, stored values
that carry their version, and a value that cannot be read any more reading as the
default (with the reason) rather than breaking the session, unless the state is strict.

Each "deploy" is a fresh engine on a fresh store object over the same data, with the
old code's module removed from ``sys.modules`` and the new code's classes elsewhere."""

from __future__ import annotations

import dataclasses
import logging
import sys
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from statekit import (
    CodecError,
    GlobalState,
    InvalidDeclaration,
    MemoryStore,
    SessionState,
    SQLiteStore,
    StateEngine,
    StoredEnum,
    StoredObject,
)
from statekit.stores import Store
from statekit.stores.redis import RedisStore
from statekit.testing import RedisServer

VERSION_MARK = b"\x00statekit-v"


@pytest.fixture(params=["sqlite", "redis"])
def deploy(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> Iterator[Callable[[], Store]]:
    """Makes the store of each deploy: a new store object over the same data."""
    prefix = f"v{uuid.uuid4().hex[:6]}"
    made: list[Any] = []

    def store() -> Store:
        made.append(
            SQLiteStore(tmp_path / "state.db")
            if request.param == "sqlite"
            else RedisStore(redis_server.url, prefix=prefix)
        )
        return made[-1]  # type: ignore[no-any-return]

    yield store
    for each in made:
        each.close()


@pytest.fixture
def code() -> Iterator[Callable[[str, str], types.ModuleType]]:
    """Makes a module of "app code" (``code(name, source)``), removed at the end."""
    names: list[str] = []

    def make(name: str, source: str) -> types.ModuleType:
        name = f"{name}_{uuid.uuid4().hex[:6]}"
        module = types.ModuleType(name)
        sys.modules[name] = module
        exec(source, module.__dict__)
        names.append(name)
        return module

    yield make
    for name in names:
        sys.modules.pop(name, None)


V1 = """
import dataclasses, enum

class Size(enum.Enum):
    SMALL = "s"
    LARGE = "l"

@dataclasses.dataclass
class Item:
    name: str
    qty: int
    size: Size
"""

V2 = """
import dataclasses

@dataclasses.dataclass
class Line:
    title: str
    qty: int
    large: bool
"""


def stored_bytes(engine: StateEngine, sid: str, name: str) -> bytes:
    loaded: Any = engine.store.namespace(engine.app).load_session(
        sid, now=engine.clock(), touch_until=None
    )
    return loaded.values[name]  # type: ignore[no-any-return]


def test_a_deploy_migrates_values_a_moved_and_renamed_class_stored(
    deploy: Callable[[], Store], code: Callable[[str, str], types.ModuleType]
) -> None:
    """Version 1 stores a cart of dataclasses (with an enum) and a global; version 2
    moved the class to another module, renamed a field and replaced the enum. A fresh
    engine reads both migrated, from the fields as stored; the event that read the
    cart writes it back as version 2, once; version 1 code then refuses to read it
    rather than overwrite it. Fails if values carry no version (migrate is never
    called, or is called again after the write-back), or if migrate gets instances
    of classes that no longer exist."""
    v1 = code("shop_v1", V1)
    old = StateEngine(deploy(), app="shop")
    cart: SessionState[Any] = old.session_state("cart", [])
    featured = old.global_state("featured", None)
    sid = old.open_session()
    with old.event(sid) as ev:
        ev[cart] = [v1.Item("apple", 2, v1.Size.LARGE), v1.Item("pear", 1, v1.Size.SMALL)]
    featured.set(v1.Item("plum", 9, v1.Size.SMALL))
    old.shutdown()
    del sys.modules[v1.__name__]  # the deploy: version 1's code is gone

    v2 = code("shop_v2", V2)
    calls: list[tuple[int, Any]] = []

    def migrate(version: int, stored: Any) -> Any:
        calls.append((version, stored))
        if stored is None:
            return None
        items = stored if isinstance(stored, list) else [stored]
        lines = [
            v2.Line(f["name"], f["qty"], f["size"].value == "l")
            for f in (item.fields for item in items)
        ]
        return lines if isinstance(stored, list) else lines[0]

    new = StateEngine(deploy(), app="shop")
    cart2: SessionState[Any] = new.session_state("cart", [], version=2, migrate=migrate)
    featured2 = new.global_state("featured", None, version=2, migrate=migrate)
    assert cart2.get(sid) == [v2.Line("apple", 2, True), v2.Line("pear", 1, False)]
    assert featured2.get() == v2.Line("plum", 9, False)
    assert calls[0][0] == 1
    assert calls[0][1][0] == StoredObject(
        f"{v1.__name__}:Item",
        {"name": "apple", "qty": 2, "size": StoredEnum(f"{v1.__name__}:Size", "l")},
    )
    with new.event(sid) as ev:
        assert ev[cart2][0] == v2.Line("apple", 2, True)
    assert ev.result.changed == frozenset()  # a migration is not a change
    assert ev.result.value_problems == {}
    assert stored_bytes(new, sid, "cart").startswith(VERSION_MARK + b"2\x00")
    calls.clear()
    with new.event(sid) as ev:
        ev[cart2].append(v2.Line("fig", 3, False))
    assert calls == []  # read as version 2 now
    new.shutdown()

    rollback = StateEngine(deploy(), app="shop")
    cart1: SessionState[Any] = rollback.session_state("cart", [])
    with pytest.raises(CodecError, match="version 2 of the app"):
        cart1.get(sid)
    with pytest.raises(CodecError, match="version 2"), rollback.event(sid) as ev:
        ev[cart1].append("overwrite?")
    rollback.shutdown()
    again = StateEngine(deploy(), app="shop")
    cart3: SessionState[Any] = again.session_state("cart", [], version=2, migrate=migrate)
    assert len(cart3.get(sid)) == 3  # nothing lost to the old code
    again.shutdown()


def test_a_value_whose_class_is_gone_reads_as_the_default_and_is_replaced(
    deploy: Callable[[], Store],
    code: Callable[[str, str], types.ModuleType],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A deploy removed a class without raising the state's version: the page keeps
    working. The event reads the default, says why (ev.result and the log), and its
    commit replaces the value; the next deploy reads the default with no problem.
    Fails if the stored value breaks every event of the session (a CodecError, as
    before), or if the unreadable value is kept."""
    v1 = code("gone_v1", V1)
    old = StateEngine(deploy(), app="shop")
    cart: SessionState[Any] = old.session_state("cart", ["empty"])
    sid = old.open_session()
    with old.event(sid) as ev:
        ev[cart] = [v1.Item("apple", 2, v1.Size.LARGE)]
    old.shutdown()
    del sys.modules[v1.__name__]

    new = StateEngine(deploy(), app="shop")
    cart2: SessionState[Any] = new.session_state("cart", ["empty"])
    with caplog.at_level(logging.WARNING, logger="statekit"):
        assert cart2.get(sid) == ["empty"]
        with new.event(sid) as ev:
            assert ev[cart2] == ["empty"]
    problem = ev.result.value_problems["cart"]
    assert "cannot be read" in problem
    assert v1.__name__ in problem  # what was missing
    assert any("session state 'cart'" in record.getMessage() for record in caplog.records)
    new.shutdown()
    later = StateEngine(deploy(), app="shop")
    cart3: SessionState[Any] = later.session_state("cart", ["empty"])
    with later.event(sid) as ev:
        assert ev[cart3] == ["empty"]
    assert ev.result.value_problems == {}  # replaced by the commit
    later.shutdown()


def test_a_strict_state_raises_and_keeps_the_stored_value(
    deploy: Callable[[], Store], code: Callable[[str, str], types.ModuleType]
) -> None:
    """With strict=True the unreadable value raises CodecError naming the state, and
    stays stored. Also for a migrate that raises: by default the value reads as the
    default with the reason, strictly it raises. Fails if strict is ignored."""
    v1 = code("strict_v1", V1)
    old = StateEngine(deploy(), app="shop")
    cart: SessionState[Any] = old.session_state("cart", [])
    sid = old.open_session()
    with old.event(sid) as ev:
        ev[cart] = [v1.Item("apple", 2, v1.Size.LARGE)]
    old.shutdown()
    del sys.modules[v1.__name__]

    def broken(version: int, stored: Any) -> Any:
        raise KeyError("title")

    new = StateEngine(deploy(), app="shop")
    strict: SessionState[Any] = new.session_state("cart", [], strict=True)
    with pytest.raises(CodecError, match="session state 'cart'"):
        strict.get(sid)
    with pytest.raises(CodecError), new.event(sid) as ev:
        ev[strict]
    new.shutdown()
    for is_strict in (True, False):
        engine = StateEngine(deploy(), app="shop")
        state: SessionState[Any] = engine.session_state(
            "cart", [], version=2, migrate=broken, strict=is_strict
        )
        if is_strict:
            with pytest.raises(CodecError, match="'cart'"):
                state.get(sid)
        else:
            with engine.event(sid) as ev:
                assert ev[state] == []
            assert "cannot be migrated from version 1" in ev.result.value_problems["cart"]
        engine.shutdown()


def test_a_versioned_global_counts_on(deploy: Callable[[], Store]) -> None:
    """A counter stored by version 1 is migrated by the first increment of version 2
    code, which stores the sum as version 2; increments go on from it. Fails if the
    store's own addition reads (or writes) a versioned value as a plain one."""
    old = StateEngine(deploy(), app="shop")
    visits = old.global_state("visits", 0)
    assert visits.increment(5) == 5
    old.shutdown()
    new = StateEngine(deploy(), app="shop")
    seen: list[tuple[int, Any]] = []

    def migrate(version: int, stored: Any) -> int:
        seen.append((version, stored))
        return int(stored) * 10  # version 2 counts in tenths

    visits2 = new.global_state("visits", 0, version=2, migrate=migrate)
    assert visits2.increment(1) == 51
    assert visits2.increment(1) == 52
    assert visits2.get() == 52
    assert seen == [(1, 5)]
    new.shutdown()


def test_a_value_written_without_a_read_is_stored_with_the_new_version(
    deploy: Callable[[], Store],
) -> None:
    """Version 1 stored dollars (5); version 2 stores cents and migrates by * 100. Code
    of version 2 that assigns 5 without reading (an event, a global's set) means 5
    cents. Fails if the write is judged unchanged against the old raw 5 and skipped:
    the value would read back as 500."""
    old = StateEngine(deploy(), app="shop")
    price, total = old.session_state("price", 0), old.global_state("total", 0)
    sid = old.open_session()
    with old.event(sid) as ev:
        ev[price] = 5
    total.set(5)
    old.shutdown()
    new = StateEngine(deploy(), app="shop")

    def cents(version: int, dollars: Any) -> int:
        return int(dollars) * 100

    price2 = new.session_state("price", 0, version=2, migrate=cents)
    total2 = new.global_state("total", 0, version=2, migrate=cents)
    with new.event(sid) as ev:
        ev[price2] = 5
    total2.set(5)
    assert (price2.get(sid), total2.get()) == (5, 5)
    new.shutdown()


def test_old_code_never_overwrites_what_new_code_wrote(deploy: Callable[[], Store]) -> None:
    """During a rolling deploy, code of version 1 (no version declared) and of version
    2 meet values version 3 wrote: assigning without reading, or a global's set(),
    raises CodecError and the value stays. Fails if the old code's write replaced it."""
    new = StateEngine(deploy(), app="shop")
    keep: Callable[[int, Any], Any] = lambda version, old: old  # noqa: E731
    cart: SessionState[list[str]] = new.session_state("cart", [], version=3, migrate=keep)
    shared: GlobalState[list[str]] = new.global_state("shared", [], version=3, migrate=keep)
    sid = new.open_session()
    with new.event(sid) as ev:
        ev[cart] = ["new"]
    shared.set(["new"])
    declarations: list[dict[str, Any]] = [{}, {"version": 2, "migrate": keep}]
    for declared in declarations:
        old = StateEngine(deploy(), app="shop")
        old_cart: SessionState[list[str]] = old.session_state("cart", [], **declared)
        old_shared: GlobalState[list[str]] = old.global_state("shared", [], **declared)
        with pytest.raises(CodecError, match="version 3"), old.event(sid) as ev:
            ev[old_cart] = ["old"]
        with pytest.raises(CodecError, match="version 3"):
            old_shared.set(["old"])
        old.shutdown()
    assert (cart.get(sid), shared.get()) == (["new"], ["new"])
    new.shutdown()


def test_values_of_version_1_are_stored_as_before(deploy: Callable[[], Store]) -> None:
    """A state without a version stores the codec's bytes alone, as every value was
    stored before versions: data written earlier and data written now are alike.
    Fails if every value got a version mark."""
    engine = StateEngine(deploy(), app="shop")
    plain = engine.session_state("plain", {"a": 1})
    versioned = engine.session_state("versioned", 0, version=3, migrate=lambda v, old: old)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[plain]["b"] = 2
        ev[versioned] = 7
    assert stored_bytes(engine, sid, "plain") == b'{"a":1,"b":2}'
    assert stored_bytes(engine, sid, "versioned") == VERSION_MARK + b"3\x007"
    assert (plain.get(sid), versioned.get(sid)) == ({"a": 1, "b": 2}, 7)
    engine.shutdown()


def test_versions_on_the_memory_store_change_nothing() -> None:
    """The memory store keeps Python objects, which outlive no deploy: a versioned
    state reads and writes as any other. Fails if its own values were migrated."""
    engine = StateEngine(MemoryStore())
    calls: list[int] = []

    def migrate(version: int, old: Any) -> Any:
        calls.append(version)
        return old

    state = engine.session_state("n", 0, version=2, migrate=migrate)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[state] += 5
    assert state.get(sid) == 5
    assert calls == []


@dataclasses.dataclass
class _Case:
    kwargs: dict[str, Any]
    fault: str


@pytest.mark.parametrize(
    "case",
    [
        _Case({"version": 0}, "an int of 1 or more"),
        _Case({"version": True}, "an int of 1 or more"),
        _Case({"version": "2"}, "an int of 1 or more"),
        _Case({"version": 2}, "give it migrate="),
        _Case({"migrate": lambda v, old: old}, "but version 1"),
        _Case({"version": 2, "migrate": "not callable"}, "callable"),
        _Case({"strict": "yes"}, "True or False"),
    ],
)
def test_versions_are_checked(case: _Case) -> None:
    engine = StateEngine()
    with pytest.raises(InvalidDeclaration, match=case.fault):
        engine.session_state("cart", [], **case.kwargs)
    with pytest.raises(InvalidDeclaration, match=case.fault):
        engine.global_state("total", 0, **case.kwargs)
