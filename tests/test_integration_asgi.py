"""The ASGI middleware and the FastAPI dependency, through Starlette's and FastAPI's
test clients and as a raw ASGI app: statekit's endpoints, the request's visit, browser
tokens in and out, the answers to an ended session or a busy store, the cookie fallback,
the form field, and the engine's shutdown with the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from statekit import (
    BrowserKeys,
    EngineClosed,
    Event,
    SessionBusy,
    SessionNotFound,
    SessionState,
    StateEngine,
    StoreUnavailable,
    UsageError,
    web,
)
from statekit.integrations.asgi import (
    StateKitMiddleware,
    exception_handlers,
    install,
    visit_of,
)
from statekit.integrations.fastapi import CurrentVisit
from statekit.testing import FakeClock

KEYS = BrowserKeys(["k" * 32])
PAGE_LOAD = {"accept": "text/html,application/xhtml+xml"}


def headers(sid: str, tokens: dict[str, str] | None = None) -> dict[str, str]:
    out = {web.SESSION_HEADER: sid}
    if tokens is not None:
        out[web.BROWSER_HEADER] = json.dumps(tokens)
    return out


def starlette_app(engine: StateEngine, **options: Any) -> Starlette:
    """A small app on the middleware: a cart per session, a name kept in the browser."""
    cart: SessionState[list[str]] = engine.session_state("cart", [])
    name = engine.browser_state("name", "", keys=KEYS, storage_key="login")

    async def page(request: Request) -> Response:
        sid = await visit_of(request).asession()
        return HTMLResponse(f"<p>{len(sid)}</p>")

    async def add(request: Request) -> Response:
        visit = request.state.statekit
        async with visit.aevent() as ev:
            ev[cart].append("milk")
            body = {"cart": list(ev[cart]), "name": ev[name]}
        return JSONResponse(body)

    async def login(request: Request) -> Response:
        async with visit_of(request).aevent() as ev:
            ev[name] = (await request.json())["name"]
        return JSONResponse({})

    async def busy(request: Request) -> Response:
        raise SessionBusy("x" * 32, 1.0)

    async def down(request: Request) -> Response:
        raise StoreUnavailable("redis", "connection refused")

    async def bug(request: Request) -> Response:
        raise RuntimeError("a bug of the app's")

    return Starlette(
        routes=[
            Route("/", page),
            Route("/add", add, methods=["POST"]),
            Route("/login", login, methods=["POST"]),
            Route("/busy", busy, methods=["POST"]),
            Route("/down", down, methods=["POST"]),
            Route("/bug", bug, methods=["POST"]),
        ],
        middleware=[_middleware(engine, **options)],
    )


def _middleware(engine: StateEngine, **options: Any) -> Any:
    from starlette.middleware import Middleware

    return Middleware(StateKitMiddleware, engine=engine, **options)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(clock: FakeClock) -> Iterator[StateEngine]:
    eng = StateEngine(clock=clock, idle_ttl=60, closed_ttl=30)
    yield eng
    eng.shutdown()


@pytest.fixture
def client(engine: StateEngine) -> Iterator[TestClient]:
    with TestClient(starlette_app(engine)) as c:
        yield c


def open_session(c: TestClient) -> str:
    response = c.post("/statekit/open")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    sid = response.json()["sid"]
    assert isinstance(sid, str)
    return sid


# -- statekit's endpoints -------------------------------------------------------------


def test_open_gives_each_tab_its_own_session(client: TestClient) -> None:
    """Two opens are two sessions with carts of their own (one session per tab)."""
    first, second = open_session(client), open_session(client)
    assert first != second
    assert client.post("/add", headers=headers(first)).json()["cart"] == ["milk"]
    assert client.post("/add", headers=headers(first)).json()["cart"] == ["milk", "milk"]
    assert client.post("/add", headers=headers(second)).json()["cart"] == ["milk"]
    assert "set-cookie" not in client.post("/add", headers=headers(second)).headers


def test_close_ends_only_the_session_it_names(
    client: TestClient, engine: StateEngine, clock: FakeClock
) -> None:
    """A tab's close beacon ends its own session; the other tab goes on."""
    closed, other = open_session(client), open_session(client)
    response = client.post("/statekit/close", content=closed)
    assert response.status_code == 204
    clock.advance(31)  # past closed_ttl
    ended = client.post("/add", headers=headers(closed))
    assert ended.status_code == 409
    assert ended.headers[web.ENDED_HEADER] == "closed"
    assert client.post("/add", headers=headers(other)).status_code == 200
    assert engine.exists(other)


@pytest.mark.parametrize(
    "body", [b"", b"never-issued-id", b"\xff\xfe", b"x" * 5000, b" " * 10], ids=repr
)
def test_close_of_an_unknown_id_or_a_bad_body_is_quietly_accepted(
    client: TestClient, engine: StateEngine, body: bytes
) -> None:
    """A beacon cannot act on an answer: a bad close is 204 and closes nothing."""
    sid = open_session(client)
    assert client.post("/statekit/close", content=body).status_code == 204
    assert engine.exists(sid)
    assert client.post("/add", headers=headers(sid)).status_code == 200


def test_a_close_body_sent_in_many_chunks_is_read(client: TestClient, engine: StateEngine) -> None:
    sid = open_session(client)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(sid), 5):
            yield sid[i : i + 5].encode()

    assert client.post("/statekit/close", content=chunks()).status_code == 204
    assert engine.close_session(sid) is False  # already closed by the beacon


def test_the_script_is_served_and_the_methods_are_checked(client: TestClient) -> None:
    script = client.get("/statekit/statekit.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.content == web.script()
    head = client.head("/statekit/statekit.js")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(web.script()))
    for method, path, allow in [
        ("GET", "/statekit/open", "POST"),
        ("GET", "/statekit/close", "POST"),
        ("POST", "/statekit/statekit.js", "GET, HEAD"),
    ]:
        refused = client.request(method, path)
        assert refused.status_code == 405, path
        assert refused.headers["allow"] == allow
        assert refused.json()["error"] == "method_not_allowed"


