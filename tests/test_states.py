"""State declarations and GlobalState operations."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from statekit import (
    GlobalState,
    InvalidDeclaration,
    SessionState,
    StateEngine,
    StateNotCopyable,
)


class NonCopyable:
    def __init__(self) -> None:
        self.lock = threading.Lock()


class TestDeclarations:
    def test_lock_in_default_is_refused_at_declaration(self, engine: StateEngine) -> None:
        with pytest.raises(StateNotCopyable) as info:
            engine.session_state("counter", NonCopyable())
        message = str(info.value)
        assert "'counter'" in message
        assert "NonCopyable" in message
        assert "registry" in message
        assert info.value.state == "counter"
        assert isinstance(info.value, TypeError)
        assert "counter" not in engine.states  # nothing half-declared

    def test_non_copyable_global_default_is_refused(self, engine: StateEngine) -> None:
        with pytest.raises(StateNotCopyable):
            engine.global_state("g", {"lock": threading.Lock()})

    def test_duplicate_names_are_refused(self, engine: StateEngine) -> None:
        engine.session_state("cart", [])
        with pytest.raises(InvalidDeclaration, match="already declared"):
            engine.global_state("cart", 0)

    @pytest.mark.parametrize("name", ["", "has space", "x" * 129, 5, "naïve"])
    def test_bad_names_are_refused(self, engine: StateEngine, name: Any) -> None:
        with pytest.raises(InvalidDeclaration, match="name"):
            engine.session_state(name, 0)

    @pytest.mark.parametrize("ttl", [0, -5, float("nan"), "10", True])
    def test_bad_ttl_is_refused(self, engine: StateEngine, ttl: Any) -> None:
        with pytest.raises(InvalidDeclaration, match="ttl"):
            engine.session_state("s", 0, ttl=ttl)

    def test_default_and_factory_together_are_refused(self, engine: StateEngine) -> None:
        with pytest.raises(InvalidDeclaration, match="not both"):
            engine.session_state("s", [], factory=list)  # type: ignore[call-overload]

    def test_non_callable_factory_and_listeners_are_refused(self, engine: StateEngine) -> None:
        with pytest.raises(InvalidDeclaration, match="factory"):
            engine.session_state("s", factory=[])  # type: ignore[call-overload]
        state = engine.session_state("t", 0)
        with pytest.raises(InvalidDeclaration, match="on_change"):
            state.on_change(42)  # type: ignore[arg-type]
        with pytest.raises(InvalidDeclaration, match="on_delete"):
            state.on_delete(42)  # type: ignore[arg-type]

    def test_no_default_means_none(self, engine: StateEngine) -> None:
        state: SessionState[Any] = engine.session_state("s", None)
        sid = engine.open_session()
        assert state.get(sid) is None

    def test_default_is_copied_at_declaration(self, engine: StateEngine) -> None:
        default: list[int] = []
        state = engine.session_state("s", default)
        default.append(1)
        assert state.get(engine.open_session()) == []

    def test_repr_names_state_and_app(self, engine: StateEngine) -> None:
        assert repr(engine.session_state("cart", [])) == "SessionState('cart', app='app')"
        assert repr(engine.global_state("n", 0)) == "GlobalState('n', app='app')"
        assert engine.session_state("x", 0).engine is engine


class TestGlobalState:
    def test_get_set_update(self, engine: StateEngine) -> None:
        names: GlobalState[list[str]] = engine.global_state("names", [])
        assert names.get() == []
        names.set(["a"])
        assert names.update(lambda v: [*v, "b"]) == ["a", "b"]
        assert names.get() == ["a", "b"]

    def test_get_returns_a_copy(self, engine: StateEngine) -> None:
        names = engine.global_state("names", ["a"])
        names.get().append("x")
        names.set(["b"])
        names.get().append("y")
        assert names.get() == ["b"]

    def test_update_fn_may_mutate_its_argument(self, engine: StateEngine) -> None:
        names = engine.global_state("names", ["a"])

        def add(v: list[str]) -> list[str]:
            v.append("b")
            return v

        names.update(add)
        assert names.get() == ["a", "b"]

    def test_set_of_non_copyable_value_fails_and_keeps_old(self, engine: StateEngine) -> None:
        g: GlobalState[Any] = engine.global_state("g", 1)
        with pytest.raises(StateNotCopyable):
            g.set(threading.Lock())
        assert g.get() == 1

    def test_increment_needs_numbers(self, engine: StateEngine) -> None:
        names = engine.global_state("names", "x")
        with pytest.raises(TypeError, match="update"):
            names.increment()
        n = engine.global_state("n", 0)
        with pytest.raises(TypeError):
            n.increment("1")  # type: ignore[arg-type]
        assert n.increment(2.5) == 2.5

    def test_update_loses_no_update_under_threads(self, engine: StateEngine) -> None:
        log: GlobalState[list[int]] = engine.global_state("log", [])
        n: GlobalState[int] = engine.global_state("n", 0)

        def work(k: int) -> None:
            for i in range(300):
                log.update(lambda v, i=i: [*v, k * 1000 + i])  # type: ignore[misc]
                n.update(lambda v: v + 1)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        assert n.get() == 2400
        assert sorted(log.get()) == sorted(k * 1000 + i for k in range(8) for i in range(300))


def test_what_a_declaration_is_cannot_be_changed_by_assignment(engine: StateEngine) -> None:
    """Pointing a state at another engine would let that engine's events write it
    without WrongEngine; replacing its listeners would skip their checks."""
    other = StateEngine()
    cart: SessionState[list[str]] = engine.session_state("cart", [])
    objects = engine.registry("objects", lambda sid: sid)
    for obj, name, value in (
        (cart, "engine", other),
        (cart, "name", "other"),
        (cart, "listeners", ()),
        (cart, "delete_callbacks", ()),
        (cart, "remote_listeners", ()),
        (objects, "engine", other),
        (objects, "name", "other"),
    ):
        with pytest.raises(AttributeError, match="read-only"):
            setattr(obj, name, value)
    cart.on_change(lambda ev, value: None)  # the way to add one still works
    assert len(cart.listeners) == 1
    other.shutdown()
