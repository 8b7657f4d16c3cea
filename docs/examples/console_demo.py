"""A console walk-through of statekit on the in-memory store.

It plays the two first examples of the state guide statekit follows, as a web app
would drive them: a visitor counter shared by everyone (global state) and a shopping
cart with its size kept per browser tab (session state and a change listener). Then
it shows lifetimes: a closed tab, an idle tab that expires, and a full engine evicting
its least recently used session. Time is simulated, so nothing waits.

Run it with ``.venv/bin/python docs/examples/console_demo.py`` (``python3 dev.py demo``
serves the web demo, ``web_app.py``).
"""

from __future__ import annotations

from statekit import (
    DeleteReason,
    Event,
    GlobalState,
    SessionExpired,
    SessionState,
    StateEngine,
)
from statekit.testing import FakeClock

ITEMS = ("Cereal", "Milk", "Orange Juice", "Water")


class ShopApp:
    """The logic layer a host framework would call from its request handlers."""

    def __init__(self, engine: StateEngine) -> None:
        self.engine = engine
        self.visitors: GlobalState[int] = engine.global_state("visitors", 0)
        self.cart: SessionState[list[str]] = engine.session_state(
            "cart", [], on_delete=self._cart_deleted
        )
        self.cart_size: SessionState[int] = engine.session_state("cart_size", 0)
        self.cart.on_change(self._cart_changed)

    def _cart_changed(self, ev: Event, cart: list[str]) -> None:
        ev[self.cart_size] = len(cart)
        ev.emit("cart_size", len(cart))

    @staticmethod
    def _cart_deleted(cart: list[str], reason: DeleteReason) -> None:
        print(f"    (a cart of {len(cart)} item(s) was deleted: {reason})")

    def page_load(self) -> tuple[str, int]:
        """A tab loads the page: a new session, one more visitor."""
        return self.engine.open_session(), self.visitors.increment()

    def add_items(self, sid: str, items: list[str]) -> dict[str, object]:
        """The "Add Items" button: returns the outputs the page should render."""
        with self.engine.event(sid) as ev:
            ev[self.cart] = ev[self.cart] + items
        return dict(ev.result.outputs)


def say(text: str) -> None:
    print(f"\n== {text}")


def main() -> None:
    clock = FakeClock(0)
    engine = StateEngine(clock=clock, idle_ttl=600, closed_ttl=60, capacity=3)
    app = ShopApp(engine)

    say("Two browser tabs load the page")
    alice, count = app.page_load()
    print(f"  tab A: visitor #{count}")
    bob, count = app.page_load()
    print(f"  tab B: visitor #{count}")

    say("Each tab fills its own cart; the size listener reports the new size")
    print(f"  tab A adds Milk, Water      -> outputs {app.add_items(alice, ['Milk', 'Water'])}")
    print(f"  tab B adds Cereal           -> outputs {app.add_items(bob, ['Cereal'])}")
    print(f"  tab A adds Orange Juice     -> outputs {app.add_items(alice, ['Orange Juice'])}")
    print(f"  tab A adds nothing          -> outputs {app.add_items(alice, [])} (no change)")
    print(f"  tab A's cart: {app.cart.get(alice)}")
    print(f"  tab B's cart: {app.cart.get(bob)}")

    say("A failed request changes nothing")
    try:
        with engine.event(alice) as ev:
            ev[app.cart].append("Chocolate")
            raise RuntimeError("payment service down")
    except RuntimeError as exc:
        print(f"  the handler raised {exc!r}")
    print(f"  tab A's cart is still {app.cart.get(alice)}")

    say("Tab B is refreshed: a refresh is a new session")
    engine.close_session(bob)
    bob2, count = app.page_load()
    print(f"  visitor #{count}; the new tab's cart: {app.cart.get(bob2)}")
    print("  the closed tab's values are kept 60 s, then deleted:")
    clock.advance(61)
    engine.reap()

    say("Tab A goes idle for more than 10 minutes")
    clock.advance(601)
    engine.reap()
    try:
        app.add_items(alice, ["Milk"])
    except SessionExpired as exc:
        print(f"  its next request gets: {exc}")

    say("The engine holds 3 sessions at most: the least recently used is evicted")
    tabs = [app.page_load()[0] for _ in range(3)]
    for tab in tabs:
        app.add_items(tab, ["Water"])
    app.add_items(tabs[0], ["Milk"])  # tabs[1] is now the least recently used
    app.page_load()

    say("Totals")
    print(f"  visitors: {app.visitors.get()}, live sessions: {engine.session_count()}")
    engine.shutdown()


if __name__ == "__main__":
    main()
