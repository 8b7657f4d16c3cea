"""The hand-written aiohttp adapter (docs/examples/aiohttp_shop.py): written only
against statekit's public names, it serves the shop as the shipped integrations do,
driven here by statekit.testing.Browser through aiohttp's own test client."""

from __future__ import annotations

import ast
import asyncio
import json
import sys
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web as aio
from aiohttp.test_utils import TestClient, TestServer

from statekit import BrowserKeys, StateEngine
from statekit.testing import Browser, FakeClock, TransportAnswer

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
sys.path.insert(0, str(EXAMPLES))

from aiohttp_shop import VISIT, make_app  # noqa: E402
from shop import Shop  # noqa: E402

SECRET = "aiohttp-example-secret-" + "a" * 20
KEYS = BrowserKeys([SECRET])
T = TypeVar("T")


class AiohttpTransport:
    """A transport over aiohttp's test client (its server on 127.0.0.1), on an event
    loop of its own thread, so that the blocking Browser can drive it."""

    def __init__(self, app: aio.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client: TestClient[aio.Request, aio.Application] = self.run(self._start(app))

    @staticmethod
    async def _start(app: aio.Application) -> TestClient[aio.Request, aio.Application]:
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        return client

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def __call__(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> TransportAnswer:
        async def send() -> TransportAnswer:
            async with self.client.request(method, url, headers=headers, data=body) as answer:
                return answer.status, list(answer.headers.items()), await answer.read()

        return self.run(send())

    def close(self) -> None:
        """Stop the app (its cleanup shuts the engine down) and the loop."""
        if self.loop.is_closed():
            return
        self.run(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def new_shop(secret: str = SECRET) -> Shop:
    return Shop(StateEngine(), BrowserKeys([secret]))


@pytest.fixture
def serve() -> Iterator[Any]:
    """Starts the example's app over a shop (or an app made by ``make_app``); every app
    started is stopped after the test."""
    started: list[AiohttpTransport] = []

    def start(shop_or_app: Shop | aio.Application) -> AiohttpTransport:
        app = shop_or_app if isinstance(shop_or_app, aio.Application) else make_app(shop_or_app)
        started.append(AiohttpTransport(app))
        return started[-1]

    yield start
    for transport in started:
        transport.close()


def test_tabs_carts_login_and_close(serve: Any) -> None:
    """Each tab its own cart; a login seen by every tab of the browser; closing one tab
    leaves the other going; a refused item is a 400 with the shop's reason. An adapter
    that shared one session per browser, or dropped the tokens' headers, fails here."""
    browser = Browser(serve(new_shop()), keys=["login"])
    one, two = browser.open("/"), browser.open("/")
    assert one.page is not None
    assert "statekit.js" in one.page.text
    assert one.post("/statekit/statekit.js").status == 405  # the gate's endpoints
    assert one.get("/statekit/statekit.js").body.startswith(b"/*")
    first = one.post("/api/visit").json()
    assert (first["cart"], first["visits"]) == ([], 1)
    assert one.post("/api/cart", json={"item": "Milk"}).json()["cart"] == ["Milk"]
    assert two.post("/api/cart", json={"item": "Water"}).json()["cart"] == ["Water"]
    assert one.post("/api/login", json={"username": "ann"}).json()["user"] == "ann"
    shown = two.post("/api/visit").json()
    assert (shown["user"], shown["visits"], shown["cart_size"]) == ("ann", 2, 1)
    two.close()
    assert one.post("/api/cart", json={"item": "Cereal"}).json()["cart"] == ["Milk", "Cereal"]
    refused = one.post("/api/cart", json={"item": "Gold"})
    assert refused.status == 400
    assert "unknown item 'Gold'" in refused.json()["detail"]
    assert one.post("/api/cart", body=b"{not json").status == 400


def test_an_ended_session_is_a_409_the_page_can_act_on(serve: Any) -> None:
    """A tab idle past the engine's idle ttl: its next action is answered 409 with the
    reason (what statekit.js turns into ``statekit:ended``), not a 500; a reload goes
    on with a new session."""
    clock = FakeClock()
    tab = Browser(serve(Shop(StateEngine(clock=clock, idle_ttl=60), KEYS))).open("/")
    clock.advance(61)
    answer = tab.post("/api/visit")
    assert (answer.status, answer.ended, tab.ended) == (409, "idle", "idle")
    assert answer.json()["error"] == "session_ended"
    tab.reload()
    assert tab.post("/api/visit").status == 200


def test_storage_survives_a_restart_and_the_engine_ends_with_the_app(serve: Any) -> None:
    """Stopping the app shuts its engine down (sessions end with reason shutdown); a
    new app with the same secret reads the browser's login back, one with another
    secret does not."""
    shop = new_shop()
    ended: list[str] = []
    shop.engine.on_close(lambda sid, reason: ended.append(reason))
    first = serve(shop)
    browser = Browser(first, keys=["login"])
    tab = browser.open("/")
    tab.post("/api/login", json={"username": "ann"})
    first.close()
    assert ended == ["shutdown"]
    browser.restart(serve(new_shop()))
    assert tab.post("/api/visit").ended == "unknown"
    tab.reload()
    assert tab.post("/api/visit").json()["user"] == "ann"
    browser.restart(serve(new_shop("another-secret-" + "b" * 24)))
    tab.reload()
    assert tab.post("/api/visit").json()["user"] == ""


def test_the_adapter_uses_only_public_names() -> None:
    """The point of the example: a host writes its adapter from statekit's public API.
    An import of a private module or name, of statekit.integrations, or any ``x._y``
    fails here, naming the line."""
    tree = ast.parse((EXAMPLES / "aiohttp_shop.py").read_text())
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("statekit"):
            imported.append(node.module)
            names = [alias.name for alias in node.names]
            parts = (node.module or "").split(".")
            assert not any(p.startswith("_") for p in parts + names), ast.unparse(node)
            assert "integrations" not in parts + names, ast.unparse(node)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("statekit"), ast.unparse(node)
        elif isinstance(node, ast.Attribute):
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            assert not private, f"line {node.lineno}: {ast.unparse(node)}"
    assert imported == ["statekit"]


def test_the_docs_show_the_adapter_as_it_is() -> None:
    """docs/integrations-adapter.md explains the example's adapter line by line: each
    line of its code block is in the example (comments aside), in the same order."""
    doc = (EXAMPLES.parent / "integrations-adapter.md").read_text()
    block = doc.split("## The adapter", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    source = (EXAMPLES / "aiohttp_shop.py").read_text().splitlines()
    example = [line.split("  # ")[0].rstrip() for line in source]
    at = 0
    for line in block.splitlines():
        if line.strip():
            assert line in example[at:], f"not in the example (in order): {line!r}"
            at = example.index(line, at) + 1


def send(
    transport: AiohttpTransport, method: str, url: str, headers: dict[str, str] | None = None
) -> tuple[int, Any, bytes]:
    """One request, its redirects not followed: (status, headers, body)."""

    async def go() -> tuple[int, Any, bytes]:
        async with transport.client.request(
            method, url, headers=headers or {}, allow_redirects=False
        ) as answer:
            return answer.status, answer.headers.copy(), await answer.read()

    return transport.run(go())


def test_the_visits_headers_go_out_on_a_raised_redirect(serve: Any) -> None:
    """aiohttp's redirects are raised (``HTTPFound``) yet sent as responses: a login
    that redirects still sends the new browser token, and a plain page that opened the
    fallback cookie session still sets its cookie. An adapter that added its headers
    only to returned responses loses both here."""
    shop = new_shop()
    app = make_app(shop)

    async def login_and_go(request: aio.Request) -> aio.Response:
        async with request[VISIT].aevent() as ev:
            shop.login(ev, "ann")
        raise aio.HTTPFound("/")

    async def plain_page(request: aio.Request) -> aio.Response:
        await request[VISIT].asession()  # a page without statekit.js: the cookie session
        raise aio.HTTPFound("/")

    app.router.add_post("/login-and-go", login_and_go)
    app.router.add_get("/plain", plain_page)
    transport = serve(app)
    sid = json.loads(send(transport, "POST", "/statekit/open")[2])["sid"]
    status, headers, _ = send(transport, "POST", "/login-and-go", {"X-Statekit-Session": sid})
    assert status == 302
    assert set(json.loads(headers["X-Statekit-Browser-Set"])) == {"login"}
    status, headers, _ = send(transport, "GET", "/plain", {"Accept": "text/html"})
    assert status == 302
    assert headers["Set-Cookie"].startswith("statekit_session=")


def test_the_gate_sees_the_requests_headers(serve: Any) -> None:
    """The adapter hands the gate the request's headers: another site's page cannot
    open a session (403), and a browser that has the script is answered 304."""
    transport = serve(new_shop())
    status, _, body = send(transport, "POST", "/statekit/open", {"Sec-Fetch-Site": "cross-site"})
    assert (status, json.loads(body)["error"]) == (403, "cross_site")
    status, headers, _ = send(transport, "GET", "/statekit/statekit.js")
    assert status == 200
    status, _, body = send(
        transport, "GET", "/statekit/statekit.js", {"If-None-Match": headers["ETag"]}
    )
    assert (status, body) == (304, b"")


def test_a_request_whose_session_ended_counts_no_visit(serve: Any) -> None:
    """The shop counts a visit inside its event, once the session was checked: a tab
    idle past its ttl, or a request naming no session, is answered 409 and adds nothing
    to the counter. Counting before the event would make the last visit 3, not 1."""
    clock = FakeClock()
    transport = serve(Shop(StateEngine(clock=clock, idle_ttl=60), KEYS))
    idle = json.loads(send(transport, "POST", "/statekit/open")[2])["sid"]
    clock.advance(61)
    status, headers, _ = send(transport, "POST", "/api/visit", {"X-Statekit-Session": idle})
    assert (status, headers["X-Statekit-Session-Ended"]) == (409, "idle")
    assert send(transport, "POST", "/api/visit")[0] == 409
    live = json.loads(send(transport, "POST", "/statekit/open")[2])["sid"]
    _, _, body = send(transport, "POST", "/api/visit", {"X-Statekit-Session": live})
    assert json.loads(body)["visits"] == 1
