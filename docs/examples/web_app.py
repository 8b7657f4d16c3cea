"""The statekit demo: the state guide's four patterns in one Starlette app, one session
per browser tab.

- a visitor counter shared by everyone (global state);
- a cart with its size, per tab (session state and a change listener);
- a counter object that cannot be copied, per tab (a session registry whose objects are
  made by ``engine.on_open`` when a tab's session opens);
- a username and password kept in the browser, encrypted (browser state), shared by
  every tab of the browser;
- an account's cart, shared by every tab of every browser signed in to the account
  (user state), updated live in each of them.

Run it with ``python3 dev.py demo`` (or ``python docs/examples/web_app.py --port
8000``). Everything runs on the in-memory store. Browser values are encrypted with the
secrets in ``STATEKIT_SECRETS`` (comma-separated, newest first, 32+ characters each);
without them the demo makes a key for this run and says so: browser values then do not
survive a restart of the server.

statekit's Starlette integration does the wiring: ``StateKitMiddleware`` serves
``statekit.js`` and the endpoints that open and close a tab's session, gives each
request its :class:`~statekit.web.Visit` (``visit_of(request)``), answers an ended
session with 409 and a busy one with 503, and shuts the engine down with the app. The
page's ``statekit.js`` opens a session per tab, sends it with every request, and closes
it when the tab closes. The handlers use only the engine's async calls.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from typing import Any, NoReturn

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from statekit import (
    BrowserKeys,
    BrowserState,
    DeleteReason,
    Event,
    SessionState,
    StateEngine,
)
from statekit.integrations.asgi import StateKitMiddleware, visit_of
from statekit.web import Visit

logger = logging.getLogger("statekit.demo")

ITEMS = ["Cereal", "Milk", "Orange Juice", "Water"]
#: The longest username or password the demo keeps.
MAX_FIELD = 200
#: The cookie that says which account a browser signed in to.
ACCOUNT_COOKIE = "demo_account"


class Accounts:
    """The demo's sign-in: an account name in a cookie signed by the server, so that
    no page can name an account it did not sign in to. (A demo: any name signs in,
    without a password. A real app authenticates its users its own way, then passes
    the user's id to ``visit.aevent(user=...)``.)"""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)  # signed-in browsers sign in again after a restart

    def cookie(self, name: str) -> str:
        """The ``Set-Cookie`` value that signs this browser in to ``name``."""
        return f"{ACCOUNT_COOKIE}={name}.{self._sign(name)}; Path=/; HttpOnly; SameSite=Lax"

    def _sign(self, name: str) -> str:
        return hmac.new(self._key, name.encode(), hashlib.sha256).hexdigest()

    def of(self, cookies: dict[str, str]) -> str | None:
        """The account a request's cookies name, if their signature holds."""
        name, _, signature = cookies.get(ACCOUNT_COOKIE, "").rpartition(".")
        if name and hmac.compare_digest(signature, self._sign(name)):
            return name
        return None

    def of_scope(self, scope: Any) -> str | None:
        """:meth:`of` for an ASGI scope (the change stream's request)."""
        return self.of(Request(scope).cookies)


class NonDeepCopyable:
    """The guide's example of an object that cannot be deep-copied (it holds a lock)."""

    def __init__(self) -> None:
        self.counter = 0
        self.lock = threading.Lock()

    def increment(self) -> int:
        with self.lock:
            self.counter += 1
            return self.counter


def keys_from_environment() -> tuple[BrowserKeys, bool]:
    """The keys of browser values, and whether they come from ``STATEKIT_SECRETS``
    (else a key is made for this run, which a demo may well use: said at INFO)."""
    secrets = [s for s in os.environ.get("STATEKIT_SECRETS", "").split(",") if s]
    if secrets:
        return BrowserKeys(secrets), True
    logger.info(
        "STATEKIT_SECRETS is not set: browser values are encrypted with a key made for "
        "this run, so they will not survive a restart of the server (set STATEKIT_SECRETS "
        "to 32+ characters to keep them)"
    )
    return BrowserKeys.ephemeral(warn=False), False


def build_app(keys: BrowserKeys | None = None) -> Starlette:
    """The demo app, with its own engine (one per app: tests build several).

    Args:
        keys: the keys of browser values (default: from ``STATEKIT_SECRETS``, else a
            key made for this run).
    """
    configured = keys is not None
    if keys is None:
        keys, configured = keys_from_environment()
    engine = StateEngine()
    visitors = engine.global_state("visitors", 0)
    tabs = engine.global_state("tabs_open", 0)
    cart: SessionState[list[str]] = engine.session_state("cart", [])
    cart_size: SessionState[int] = engine.session_state("cart_size", 0)
    counters = engine.registry("counter", lambda sid: NonDeepCopyable())
    credentials: BrowserState[list[str]] = engine.browser_state(
        "credentials", ["", ""], keys=keys, storage_key="login"
    )
    accounts = Accounts()
    account_cart: SessionState[list[str]] = engine.user_state("account_cart", [])

    # A tab's session opens when statekit.js asks for it: the guide's page-load event
    # makes the tab's object then. The memory store answers these calls at once.
    @engine.on_open
    def tab_opened(sid: str) -> None:
        counters.open(sid)
        tabs.increment()

    @engine.on_close
    def tab_closed(sid: str, reason: DeleteReason) -> None:
        if reason is not DeleteReason.SHUTDOWN:  # the server stopping closes every tab
            tabs.increment(-1)

    @cart.on_change
    def update_size(ev: Event, value: list[str]) -> None:
        ev[cart_size] = len(value)
        ev.emit("cart_size", len(value))

    def bad_request(detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=400)

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    async def status(request: Request) -> JSONResponse:
        """What everyone shares: visitors so far, tabs open now (no session needed)."""
        return JSONResponse({"visitors": await visitors.aget(), "tabs": await tabs.aget()})

    async def load(request: Request) -> JSONResponse:
        """A tab loaded: one more visitor, and everything the tab shows."""
        visit = visit_of(request)
        count = await visitors.aincrement()
        async with visit.aevent() as ev:
            username, password = ev[credentials]
            body = {
                "visitors": count,
                "tabs": await tabs.aget(),
                "cart": ev[cart],
                "cart_size": ev[cart_size],
                "counter": ev[counters].counter,
                "username": username,
                "password": password,
                "items": ITEMS,
                "secrets": "configured" if configured else "ephemeral",
            }
        body.update(await account_view(request, visit))
        for state, problem in ev.result.browser_problems.items():
            if problem.value != "missing":
                logger.info("browser value %s not read: %s", state, problem.value)
        return JSONResponse(body)

    async def add_items(request: Request) -> JSONResponse:
        items = (await _json(request)).get("items")
        if not isinstance(items, list) or not items:
            return bad_request("tick at least one item, then add")
        unknown = [i for i in items if i not in ITEMS]
        if unknown:
            return bad_request(f"unknown item {unknown[0]!r}: choose among {', '.join(ITEMS)}")
        async with visit_of(request).aevent() as ev:
            ev[cart] = ev[cart] + items
            cart_now = ev[cart]
        return JSONResponse({"cart": cart_now, "cart_size": ev.result.outputs["cart_size"]})

    async def account_view(request: Request, visit: Visit) -> dict[str, Any]:
        """The account the browser signed in to, and its cart."""
        account = accounts.of(request.cookies)
        if account is None:
            return {"account": None, "account_cart": []}
        async with visit.aevent(user=account) as ev:
            return {"account": account, "account_cart": ev[account_cart]}

    async def sign_in(request: Request) -> JSONResponse:
        name = (await _json(request)).get("account")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_FIELD or "." in name:
            return bad_request(f"an account name is text of 1 to {MAX_FIELD} characters, no dot")
        response = JSONResponse({"account": name})
        response.headers["set-cookie"] = accounts.cookie(name)
        return response

    async def add_to_account(request: Request) -> JSONResponse:
        account = accounts.of(request.cookies)
        if account is None:
            return bad_request("sign in to an account first")
        item = (await _json(request)).get("item")
        if item not in ITEMS:
            return bad_request(f"unknown item {item!r}: choose among {', '.join(ITEMS)}")
        async with visit_of(request).aevent(user=account) as ev:
            ev[account_cart] = ev[account_cart] + [item]
            cart_now = ev[account_cart]
        return JSONResponse({"account_cart": cart_now})

    async def increment(request: Request) -> JSONResponse:
        async with visit_of(request).aevent() as ev:
            value = ev[counters].increment()
        return JSONResponse({"counter": value})

    async def save_credentials(request: Request) -> JSONResponse:
        data = await _json(request)
        pair = [data.get("username", ""), data.get("password", "")]
        if not all(isinstance(v, str) and len(v) <= MAX_FIELD for v in pair):
            return bad_request(f"a username and a password are text of {MAX_FIELD} or fewer")
        async with visit_of(request).aevent() as ev:
            ev[credentials] = pair
        return JSONResponse({"saved": True})

    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/status", status),
            Route("/api/load", load, methods=["POST"]),
            Route("/api/cart", add_items, methods=["POST"]),
            Route("/api/counter", increment, methods=["POST"]),
            Route("/api/credentials", save_credentials, methods=["POST"]),
            Route("/api/sign-in", sign_in, methods=["POST"]),
            Route("/api/account-cart", add_to_account, methods=["POST"]),
        ],
        middleware=[
            Middleware(
                StateKitMiddleware,
                engine=engine,
                streams=[visitors],
                user_of=accounts.of_scope,
            )
        ],
    )