def test_a_prefix_of_the_apps_own(engine: StateEngine) -> None:
    with TestClient(starlette_app(engine, prefix="/_sk")) as c:
        sid = c.post("/_sk/open").json()["sid"]
        assert c.post("/add", headers=headers(sid)).status_code == 200
        assert c.post("/statekit/open").status_code == 404  # the app's, not statekit's


# -- the visit ------------------------------------------------------------------------


def test_the_visit_is_in_request_state_and_visit_of_tells_a_missing_middleware(
    engine: StateEngine,
) -> None:
    seen: list[Any] = []

    async def handler(request: Request) -> Response:
        seen.append(request.state.statekit)
        seen.append(visit_of(request))
        seen.append(visit_of(request.scope))
        return Response("ok")

    with TestClient(starlette_app(engine)) as c:
        c.app.router.routes.append(Route("/look", handler))
        c.get("/look", headers=headers("a" * 32))
    assert isinstance(seen[0], web.Visit)
    assert seen[0] is seen[1] is seen[2]
    assert seen[0].incoming.sid == "a" * 32

    bare = Starlette(routes=[Route("/look", lambda request: visit_of(request))])
    with TestClient(bare) as c, pytest.raises(UsageError, match="add StateKitMiddleware"):
        c.get("/look")
    with pytest.raises(UsageError, match="add StateKitMiddleware"):
        visit_of({"type": "http"})


def test_browser_tokens_go_out_and_come_back(client: TestClient) -> None:
    """A value kept in the browser comes back as a token in a response header, and the
    next request that sends it reads the value (from any tab)."""
    sid = open_session(client)
    saved = client.post("/login", json={"name": "ann"}, headers=headers(sid, {}))
    tokens = json.loads(saved.headers[web.BROWSER_SET_HEADER])
    assert set(tokens) == {"login"}
    assert "ann" not in tokens["login"]
    other_tab = open_session(client)
    assert client.post("/add", headers=headers(other_tab, tokens)).json()["name"] == "ann"
    assert client.post("/add", headers=headers(other_tab)).json()["name"] == ""
    for garbage in ["not json", "[1]", '{"login": 5}', '{"login": "sk1.AAAA"}']:
        answer = client.post("/add", headers={**headers(other_tab), web.BROWSER_HEADER: garbage})
        assert answer.status_code == 200
        assert answer.json()["name"] == ""


# -- errors ---------------------------------------------------------------------------


def test_an_unknown_or_missing_session_is_409_with_the_reason(client: TestClient) -> None:
    unknown = client.post("/add", headers=headers("forged-" + "x" * 25))
    assert unknown.status_code == 409
    assert unknown.headers[web.ENDED_HEADER] == "unknown"
    assert unknown.json()["error"] == "session_ended"
    missing = client.post("/add")
    assert missing.status_code == 409
    assert missing.headers[web.ENDED_HEADER] == "missing"
    assert missing.json()["reason"] == "missing"


def test_an_idle_session_is_409_idle(client: TestClient, clock: FakeClock) -> None:
    sid = open_session(client)
    clock.advance(61)
    ended = client.post("/add", headers=headers(sid))
    assert (ended.status_code, ended.headers[web.ENDED_HEADER]) == (409, "idle")
    assert sid not in ended.text  # never a whole id in an answer


@pytest.mark.parametrize(("path", "error"), [("/busy", "busy"), ("/down", "unavailable")])
def test_a_busy_session_or_an_unreachable_store_is_503(
    client: TestClient, path: str, error: str
) -> None:
    answer = client.post(path)
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["error"] == error


def test_an_error_of_the_apps_own_is_left_to_the_app(engine: StateEngine) -> None:
    app = starlette_app(engine, shutdown=False)
    with TestClient(app) as c, pytest.raises(RuntimeError, match="a bug"):
        c.post("/bug")
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/bug").status_code == 500


# -- the cookie fallback --------------------------------------------------------------


def test_the_cookie_session_opens_only_on_a_page_load(
    client: TestClient, engine: StateEngine
) -> None:
    """A page without JavaScript gets one session per browser, kept in a cookie, opened
    by a page load (a GET of HTML) and never by any other request."""
    assert client.post("/add").status_code == 409
    assert client.get("/", headers={"accept": "application/json"}).status_code == 409
    assert engine.session_count() == 0
    page = client.get("/", headers=PAGE_LOAD)
    assert page.status_code == 200
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(f"{web.SESSION_COOKIE}=")
    assert "HttpOnly" in cookie
    assert "samesite=lax" in cookie.lower()
    assert engine.session_count() == 1
    assert client.post("/add").json()["cart"] == ["milk"]  # the cookie names it
    again = client.get("/", headers=PAGE_LOAD)
    assert "set-cookie" not in again.headers  # the same session, kept
    assert client.post("/add").json()["cart"] == ["milk", "milk"]


def test_an_ended_cookie_session_clears_the_cookie_and_the_next_load_opens_one(
    client: TestClient, engine: StateEngine, clock: FakeClock
) -> None:
    client.get("/", headers=PAGE_LOAD)
    first = client.cookies[web.SESSION_COOKIE]
    clock.advance(61)
    ended = client.post("/add")
    assert ended.status_code == 409
    assert ended.headers[web.ENDED_HEADER] == "idle"
    assert "max-age=0" in ended.headers["set-cookie"].lower()
    assert web.SESSION_COOKIE not in client.cookies
    # A browser that kept the cookie anyway: its next page load opens a new session.
    reloaded = client.get("/", headers={**PAGE_LOAD, "cookie": f"{web.SESSION_COOKIE}={first}"})
    assert reloaded.status_code == 200
    second = reloaded.cookies[web.SESSION_COOKIE]
    assert second != first
    assert engine.exists(second)
    assert client.post("/add").json()["cart"] == ["milk"]


