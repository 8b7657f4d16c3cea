"""The statekit demo: the state guide's four patterns in one Starlette app.

- a visitor counter shared by everyone (global state);
- a cart with its size, per browser tab (session state and a change listener);
- a counter object that cannot be copied, per tab (a session registry);
- a username and password kept in the browser, encrypted (browser state).

Everything runs on the in-memory store. Run it with ``python3 dev.py demo`` (or
``python docs/examples/web_app.py --port 8000``). Browser values are encrypted with the
secrets in ``STATEKIT_SECRETS`` (comma-separated, newest first, 32+ characters each);
without them the demo asks for an ephemeral secret, and says so: browser values then do
not survive a restart of the server.

The host owns HTTP: it keeps the session id in a cookie, passes the browser tokens that
``statekit.js`` sends to each event, and returns the new ones in a response header. Its
handlers are async and use the engine's async calls (``aopen_session``, ``aevent``,
``aincrement``, ...), which never block the event loop, whatever the store.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from statekit import (
    BrowserKeys,
    BrowserState,
    Event,
    EventResult,
    SessionNotFound,
    SessionNotInitialized,
    SessionState,
    StateEngine,
)

logger = logging.getLogger("statekit.demo")

COOKIE = "statekit_sid"
ITEMS = ["Cereal", "Milk", "Orange Juice", "Water"]


class NonDeepCopyable:
    """The guide's example of an object that cannot be deep-copied (it holds a lock)."""

    def __init__(self) -> None:
        self.counter = 0
        self.lock = threading.Lock()

    def increment(self) -> int:
        with self.lock:
            self.counter += 1
            return self.counter


def keys_from_environment() -> BrowserKeys:
    secrets = [s for s in os.environ.get("STATEKIT_SECRETS", "").split(",") if s]
    if secrets:
        return BrowserKeys(secrets)
    return BrowserKeys.ephemeral()


