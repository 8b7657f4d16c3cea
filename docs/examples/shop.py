"""The small shop every integration example serves, written once and framework-free.

Its state and logic know nothing of HTTP: each example (``fastapi_shop.py``,
``flask_shop.py``, ``django_shop.py``, ``aiohttp_shop.py``) only routes requests to
these functions through its framework's integration. That is the point of statekit: the
logic layer is plain Python, tested without a server.

- a visit counter shared by everyone (global state);
- a cart per browser tab, with its size kept by a change listener (session state);
- a username kept in the browser, encrypted (browser state).

The store comes from the environment: ``STATEKIT_REDIS_URL`` (many workers, many hosts),
else ``STATEKIT_SQLITE_PATH``, else the in-memory store. Browser values are encrypted
with the secrets in ``STATEKIT_SECRETS`` (comma-separated, newest first, 32+ characters
each), else with a key made for this process (values then do not survive a restart).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from statekit import BrowserKeys, Event, SessionState, StateEngine
from statekit.stores import SQLiteStore, Store

logger = logging.getLogger("statekit.shop")

ITEMS = ("Cereal", "Milk", "Orange Juice", "Water")


def store_from_environment() -> Store | None:
    """The store the environment names (None: the in-memory default)."""
    url = os.environ.get("STATEKIT_REDIS_URL")
    if url:
        from statekit.stores.redis import RedisStore

        return RedisStore(url)
    path = os.environ.get("STATEKIT_SQLITE_PATH")
    if path:
        return SQLiteStore(path)
    return None


def keys_from_environment() -> BrowserKeys:
    """The keys of browser values: ``STATEKIT_SECRETS``, else ones made for this
    process (said at INFO: an example may well run so)."""
    secrets = [s for s in os.environ.get("STATEKIT_SECRETS", "").split(",") if s]
    if secrets:
        return BrowserKeys(secrets)
    logger.info(
        "STATEKIT_SECRETS is not set: browser values will not survive a restart (set it "
        "to one or more secrets of 32+ characters to keep them)"
    )
    return BrowserKeys.ephemeral(warn=False)


class Shop:
    """The shop's engine, its states, and what a request may do to them."""

    def __init__(self, engine: StateEngine | None = None, keys: BrowserKeys | None = None):
        self.engine = engine or StateEngine(store_from_environment(), app="shop")
        self.visits = self.engine.global_state("visits", 0)
        self.cart: SessionState[list[str]] = self.engine.session_state("cart", [])
        self.cart_size: SessionState[int] = self.engine.session_state("cart_size", 0)
        self.username = self.engine.browser_state(
            "username", "", keys=keys or keys_from_environment(), storage_key="login"
        )
        self.cart.on_change(self._keep_size)

    def _keep_size(self, ev: Event, value: list[str]) -> None:
        ev[self.cart_size] = len(value)
        ev.emit("cart_size", len(value))

    def show(self, ev: Event) -> dict[str, Any]:
        """What the page shows of its tab's state."""
        return {"cart": ev[self.cart], "cart_size": ev[self.cart_size], "user": ev[self.username]}

    def add(self, ev: Event, item: object) -> dict[str, Any]:
        """Put one item in the tab's cart.

        Raises:
            ValueError: the item is not one the shop sells.
        """
        if item not in ITEMS:
            raise ValueError(f"unknown item {item!r}: choose one of {', '.join(ITEMS)}")
        ev[self.cart].append(str(item))
        # The size listener keeps the stored size when the event commits, after this
        # answer is made: the answer says the size the commit will store.
        return {**self.show(ev), "cart_size": len(ev[self.cart])}

    def login(self, ev: Event, username: object) -> dict[str, Any]:
        """Keep a username in the browser (every tab of it sees it).

        Raises:
            ValueError: the name is not a string of 1 to 40 characters.
        """
        if not isinstance(username, str) or not 1 <= len(username.strip()) <= 40:
            raise ValueError("a username is 1 to 40 characters")
        ev[self.username] = username.strip()
        return self.show(ev)


#: The shop's page. ``statekit.js`` opens this tab's session, sends it with every
#: request, keeps the browser's tokens, and closes the session when the tab closes.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>statekit shop</title>
<style>
 body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; }
 #error { color: #a00; }
</style></head>
<body>
<h1>statekit shop</h1>
<p id="error" role="alert"></p>
<p>Visits so far: <strong id="visits">…</strong></p>
<p>Signed in as <strong id="user">nobody</strong>
 <input id="name" placeholder="username"> <button id="login">Sign in</button></p>
<p>ITEM_BUTTONS</p>
<p>This tab's cart: <span id="cart">[]</span> (<strong id="cart-size">0</strong> items)</p>
<script src="/statekit/statekit.js"></script>
<script>
const $ = (id) => document.getElementById(id);
const buttons = () => document.querySelectorAll("button");
let kit = null;
function show(data) {
  $("cart").textContent = JSON.stringify(data.cart);
  $("cart-size").textContent = data.cart_size;
  $("user").textContent = data.user || "nobody";
  if (data.visits !== undefined) $("visits").textContent = data.visits;
}
async function call(url, body) {
  if (!kit) return;  // the buttons are disabled until the tab's session is open
  let response;
  try {
    response = await kit.fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body || {}),
    });
  } catch (error) {
    $("error").textContent = "The server cannot be reached (" + error.message + "): try again.";
    return;
  }
  if (response.status === 409) return;  // "statekit:ended" has said it on the page
  const data = await response.json().catch(() => null);  // a proxy's page is not JSON
  if (!response.ok || data === null) {
    $("error").textContent = (data && (data.detail || data.error)) ||
      "The server answered " + response.status + " " + response.statusText + ".";
    return;
  }
  $("error").textContent = "";
  show(data);
}
addEventListener("statekit:ended", (event) => {
  $("error").textContent = "This tab's session ended (" + event.detail.reason +
    "): reload the page to start a new one.";
});
buttons().forEach((button) => { button.disabled = true; });
document.querySelectorAll("[data-item]").forEach((button) => {
  button.onclick = () => call("/api/cart", { item: button.dataset.item });
});
$("login").onclick = () => call("/api/login", { username: $("name").value });
StateKit.start({ keys: ["login"] }).then(
  async (started) => {
    kit = started;
    buttons().forEach((button) => { button.disabled = false; });
    await call("/api/visit");
    document.body.dataset.ready = "yes";
  },
  (error) => {
    $("error").textContent = "No session could be opened for this tab (" + error.message +
      "): reload the page to try again.";
  },
);
</script>
</body></html>
""".replace(
    "ITEM_BUTTONS",
    " ".join(f'<button data-item="{item}">Add {item}</button>' for item in ITEMS),
)