def test_without_the_cookie_fallback_a_page_load_has_no_session(engine: StateEngine) -> None:
    with TestClient(starlette_app(engine, cookie=False)) as c:
        c.cookies.set(web.SESSION_COOKIE, open_session(c))
        page = c.get("/", headers=PAGE_LOAD)
        assert page.status_code == 409
        assert page.headers[web.ENDED_HEADER] == "missing"
        assert "set-cookie" not in page.headers
        assert c.post("/add").status_code == 409  # the cookie is not read either


def test_a_header_session_wins_over_the_cookie(client: TestClient) -> None:
    client.get("/", headers=PAGE_LOAD)
    tab = open_session(client)
    assert client.post("/add", headers=headers(tab)).json()["cart"] == ["milk"]
    assert client.post("/add", headers=headers(tab)).json()["cart"] == ["milk", "milk"]
    assert client.post("/add").json()["cart"] == ["milk"]  # the cookie's own cart


# -- FastAPI --------------------------------------------------------------------------


def fastapi_app(engine: StateEngine) -> FastAPI:
    cart: SessionState[list[str]] = engine.session_state("cart", [])
    app = FastAPI()
    app.add_middleware(StateKitMiddleware, engine=engine)

    @app.post("/add")
    async def add(visit: CurrentVisit) -> dict[str, Any]:
        async with visit.aevent() as ev:
            ev[cart].append("milk")
            items: list[str] = ev[cart]
        return {"cart": items, "source": visit.incoming.source}

    return app


def test_fastapi_dependency_gives_the_visit_and_reads_a_forms_field(
    engine: StateEngine,
) -> None:
    """A plain form's hidden ``statekit_session`` field names the session."""
    with TestClient(fastapi_app(engine)) as c:
        sid = open_session(c)
        by_header = c.post("/add", headers=headers(sid)).json()
        assert by_header == {"cart": ["milk"], "source": "header"}
        by_form = c.post("/add", data={web.SESSION_FIELD: sid, "other": "x"}).json()
        assert by_form == {"cart": ["milk", "milk"], "source": "field"}
        other = open_session(c)
        both = c.post("/add", data={web.SESSION_FIELD: sid}, headers=headers(other)).json()
        assert both == {"cart": ["milk"], "source": "header"}  # the header wins
        assert c.post("/add", data={"other": "x"}).status_code == 409
        assert c.post("/add", json={web.SESSION_FIELD: sid}).status_code == 409  # not a form


def test_fastapi_a_plain_def_handler_reads_the_cookie_or_says_missing(
    engine: StateEngine,
) -> None:
    """FastAPI runs a plain ``def`` handler in a thread, where the visit cannot read a
    form: a request that is no form has none to read, so its session is the cookie's,
    or it is answered ``409 missing``. Fails if every POST without the header gets a
    form reader (it raised UsageError: a 500)."""
    cart: SessionState[list[str]] = engine.session_state("cart", [])
    app = FastAPI()
    install(app, engine)

    @app.get("/")
    def page(visit: CurrentVisit) -> HTMLResponse:
        with visit.event() as ev:
            return HTMLResponse(f"<p>{len(ev[cart])} items</p>")

    @app.post("/api/cart")
    def add(visit: CurrentVisit) -> dict[str, Any]:
        with visit.event() as ev:
            ev[cart].append("milk")
            return {"cart": ev[cart]}

    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/", headers=PAGE_LOAD).status_code == 200  # the cookie session
        assert c.post("/api/cart", json={}).json() == {"cart": ["milk"]}
        c.cookies.clear()
        missing = c.post("/api/cart", json={})
        assert (missing.status_code, missing.headers[web.ENDED_HEADER]) == (409, "missing")


def test_fastapi_answers_an_ended_session_409(engine: StateEngine, clock: FakeClock) -> None:
    with TestClient(fastapi_app(engine)) as c:
        sid = open_session(c)
        clock.advance(61)
        ended = c.post("/add", headers=headers(sid))
        assert (ended.status_code, ended.headers[web.ENDED_HEADER]) == (409, "idle")


# -- only async engine calls ----------------------------------------------------------