def build_app(keys: BrowserKeys | None = None) -> Starlette:
    """The demo app, with its own engine (one per app: tests build several)."""
    keys = keys or keys_from_environment()
    engine = StateEngine()
    visitors = engine.global_state("visitors", 0)
    cart: SessionState[list[str]] = engine.session_state("cart", [])
    cart_size: SessionState[int] = engine.session_state("cart_size", 0)
    counters = engine.registry("counter", lambda sid: NonDeepCopyable())
    credentials: BrowserState[list[str]] = engine.browser_state(
        "credentials", ["", ""], keys=keys, storage_key="login"
    )

    @cart.on_change
    def update_size(ev: Event, value: list[str]) -> None:
        ev[cart_size] = len(value)
        ev.emit("cart_size", len(value))

    def tokens(request: Request) -> dict[str, str]:
        try:
            sent = json.loads(request.headers.get("x-statekit-browser", "{}"))
        except ValueError:
            return {}
        if not isinstance(sent, dict):
            return {}
        return {str(k): v for k, v in sent.items() if isinstance(v, str)}

    def respond(body: dict[str, Any], result: EventResult | None = None) -> JSONResponse:
        response = JSONResponse(body)
        if result is not None:
            if result.browser:
                response.headers["x-statekit-browser-set"] = json.dumps(dict(result.browser))
            for state, problem in result.browser_problems.items():
                if problem.value != "missing":
                    logger.info("browser state %s ignored: %s", state, problem)
        return response

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    async def script(request: Request) -> Response:
        source = resources.files("statekit").joinpath("static/statekit.js").read_text()
        return Response(source, media_type="text/javascript")

    async def load(request: Request) -> JSONResponse:
        """Page load: a new session (a refresh is a new session), one more visitor,
        the tab's counter object, and the values the browser kept."""
        sid = await engine.aopen_session()
        count = await visitors.aincrement()
        await counters.aopen(sid)
        async with engine.aevent(sid, browser=tokens(request)) as ev:
            username, password = ev[credentials]
            body = {
                "visitors": count,
                "cart": ev[cart],
                "cart_size": ev[cart_size],
                "counter": ev[counters].counter,
                "username": username,
                "password": password,
                "items": ITEMS,
            }
        response = respond(body, ev.result)
        response.set_cookie(COOKIE, sid, httponly=True, samesite="strict")
        return response

    async def session_of(request: Request) -> str:
        sid = request.cookies.get(COOKIE, "")
        if not await engine.aexists(sid):
            raise SessionNotFound(sid)
        return sid

    async def add_items(request: Request) -> JSONResponse:
        sid = await session_of(request)
        items = [i for i in (await request.json()).get("items", []) if i in ITEMS]
        async with engine.aevent(sid) as ev:
            ev[cart] = ev[cart] + items
            body = {"cart": ev[cart]}
        body["cart_size"] = ev.result.outputs.get("cart_size", len(body["cart"]))
        return respond(body, ev.result)

    async def increment(request: Request) -> JSONResponse:
        sid = await session_of(request)
        async with engine.aevent(sid) as ev:
            value = ev[counters].increment()
        return respond({"counter": value}, ev.result)

    async def save_credentials(request: Request) -> JSONResponse:
        sid = await session_of(request)
        data = await request.json()
        pair = [str(data.get("username", ""))[:200], str(data.get("password", ""))[:200]]
        async with engine.aevent(sid, browser=tokens(request)) as ev:
            ev[credentials] = pair
        return respond({"saved": True}, ev.result)

    async def close(request: Request) -> Response:
        sid = request.cookies.get(COOKIE, "")
        if await engine.aexists(sid):
            await engine.aclose_session(sid)
        return Response(status_code=204)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await engine.ashutdown()

    async def expired(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "session ended: reload the page"}, status_code=409)

    return Starlette(
        routes=[
            Route("/", page),
            Route("/statekit.js", script),
            Route("/api/load", load, methods=["POST"]),
            Route("/api/cart", add_items, methods=["POST"]),
            Route("/api/counter", increment, methods=["POST"]),
            Route("/api/credentials", save_credentials, methods=["POST"]),
            Route("/api/close", close, methods=["POST"]),
        ],
        exception_handlers={SessionNotFound: expired, SessionNotInitialized: expired},
        lifespan=lifespan,
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>statekit demo</title>
<style>
 body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; }
 section { border: 1px solid #ccc; border-radius: 6px; padding: .8rem 1rem; margin: 1rem 0; }
 h2 { font-size: 1.05rem; margin: 0 0 .5rem; }
</style></head>
<body>
<h1>statekit demo</h1>
<section><h2>Global state: visitors</h2>
 <p>Total visitors: <strong id="visitors">…</strong></p></section>
<section><h2>Session state: cart</h2>
 <div id="items"></div>
 <button id="add">Add items</button>
 <p>Cart: <span id="cart">[]</span> — size <strong id="cart-size">0</strong></p></section>
<section><h2>Per-session object: a counter holding a lock</h2>
 <button id="increment">Increment counter</button> <strong id="counter">0</strong></section>
<section><h2>Browser state: kept in this browser, encrypted</h2>
 <label>Username <input id="username"></label>
 <label>Password <input id="password" type="password"></label>
 <button id="save">Save</button> <span id="saved"></span></section>
<script src="/statekit.js"></script>
<script>
const state = StateKit.create({ keys: ["login"] });
const $ = (id) => document.getElementById(id);
async function post(url, body) {
  const response = await state.fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body || {}),
  });
  return response.json();
}
function showCart(data) {
  $("cart").textContent = JSON.stringify(data.cart);
  $("cart-size").textContent = data.cart_size;
}
async function load() {
  const data = await post("/api/load");
  $("visitors").textContent = data.visitors;
  $("counter").textContent = data.counter;
  $("username").value = data.username;
  $("password").value = data.password;
  $("items").innerHTML = data.items.map((item) =>
    `<label><input type="checkbox" value="${item}"> ${item}</label>`).join(" ");
  showCart(data);
  document.body.dataset.ready = "yes";
}
$("add").onclick = async () => {
  const items = [...document.querySelectorAll("#items input:checked")].map((i) => i.value);
  showCart(await post("/api/cart", { items }));
};
$("increment").onclick = async () => {
  $("counter").textContent = (await post("/api/counter")).counter;
};
$("save").onclick = async () => {
  await post("/api/credentials", { username: $("username").value, password: $("password").value });
  $("saved").textContent = "Saved to local storage";
};
addEventListener("pagehide", () => navigator.sendBeacon("/api/close"));
load();
</script>
</body></html>
"""


def free_port(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve the statekit demo on 127.0.0.1.")
    parser.add_argument(
        "--port", type=int, default=None, help="the port (default: 8000, or a free one)"
    )
    args = parser.parse_args()
    port = args.port if args.port is not None else free_port(8000)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"statekit demo: http://127.0.0.1:{port}/  (Ctrl+C to stop)", flush=True)
    uvicorn.run(build_app(), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