async def _json(request: Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>statekit demo</title>
<style>
 body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; }
 section { border: 1px solid #ccc; border-radius: 6px; padding: .8rem 1rem; margin: 1rem 0; }
 h2 { font-size: 1.05rem; margin: 0 0 .5rem; }
 #error:empty, #ended[hidden] { display: none; }
 #error, #ended { border: 1px solid #c33; background: #fee; color: #800; border-radius: 6px;
   padding: .6rem 1rem; }
 .note { color: #555; font-size: .92rem; }
 code { background: #f3f3f3; padding: 0 .2rem; }
</style></head>
<body>
<h1>statekit demo</h1>
<div id="ended" role="alert" hidden>
 <span id="ended-text"></span> <button id="reload">Reload the page</button></div>
<p id="error" role="alert"></p>
<p>This tab's session: <code id="sid">…</code> · tabs open now: <strong id="tabs">…</strong></p>
<section><h2>Try this</h2><ul>
 <li><strong>Open this page in a second tab.</strong> It gets a session of its own: its
  own cart and counter. The visitor count is shared by everyone (this tab's goes up at
  once, without a reload), and the saved username and password by every tab of this
  browser.</li>
 <li><strong>Reload.</strong> A reload is a new session: a new id, an empty cart, the
  counter back at 0. The username and password stay: the browser keeps them.</li>
 <li><strong>Close a tab.</strong> Its session ends; the other tabs go on.</li>
 <li><strong>Restart the server.</strong> This tab's session ends with it, and the page
  says so. <span id="secrets-note"></span></li>
</ul></section>
<section><h2>Global state: visitors</h2>
 <p>Total visitors: <strong id="visitors" data-statekit-state="visitors">…</strong>
 <span class="note">(live: a new tab counts here at once, through the change stream)</span>
 </p></section>
<section><h2>Session state: this tab's cart</h2>
 <div id="items"></div>
 <button id="add">Add items</button>
 <p>Cart: <span id="cart">[]</span> — size <strong id="cart-size">0</strong></p></section>
<section><h2>Per-tab object: a counter holding a lock</h2>
 <p class="note">Made when the tab's session opens; it cannot be copied, so it lives in a
 registry, not in a state.</p>
 <button id="increment">Increment counter</button> <strong id="counter">0</strong></section>
<section><h2>User state: an account's cart, in every browser signed in to it</h2>
 <p class="note">A demo sign-in: any name, no password. Sign in to the same account in
 another browser (or a private window): both show one cart, and an item added in one
 shows in the other at once.</p>
 <p>Account: <strong id="account">not signed in</strong>
 <label>Name <input id="account-name"></label> <button id="sign-in">Sign in</button></p>
 <p><button id="account-add">Add the ticked items to the account's cart</button>
 Account's cart: <span id="account-cart">[]</span></p></section>
<section><h2>Browser state: kept in this browser, encrypted</h2>
 <label>Username <input id="username"></label>
 <label>Password <input id="password" type="password"></label>
 <button id="save">Save</button> <span id="saved"></span></section>
<script src="/statekit/statekit.js"></script>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let kit = null;
function showError(text) { $("error").textContent = text; }
async function post(url, body) {
  if (!kit) return null;  // no session yet: "statekit:opened" loads the page when it opens
  let response;
  try {
    response = await kit.fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body || {}),
    });
  } catch (error) {
    showError("The server cannot be reached: is it running? Start it, then reload the page.");
    return null;
  }
  const data = await response.json().catch(() => ({}));
  if (response.status === 409) return null;  // "statekit:ended" says it on the page
  if (response.status === 503) {
    showError("The server is busy: try again in a moment.");
    return null;
  }
  if (!response.ok) {
    showError(data.detail || ("The server answered " + response.status));
    return null;
  }
  showError("");
  return data;
}
function showCart(data) {
  $("cart").textContent = JSON.stringify(data.cart);
  $("cart-size").textContent = data.cart_size;
}
async function load() {
  const sid = kit.sid;
  const data = await post("/api/load");
  // A reopen meanwhile (kit.reopen(), back/forward cache) loads the page again itself.
  if (!data || kit.sid !== sid) return;
  $("sid").textContent = sid.slice(0, 8) + "…";
  $("visitors").textContent = data.visitors;
  $("tabs").textContent = data.tabs;
  $("counter").textContent = data.counter;
  $("username").value = data.username;
  $("password").value = data.password;
  $("items").innerHTML = data.items.map((item) =>
    `<label><input type="checkbox" value="${item}"> ${item}</label>`).join(" ");
  $("secrets-note").textContent = data.secrets === "configured"
    ? "The server has STATEKIT_SECRETS set: the username and password survive a restart."
    : "The server has no STATEKIT_SECRETS, so it encrypts with a key made for this run: "
      + "the username and password do not survive a restart. Start it with "
      + "STATEKIT_SECRETS set (32+ characters) to keep them.";
  showCart(data);
  showAccount(data);
  document.body.dataset.ready = "yes";
}
function showAccount(data) {
  $("account").textContent = data.account || "not signed in";
  $("account-cart").textContent = JSON.stringify(data.account_cart);
}
addEventListener("statekit:change", (event) => {
  // The account's cart changed, in this tab or in any browser signed in to it.
  if (event.detail.state === "account_cart") {
    $("account-cart").textContent = JSON.stringify(event.detail.value);
  }
});
addEventListener("statekit:reconnected", () => load());  // what changed meanwhile
addEventListener("statekit:ended", (event) => {
  $("ended-text").textContent = "This tab's session has ended (" + event.detail.reason +
    "): the server no longer knows it. Reload the page to start a new one.";
  $("ended").hidden = false;
});
addEventListener("statekit:opened", (event) => {
  // The first opening, and again when the page comes back from the back/forward cache.
  kit = event.detail.kit;
  $("ended").hidden = true;
  load();
});
$("reload").onclick = () => location.reload();
$("add").onclick = async () => {
  const items = [...document.querySelectorAll("#items input:checked")].map((i) => i.value);
  const data = await post("/api/cart", { items });
  if (data) showCart(data);
};
$("sign-in").onclick = async () => {
  const data = await post("/api/sign-in", { account: $("account-name").value });
  if (data) {
    kit.watch();  // the stream again: now with the account's changes
    load();
  }
};
$("account-add").onclick = async () => {
  const ticked = [...document.querySelectorAll("#items input:checked")].map((i) => i.value);
  for (const item of ticked) {
    const data = await post("/api/account-cart", { item });
    if (data) $("account-cart").textContent = JSON.stringify(data.account_cart);
  }
};
$("increment").onclick = async () => {
  const data = await post("/api/counter");
  if (data) $("counter").textContent = data.counter;
};
$("save").onclick = async () => {
  $("saved").textContent = "";
  const data = await post("/api/credentials",
    { username: $("username").value, password: $("password").value });
  if (data) $("saved").textContent = "Saved in this browser (encrypted)";
};
StateKit.start({ keys: ["login"], watch: true }).catch((error) => {
  showError("Could not open a session for this tab (" + error.message + "): reload the page.");
});
</script>
</body></html>
"""


def free_port(preferred: int) -> int:
    """``preferred`` if it is free on 127.0.0.1, else a free port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(signum: int, frame: object) -> NoReturn:
    # uvicorn stops gracefully on SIGTERM, then sends it again to the handler it
    # found: this one, so that SIGTERM ends the demo as quietly as Ctrl+C.
    raise SystemExit(0)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve the statekit demo on 127.0.0.1.")
    parser.add_argument(
        "--port", type=int, default=None, help="the port (default: 8000, or a free one)"
    )
    args = parser.parse_args()
    port = args.port if args.port is not None else free_port(8000)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    signal.signal(signal.SIGTERM, _stop)
    app = build_app()
    print(f"statekit demo: http://127.0.0.1:{port}/  (Ctrl+C to stop)", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