def test_only_the_engines_async_calls_are_used(
    engine: StateEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Redis a blocking call would stall the event loop: with every blocking call of
    the engine made to fail, the middleware's endpoints, the cookie fallback, events
    and the lifespan shutdown all still work."""
    ended: list[str] = []
    engine.on_close(lambda sid, reason: ended.append(reason))
    app = starlette_app(engine)

    def blocking(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a blocking engine call on the event loop")

    for name in ("open_session", "close_session", "exists", "session_count", "reap", "stats"):
        monkeypatch.setattr(engine, name, blocking)
    monkeypatch.setattr(engine, "shutdown", blocking)
    monkeypatch.setattr(Event, "__enter__", blocking)
    with TestClient(app) as c:
        sid = open_session(c)
        assert c.post("/add", headers=headers(sid)).status_code == 200
        assert c.post("/statekit/close", content=sid).status_code == 204
        assert c.get("/", headers=PAGE_LOAD).status_code == 200
        assert c.post("/add").status_code == 200
        c.cookies.set(web.SESSION_COOKIE, "gone-" + "x" * 27)
        assert c.get("/", headers=PAGE_LOAD).status_code == 200  # aexists, aopen_session
    assert ended.count("closed") == 1
    assert ended.count("shutdown") == 2
    monkeypatch.undo()


# -- lifespan -------------------------------------------------------------------------


def test_the_engine_shuts_down_after_the_apps_own_shutdown(engine: StateEngine) -> None:
    """Sessions still open when the app stops end with reason ``shutdown``, after the
    app's own shutdown code (which may still use the engine) has run."""
    order: list[str] = []
    engine.on_close(lambda sid, reason: order.append(f"ended: {reason}"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        order.append("app shutdown")
        await engine.aopen_session()  # the engine still works here

    app = starlette_app(engine)
    app.router.lifespan_context = lifespan
    with TestClient(app) as c:
        open_session(c)
    assert order == ["app shutdown", "ended: shutdown", "ended: shutdown"]


def test_shutdown_false_leaves_the_engine_running(engine: StateEngine) -> None:
    with TestClient(starlette_app(engine, shutdown=False)) as c:
        sid = open_session(c)
    assert engine.exists(sid)


async def _no_lifespan_raises(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "http", "only http here"
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _no_lifespan_returns(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await _no_lifespan_raises(scope, receive, send)


@pytest.mark.parametrize("app", [_no_lifespan_raises, _no_lifespan_returns])
def test_an_app_without_lifespan_still_shuts_the_engine_down(
    engine: StateEngine, app: Any
) -> None:
    ended: list[str] = []
    engine.on_close(lambda sid, reason: ended.append(reason))
    with TestClient(StateKitMiddleware(app, engine)) as c:
        open_session(c)
        assert c.get("/").status_code == 204
    assert ended == ["shutdown"]


def test_a_failing_app_startup_is_reported_and_the_engine_shut(engine: StateEngine) -> None:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("cannot start")
        yield  # pragma: no cover

    app = starlette_app(engine)
    app.router.lifespan_context = lifespan
    with pytest.raises(RuntimeError, match="cannot start"), TestClient(app):
        pass  # pragma: no cover
    with pytest.raises(EngineClosed):
        engine.open_session()


# -- raw ASGI -------------------------------------------------------------------------


class Wire:
    """A raw ASGI exchange: the request's messages in, the app's messages out."""

    def __init__(self, *bodies: bytes) -> None:
        self.inbox = [
            {"type": "http.request", "body": b, "more_body": i < len(bodies) - 1}
            for i, b in enumerate(bodies or [b""])
        ]
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        return self.inbox.pop(0) if self.inbox else {"type": "http.disconnect"}

    async def send(self, message: Any) -> None:
        self.sent.append(dict(message))

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])


def http_scope(path: str, method: str = "POST", headers: Any = ()) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "headers": list(headers)}


def test_raw_asgi_an_error_after_the_response_started_goes_on_up(engine: StateEngine) -> None:
    """Once the response started, the page cannot be told: the error is the server's."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise StoreUnavailable("redis", "lost mid-stream")

    wire = Wire()
    with pytest.raises(StoreUnavailable):
        asyncio.run(StateKitMiddleware(app, engine)(http_scope("/x"), wire.receive, wire.send))
    assert wire.status == 200
    assert len(wire.sent) == 1


def test_raw_asgi_headers_of_the_visit_join_the_apps_and_the_body_read_is_bounded(
    engine: StateEngine,
) -> None:
    seen: list[Any] = []
    name = engine.browser_state("name", "", keys=KEYS)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        visit = visit_of(scope)
        seen.append(scope["state"])
        async with visit.aevent() as ev:
            ev[name] = "bo"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"a", b"1")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sid = engine.open_session()
    middleware = StateKitMiddleware(app, engine)
    wire = Wire()
    scope = {**http_scope("/x", headers=[(b"x-statekit-session", sid.encode())]), "state": {}}
    asyncio.run(middleware(scope, wire.receive, wire.send))
    assert wire.headers[b"a"] == b"1"
    assert set(json.loads(wire.headers[b"x-statekit-browser-set"])) == {"name"}
    # The visit is kept in the request's own scope and state, not in copies of them.
    assert seen[0] is scope["state"]
    assert scope["state"]["statekit"] is scope["statekit"]
    assert scope["statekit"].incoming.sid == sid

    # A close body of many chunks, over the bound, reads as no id: nothing closes.
    wire = Wire(sid.encode(), *([b"x" * 512] * 100))
    asyncio.run(middleware(http_scope("/statekit/close"), wire.receive, wire.send))
    assert wire.status == 204
    assert len(wire.inbox) > 90  # the rest was never read
    assert engine.close_session(sid) is True


def test_raw_asgi_hostile_headers_read_as_absent(engine: StateEngine) -> None:
    seen: list[web.Visit] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(visit_of(scope))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = StateKitMiddleware(app, engine)
    hostile = [
        (b"x-statekit-browser", b"{" * 300_000),
        (b"cookie", b'=;;; statekit_session="quoted"; =x; \xff\xfe=\x00'),
        (b"x-statekit-browser", b'{"login": "t"}'),
        (b"accept", "text/html; é".encode("latin-1")),
    ]
    wire = Wire()
    asyncio.run(
        middleware(http_scope("/x", method="GET", headers=hostile), wire.receive, wire.send)
    )
    assert wire.status == 204
    assert seen[0].incoming.sid == "quoted"
    assert seen[0].incoming.source == "cookie"
    assert seen[0].tokens == {}  # the joined header is not a JSON object

    # The bound counts what a visit decodes: a huge header it does not read is passed
    # over, one it reads stops the reading.
    unread = [(b"x-filler", b"y" * 600_000), (b"x-statekit-session", b"after")]
    huge = [(b"cookie", b"y" * 600_000), (b"x-statekit-session", b"late")]
    for headers in (unread, huge):
        wire = Wire()
        asyncio.run(middleware(http_scope("/x", headers=headers), wire.receive, wire.send))
    assert seen[1].incoming.sid == "after"
    assert seen[2].incoming.sid is None  # past the bound, not read


_BROWSER = [
    (b"host", b"shop.example.com"),
    (b"connection", b"keep-alive"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0.0.0"),
    (b"sec-ch-ua-platform", b'"Linux"'),
    (b"accept-language", b"en-US,en;q=0.9"),
    (b"cookie", b"_ga=GA1.1.1; theme=dark"),
]


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        # statekit.js: the header names the session and carries the tokens
        ("POST", [(b"x-statekit-session", b"s1"), (b"x-statekit-browser", b'{"k": "t"}')]),
        # a page load: only the cookie names it (a second Cookie header, as HTTP/2 sends)
        ("GET", [(b"accept", b"text/html"), (b"cookie", b"statekit_session=from-cookie")]),
        # another site's page, told by Sec-Fetch-Site, then by Origin against Host
        ("POST", [(b"sec-fetch-site", b"cross-site"), (b"origin", b"https://shop.example.com")]),
        ("POST", [(b"origin", b"https://evil.example")]),
        ("POST", [(b"origin", b"https://shop.example.com")]),
        ("GET", [(b"sec-fetch-site", b"none"), (b"accept", b"text/html,*/*")]),
        # names not in lower case (ASGI allows them), a bytearray
        ("POST", [(b"Origin", b"https://evil.example"), (b"X-Statekit-Session", b"s2")]),
        ("GET", [(b"Accept", b"text/html"), (b"Cookie", b"statekit_session=c1")]),
        ("GET", [(b"accept", b"text/html"), (bytearray(b"X-Statekit-Browser"), b'{"k": "u"}')]),
    ],
)
def test_raw_asgi_a_visit_reads_a_browsers_request_as_from_all_its_headers(
    engine: StateEngine, method: str, extra: list[tuple[bytes, bytes]]
) -> None:
    """The middleware decodes only the headers a visit reads (a browser sends twenty):
    its visit is the one made from every header. Fails if a header a visit reads is
    left out of ``web.VISIT_HEADERS``, or a request's odd names are read otherwise."""
    seen: list[web.Visit] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(visit_of(scope))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    raw = [*_BROWSER, *extra]
    wire = Wire()
    scope = http_scope("/x", method=method, headers=raw)
    asyncio.run(StateKitMiddleware(app, engine)(scope, wire.receive, wire.send))

    every: dict[str, str] = {}
    for name, value in raw:
        key, text = bytes(name).decode().lower(), value.decode()
        every[key] = f"{every[key]}; {text}" if key in every else text
    cookies = dict(pair.split("=", 1) for pair in every["cookie"].split("; "))
    expected = web.SessionGate(engine).visit(method, every, cookies=cookies)
    got = seen[0]
    assert (got.incoming, got.page_load, got.cross_site, got.tokens) == (
        expected.incoming,
        expected.page_load,
        expected.cross_site,
        expected.tokens,
    )


def test_raw_asgi_a_websocket_gets_a_visit_and_passes_through(engine: StateEngine) -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["type"], visit_of(scope)))
        await send({"type": "websocket.close"})

    wire = Wire()
    scope = {"type": "websocket", "path": "/ws", "headers": [(b"x-statekit-session", b"s1")]}
    asyncio.run(StateKitMiddleware(app, engine)(scope, wire.receive, wire.send))
    assert seen[0][0] == "websocket"
    assert seen[0][1].incoming.sid == "s1"
    assert seen[0][1].page_load is False
    assert wire.sent == [{"type": "websocket.close"}]


