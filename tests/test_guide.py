"""The guide's examples, written with statekit: the visitor counter and the cart."""

from __future__ import annotations

import threading

from statekit import Event, EventResult, SessionState, StateEngine

from .conftest import declared

ITEMS = ["Cereal", "Milk", "Orange Juice", "Water"]


def build_app(engine: StateEngine) -> dict[str, object]:
    visitors = engine.global_state("visitors", 0)
    cart: SessionState[list[str]] = engine.session_state("cart", [])
    cart_size = engine.session_state("cart_size", 0)

    @cart.on_change
    def update_size(ev: Event, value: list[str]) -> None:
        ev[cart_size] = len(value)
        ev.emit("cart_size", len(value))

    return {"visitors": visitors, "cart": cart, "cart_size": cart_size}


class TestVisitorCounter:
    def test_every_page_load_counts_once(self, engine: StateEngine) -> None:
        visitors = engine.global_state("visitors", 0)
        counts = [visitors.increment() for _ in range(3)]
        assert counts == [1, 2, 3]

    def test_count_is_exact_after_8_threads_of_10000_increments(self, engine: StateEngine) -> None:
        visitors = engine.global_state("visitors", 0)
        start = threading.Barrier(8)

        def load_pages() -> None:
            start.wait()
            for _ in range(10_000):
                visitors.increment()

        threads = [threading.Thread(target=load_pages) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert visitors.get() == 80_000


class TestCart:
    def add_items(self, engine: StateEngine, sid: str, items: list[str]) -> EventResult:
        cart = declared(engine, "cart")
        with engine.event(sid) as ev:
            ev[cart] = ev[cart] + items
        return ev.result

    def test_two_sessions_never_see_each_others_cart(self, engine: StateEngine) -> None:
        build_app(engine)
        cart = declared(engine, "cart")
        alice, bob = engine.open_session(), engine.open_session()
        self.add_items(engine, alice, ["Milk"])
        self.add_items(engine, bob, ["Water", "Cereal"])
        self.add_items(engine, alice, ["Orange Juice"])
        assert cart.get(alice) == ["Milk", "Orange Juice"]
        assert cart.get(bob) == ["Water", "Cereal"]

    def test_cart_size_listener_fires_with_the_right_size(self, engine: StateEngine) -> None:
        build_app(engine)
        cart_size = declared(engine, "cart_size")
        sid = engine.open_session()
        result = self.add_items(engine, sid, ["Milk", "Water"])
        assert result.outputs == {"cart_size": 2}
        assert cart_size.get(sid) == 2
        result = self.add_items(engine, sid, ["Cereal"])
        assert result.outputs == {"cart_size": 3}
        result = self.add_items(engine, sid, [])
        assert result.outputs == {}
        assert cart_size.get(sid) == 3

    def test_refresh_is_a_new_session_starting_from_the_default(self, engine: StateEngine) -> None:
        build_app(engine)
        cart = declared(engine, "cart")
        first = engine.open_session()
        self.add_items(engine, first, ["Milk"])
        engine.close_session(first)  # the tab unloads
        refreshed = engine.open_session()  # the page loads again
        assert cart.get(refreshed) == []
        assert cart.get(first) == ["Milk"]  # kept for the closed grace only