def test_a_websocket_handshake_never_opens_a_cookie_session(engine: StateEngine) -> None:
    """A handshake whose Accept names HTML is still no page load: its cookie could never
    reach the browser, and every handshake would open a session past the limits put on
    ``/statekit/open``. Fails if the handshake counts as a GET page load."""
    opened: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        with contextlib.suppress(SessionNotFound):
            opened.append(await visit_of(scope).asession())
        await send({"type": "websocket.close"})

    middleware = StateKitMiddleware(app, engine)
    scope = {"type": "websocket", "path": "/ws", "headers": [(b"accept", b"text/html")]}
    for _ in range(3):
        asyncio.run(middleware(dict(scope), Wire().receive, Wire().send))
    assert opened == []
    assert engine.session_count() == 0


def test_the_cookie_response_has_one_cache_control_statekits(engine: StateEngine) -> None:
    """A response that sets the session cookie must not be kept by a shared cache: its
    ``Cache-Control`` replaces the app's (as the Flask and Django integrations do).
    Fails if both are sent: a cache reading the first would store the cookie."""

    async def page(request: Request) -> Response:
        await visit_of(request).asession()
        return HTMLResponse("<p>hi</p>", headers={"Cache-Control": "public, max-age=600"})

    app = Starlette(routes=[Route("/", page)])
    app.add_middleware(StateKitMiddleware, engine=engine)
    with TestClient(app) as client:
        answer = client.get("/", headers=PAGE_LOAD)
        assert "set-cookie" in answer.headers
        assert answer.headers.get_list("cache-control") == ["private, no-store"]
        again = client.get("/", headers=PAGE_LOAD)  # no cookie set: the app's own stays
        assert again.headers.get_list("cache-control") == ["public, max-age=600"]


def test_streaming_response_gets_the_headers_of_events_before_it_starts(
    engine: StateEngine,
) -> None:
    name = engine.browser_state("name", "", keys=KEYS, storage_key="login")

    async def stream(request: Request) -> Response:
        async with visit_of(request).aevent() as ev:
            ev[name] = "cy"

        async def body() -> AsyncIterator[bytes]:
            yield b"a"
            yield b"b"

        return StreamingResponse(body())

    app = Starlette(routes=[Route("/s", stream)])
    app.add_middleware(StateKitMiddleware, engine=engine)
    with TestClient(app) as c:
        sid = open_session(c)
        response = c.get("/s", headers=headers(sid))
        assert response.text == "ab"
        assert set(json.loads(response.headers[web.BROWSER_SET_HEADER])) == {"login"}


def test_a_bad_engine_or_prefix_is_refused_at_once(engine: StateEngine) -> None:
    with pytest.raises(TypeError, match="StateEngine"):
        StateKitMiddleware(_no_lifespan_returns, object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix"):
        StateKitMiddleware(_no_lifespan_returns, engine, prefix="statekit/")
    assert "prefix='/statekit'" in repr(StateKitMiddleware(_no_lifespan_returns, engine))


class Lifespan:
    """A server's side of the lifespan protocol: startup, then shutdown."""

    def __init__(self) -> None:
        self.inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        self.sent: list[str] = []

    async def receive(self) -> dict[str, Any]:
        return self.inbox.pop(0)

    async def send(self, message: Any) -> None:
        self.sent.append(message["type"])


def test_raw_asgi_an_engine_that_fails_to_shut_down_is_reported_to_the_server(
    engine: StateEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken() -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(engine, "ashutdown", broken)
    server = Lifespan()
    asyncio.run(
        StateKitMiddleware(_no_lifespan_returns, engine)(
            {"type": "lifespan"}, server.receive, server.send
        )
    )
    assert server.sent == ["lifespan.startup.complete", "lifespan.shutdown.failed"]
    assert "shutdown failed" in caplog.text


def test_raw_asgi_an_app_failing_in_its_lifespan_still_shuts_the_engine(
    engine: StateEngine,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        raise RuntimeError("crashed while serving")

    ended: list[str] = []
    engine.on_close(lambda sid, reason: ended.append(reason))
    engine.open_session()
    server = Lifespan()
    with pytest.raises(RuntimeError, match="crashed"):
        asyncio.run(
            StateKitMiddleware(app, engine)({"type": "lifespan"}, server.receive, server.send)
        )
    assert ended == ["shutdown"]


def test_raw_asgi_header_pairs_of_the_wrong_shape_are_skipped(engine: StateEngine) -> None:
    seen: list[web.Visit] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(visit_of(scope))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    odd = [(b"a",), "xy", (None, b"v"), (b"x-statekit-session", b"kept")]
    wire = Wire()
    asyncio.run(
        StateKitMiddleware(app, engine)(http_scope("/x", headers=odd), wire.receive, wire.send)
    )
    assert seen[0].incoming.sid == "kept"


def test_fastapi_an_oversized_form_is_not_read_for_its_session(engine: StateEngine) -> None:
    with TestClient(fastapi_app(engine)) as c:
        sid = open_session(c)
        big = {web.SESSION_FIELD: sid, "filler": "x" * (1024 * 1024)}
        assert c.post("/add", data=big).status_code == 409


# -- what the app writes in its request is seen around it -------------------------------


def test_what_the_app_writes_in_its_request_is_seen_by_the_middleware_around_it(
    engine: StateEngine,
) -> None:
    """An access log or a metrics middleware outside statekit's reads what the app wrote
    during the request: ``request.state.user`` (an auth dependency's) and the matched
    route (Starlette writes ``scope["route"]``). A middleware that handed the app a copy
    of the scope or of its state would hide both (``None`` here)."""
    app = FastAPI()
    app.add_middleware(StateKitMiddleware, engine=engine)

    @app.middleware("http")
    async def log(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers["x-user"] = str(getattr(request.state, "user", None))
        response.headers["x-route"] = str(getattr(request.scope.get("route"), "path", None))
        response.headers["x-visit"] = str(visit_of(request).incoming.source)
        return response

    @app.get("/items/{item_id}")
    async def item(item_id: int, request: Request) -> dict[str, Any]:
        request.state.user = "ann"
        return {}

    with TestClient(app) as c:
        answer = c.get("/items/3", headers=headers("a" * 32))
    assert answer.headers["x-user"] == "ann"
    assert answer.headers["x-route"] == "/items/{item_id}"
    assert answer.headers["x-visit"] == "header"


# -- another site's page ----------------------------------------------------------------

CROSS_SITE = {"origin": "https://evil.example", "sec-fetch-site": "cross-site"}


def test_another_sites_page_cannot_open_or_close_a_session(
    client: TestClient, engine: StateEngine
) -> None:
    """A page of another site cannot open sessions (to fill the store and evict the
    tabs of real users) or close a tab's session by posting its id: both are ``403``
    and touch nothing. A middleware that did not hand the request's headers to the gate
    would open and close here."""
    sid = open_session(client)
    refused = client.post("/statekit/open", headers=CROSS_SITE)
    assert refused.status_code == 403
    assert refused.json()["error"] == "cross_site"
    assert client.post("/statekit/close", content=sid, headers=CROSS_SITE).status_code == 403
    assert engine.session_count() == 1
    assert engine.exists(sid)
    own = {"origin": "http://testserver", "sec-fetch-site": "same-origin"}
    assert client.post("/statekit/open", headers=own).status_code == 200
    assert client.get("/statekit/statekit.js", headers=CROSS_SITE).status_code == 200


def test_allowed_origins_let_a_front_end_served_elsewhere_open_sessions(
    engine: StateEngine,
) -> None:
    """A front end on another origin of the same site is refused unless it is listed
    (``allowed_origins``, handed on to the gate); only the listed origin is let in."""
    front = {"origin": "https://app.example.com", "sec-fetch-site": "same-site"}
    sibling = {"origin": "https://blog.example.com", "sec-fetch-site": "same-site"}
    app = starlette_app(engine, allowed_origins=["https://app.example.com"])
    with TestClient(app) as c:
        sid = c.post("/statekit/open", headers=front).json()["sid"]
        assert c.post("/statekit/open", headers=sibling).status_code == 403
        assert c.post("/statekit/open", headers=CROSS_SITE).status_code == 403
        assert c.post("/statekit/close", content=sid, headers=sibling).status_code == 403
        assert engine.exists(sid)
        assert c.post("/statekit/close", content=sid, headers=front).status_code == 204
        assert engine.close_session(sid) is False  # the allowed page closed it


def test_the_script_is_answered_304_to_a_browser_that_has_it(client: TestClient) -> None:
    """The middleware hands the gate ``If-None-Match``: a browser revalidating its copy
    is told it is current, without the script's bytes."""
    first = client.get("/statekit/statekit.js")
    etag = first.headers["etag"]
    again = client.get("/statekit/statekit.js", headers={"if-none-match": etag})
    assert (again.status_code, again.content) == (304, b"")
    assert again.headers["etag"] == etag
    changed = client.get("/statekit/statekit.js", headers={"if-none-match": '"other"'})
    assert (changed.status_code, changed.content) == (200, web.script())


# -- websockets -------------------------------------------------------------------------


def test_a_websocket_names_its_session_in_the_query(engine: StateEngine) -> None:
    """A browser cannot set headers on a websocket: the page connects to
    ``/ws?statekit_session=<id>`` and the socket's events run in the tab's session."""
    cart: SessionState[list[str]] = engine.session_state("cart", [])

    async def socket(ws: WebSocket) -> None:
        await ws.accept()
        visit = visit_of(ws)
        async with visit.aevent() as ev:
            ev[cart].append(await ws.receive_text())
            await ws.send_json({"cart": ev[cart], "source": visit.incoming.source})
        await ws.close()

    app = Starlette(routes=[WebSocketRoute("/ws", socket)])
    app.add_middleware(StateKitMiddleware, engine=engine)
    with TestClient(app) as c:
        sid = open_session(c)
        with c.websocket_connect(f"/ws?x=1&{web.SESSION_QUERY}={sid}") as ws:
            ws.send_text("milk")
            assert ws.receive_json() == {"cart": ["milk"], "source": "query"}
        with c.websocket_connect(f"/ws?{web.SESSION_QUERY}={sid}") as ws:
            ws.send_text("tea")
            assert ws.receive_json()["cart"] == ["milk", "tea"]  # the same session


def test_only_a_websocket_reads_the_session_from_the_query(engine: StateEngine) -> None:
    """An http request that names its session in the query is not read (the id belongs
    in the header, out of logs and the Referer); an oversized query reads as none."""
    seen: list[web.Visit] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(visit_of(scope))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    middleware = StateKitMiddleware(app, engine)
    query = b"statekit_session=s1"
    for scope in (
        {**http_scope("/x"), "query_string": query},
        {"type": "websocket", "path": "/ws", "headers": [], "query_string": query},
        {"type": "websocket", "path": "/ws", "headers": [], "query_string": b"a" * 9000 + query},
        {"type": "websocket", "path": "/ws", "headers": [], "query_string": "not bytes"},
    ):
        wire = Wire()
        asyncio.run(middleware(scope, wire.receive, wire.send))
    assert [(v.incoming.sid, v.incoming.source) for v in seen] == [
        (None, None),
        ("s1", "query"),
        (None, None),
        (None, None),
    ]


# -- an app's own exception handlers ----------------------------------------------------


def handlers_app(engine: StateEngine, wire: str) -> FastAPI:
    """An app with handlers of its own for the broad classes statekit's errors belong
    to (``SessionNotFound`` is a ``KeyError``, ``StoreUnavailable`` a
    ``ConnectionError``)."""
    cart: SessionState[list[str]] = engine.session_state("cart", [])

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"detail": "not found"}, status_code=404)

    def offline(request: Request, exc: Exception) -> Response:  # a sync handler
        return JSONResponse({"detail": "offline"}, status_code=502)

    own: dict[Any, Any] = {KeyError: not_found, ConnectionError: offline}
    if wire == "exception_handlers":
        app = FastAPI(exception_handlers={**own, **exception_handlers()})
        app.add_middleware(StateKitMiddleware, engine=engine)
    else:
        app = FastAPI(exception_handlers=own)
        if wire == "install":
            install(app, engine)
        else:
            app.add_middleware(StateKitMiddleware, engine=engine)

    @app.post("/add")
    async def add(visit: CurrentVisit) -> dict[str, Any]:
        async with visit.aevent() as ev:
            ev[cart].append("milk")
            return {"cart": ev[cart]}

    @app.post("/peek/{other}")
    async def peek(other: str, visit: CurrentVisit) -> dict[str, Any]:
        await visit.asession()
        async with engine.aevent(other) as ev:  # another session: the app's business
            return {"cart": ev[cart]}

    @app.post("/down")
    async def down() -> None:
        raise StoreUnavailable("redis", "connection refused")

    @app.post("/missing")
    async def missing() -> None:
        raise KeyError("an item of the app's")

    return app


@pytest.mark.parametrize("wire", ["install", "exception_handlers"])
def test_install_answers_statekits_errors_before_the_apps_own_handlers(
    engine: StateEngine, wire: str
) -> None:
    """With the app's own ``KeyError`` handler (a "missing key: 404"), an ended session
    is still the ``409`` statekit.js acts on, and an unreachable store the ``503`` to
    retry. Without statekit's handlers the app's would answer ``404`` and ``502``. Its
    handlers still answer its own errors, and an error about *another* session than the
    request's (a lookup the handler made) is the app's: its ``404``."""
    with TestClient(handlers_app(engine, wire)) as c:
        sid = open_session(c)
        assert c.post("/add", headers=headers(sid)).json() == {"cart": ["milk"]}
        unknown = c.post("/add", headers=headers("forged-" + "x" * 25))
        assert (unknown.status_code, unknown.headers[web.ENDED_HEADER]) == (409, "unknown")
        missing = c.post("/add")
        assert (missing.status_code, missing.headers[web.ENDED_HEADER]) == (409, "missing")
        down = c.post("/down", headers=headers(sid))
        assert (down.status_code, down.headers["retry-after"]) == (503, "1")
        assert c.post("/missing").status_code == 404  # the app's own KeyError
        other = c.post(f"/peek/{'o' * 32}", headers=headers(sid))
        assert (other.status_code, other.json()) == (404, {"detail": "not found"})
        assert web.ENDED_HEADER.lower() not in other.headers


def test_without_install_an_apps_broad_handler_takes_statekits_errors(
    engine: StateEngine,
) -> None:
    """Why :func:`install` exists: with ``add_middleware`` alone, the app's ``KeyError``
    handler answers an ended session before the middleware sees it."""
    with TestClient(handlers_app(engine, "add_middleware")) as c:
        assert c.post("/add", headers=headers("forged-" + "x" * 25)).status_code == 404


def test_statekits_handler_leaves_an_error_about_another_session_to_the_server(
    engine: StateEngine,
) -> None:
    """With no handler of the app's for it, another session's error goes on up (a 500),
    never a 409 telling this tab that its own session ended."""
    cart: SessionState[list[str]] = engine.session_state("cart", [])

    async def peek(request: Request) -> Response:
        await visit_of(request).asession()
        async with engine.aevent("o" * 32) as ev:
            return JSONResponse(ev[cart])

    app = Starlette(routes=[Route("/peek", peek, methods=["POST"])])
    install(app, engine, shutdown=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        sid = open_session(c)
        answer = c.post("/peek", headers=headers(sid))
        assert answer.status_code == 500
        assert web.ENDED_HEADER.lower() not in answer.headers
    with TestClient(app) as c, pytest.raises(SessionNotFound):
        c.post("/peek", headers=headers(c.post("/statekit/open").json()["sid"]))


def test_install_passes_its_options_and_checks_them_at_once(engine: StateEngine) -> None:
    app = Starlette()
    install(app, engine, prefix="/sk", cookie=False, allowed_origins=iter(["https://a.example"]))
    with TestClient(app) as c:
        assert c.post("/sk/open", headers={"origin": "https://a.example"}).status_code == 200
        assert c.post("/statekit/open").status_code == 404
    with pytest.raises(ValueError, match="prefix"):
        install(Starlette(), engine, prefix="sk/")
    with pytest.raises(TypeError, match="allowed_origins"):
        install(Starlette(), engine, allowed_origins="https://a.example")


# -- FastAPI: the form, read only when asked for ------------------------------------------


class Reads:
    """An ASGI wrapper around the whole app that counts the body messages it read."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.count = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counted() -> Any:
            message = await receive()
            if message.get("type") == "http.request":
                self.count += 1
            return message

        await self.app(scope, counted, send)


def form_app(engine: StateEngine) -> FastAPI:
    cart: SessionState[list[str]] = engine.session_state("cart", [])
    app = FastAPI()
    install(app, engine)

    @app.post("/raw")
    async def raw(visit: CurrentVisit) -> dict[str, Any]:
        return {"wants_form": visit.wants_form}  # never asks for the session

    @app.post("/add-then-body")
    async def add_then_body(request: Request, visit: CurrentVisit) -> dict[str, Any]:
        async with visit.aevent() as ev:
            ev[cart].append("milk")
            items: list[str] = ev[cart]
        return {"cart": items, "body": (await request.body()).decode()}

    @app.post("/stream-then-add")
    async def stream_then_add(request: Request, visit: CurrentVisit) -> dict[str, Any]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        async with visit.aevent() as ev:
            ev[cart].append("milk")
        return {"size": size}

    return app


def test_fastapi_reads_the_form_only_when_the_session_is_asked_for(
    engine: StateEngine,
) -> None:
    """A handler that never asks for its session (an upload, a webhook) keeps its body
    unread: a dependency that read every form post up front would read it here."""
    wrapped = Reads(form_app(engine))
    with TestClient(wrapped) as c:
        sid = open_session(c)
        wrapped.count = 0
        answer = c.post("/raw", data={web.SESSION_FIELD: sid, "x": "1"})
        assert answer.json() == {"wants_form": True}
        assert wrapped.count == 0


def test_fastapi_a_handler_reads_the_body_after_its_session_came_from_the_form(
    engine: StateEngine,
) -> None:
    """The form is read with ``request.body()``, which Starlette keeps: the handler
    reads the same body again after its event."""
    with TestClient(form_app(engine)) as c:
        sid = open_session(c)
        answer = c.post("/add-then-body", data={web.SESSION_FIELD: sid, "x": "1"})
        assert answer.status_code == 200
        assert answer.json() == {"cart": ["milk"], "body": f"{web.SESSION_FIELD}={sid}&x=1"}


def test_fastapi_a_form_without_a_length_or_already_streamed_is_not_read(
    engine: StateEngine,
) -> None:
    """The form is read only when its Content-Length says it is at most 1 MiB: a
    chunked body of unknown size is not read (no session: 409), and neither is one the
    handler consumed as a stream (409, not a crash)."""
    with TestClient(form_app(engine)) as c:
        sid = open_session(c)
        form = {"content-type": "application/x-www-form-urlencoded"}
        chunked = c.post(
            "/add-then-body", content=iter([f"{web.SESSION_FIELD}={sid}".encode()]), headers=form
        )
        assert (chunked.status_code, chunked.headers[web.ENDED_HEADER]) == (409, "missing")
        streamed = c.post("/stream-then-add", data={web.SESSION_FIELD: sid})
        assert (streamed.status_code, streamed.headers[web.ENDED_HEADER]) == (409, "missing")
        by_header = c.post("/stream-then-add", data={"x": "1"}, headers=headers(sid))
        assert by_header.json() == {"size": 3}


def test_fastapi_a_form_another_site_posts_cannot_choose_the_session(
    engine: StateEngine,
) -> None:
    """Another site's form that names a tab's session (one it learned) is not run in
    that session: its field is ignored."""
    with TestClient(form_app(engine)) as c:
        sid = open_session(c)
        forged = c.post("/add-then-body", data={web.SESSION_FIELD: sid}, headers=CROSS_SITE)
        assert forged.status_code == 409
        own = c.post("/add-then-body", data={"x": "1"}, headers=headers(sid))
        assert own.json()["cart"] == ["milk"]  # the forged post added nothing


def test_statekits_handlers_leave_a_websockets_error_to_the_server(engine: StateEngine) -> None:
    """A websocket has no HTTP answer to send: an ended session in a websocket handler
    goes on up (the handshake is refused), with no HTTP message sent on the socket."""

    async def socket(ws: WebSocket) -> None:
        async with visit_of(ws).aevent():
            pass  # pragma: no cover

    app = Starlette(routes=[WebSocketRoute("/ws", socket)])
    install(app, engine, shutdown=False)
    url = f"/ws?{web.SESSION_QUERY}=gone-{'x' * 27}"
    with TestClient(app) as c, pytest.raises(SessionNotFound), c.websocket_connect(url):
        pass  # pragma: no cover


def test_fastapi_reads_a_multipart_forms_session_field_and_leaves_the_body_to_the_handler(
    engine: StateEngine,
) -> None:
    """A multipart form (a form with a file) names its session in the hidden field, as
    an urlencoded one does, and the handler still reads the whole body afterwards (fails
    if the multipart branch consumed the stream, or ignored the field: a 409)."""
    with TestClient(form_app(engine)) as c:
        sid = open_session(c)
        answer = c.post(
            "/add-then-body",
            data={web.SESSION_FIELD: sid},
            files={"upload": ("notes.txt", b"hello", "text/plain")},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["cart"] == ["milk"]
        assert 'name="upload"' in answer.json()["body"]
        assert "hello" in answer.json()["body"]
