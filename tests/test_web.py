"""statekit.web, the wire every integration shares: what a request carries (and that
hostile input reads as absent), the answers to errors, the gate's endpoints and a
visit's session from each source."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from statekit import (
    BrowserKeys,
    SessionBusy,
    SessionExpired,
    SessionNotFound,
    SessionNotInitialized,
    SessionState,
    StateEngine,
    StoreUnavailable,
    UsageError,
    web,
)
from statekit.exceptions import SessionCorrupt
from statekit.testing import FakeClock

PAGE_LOAD = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(clock: FakeClock) -> Iterator[StateEngine]:
    eng = StateEngine(clock=clock, idle_ttl=60, closed_ttl=30)
    yield eng
    eng.shutdown()


@pytest.fixture
def gate(engine: StateEngine) -> web.SessionGate:
    return web.SessionGate(engine)


# -- what a request carries -------------------------------------------------------------


def test_the_header_wins_over_the_field_and_the_field_over_the_cookie() -> None:
    """statekit.js's header is the tab's own session; a form's field comes next; the
    browser-wide cookie only when neither names one."""
    all_three = web.read_request(
        {"x-statekit-session": "h"},
        cookies={"statekit_session": "c"},
        form={"statekit_session": "f"},
    )
    assert (all_three.sid, all_three.source) == ("h", "header")
    no_header = web.read_request(
        {}, cookies={"statekit_session": "c"}, form={"statekit_session": "f"}
    )
    assert (no_header.sid, no_header.source) == ("f", "field")
    only_cookie = web.read_request({}, cookies={"statekit_session": "c"})
    assert (only_cookie.sid, only_cookie.source) == ("c", "cookie")
    nothing = web.read_request({})
    assert (nothing.sid, nothing.source, dict(nothing.tokens)) == (None, None, {})


def test_header_names_are_read_in_any_case() -> None:
    for name in ("X-Statekit-Session", "x-statekit-session", "X-STATEKIT-SESSION"):
        assert web.read_request({name: "s"}).sid == "s"
    tokens = web.read_request({"X-STATEKIT-BROWSER": '{"login": "t"}'}).tokens
    assert dict(tokens) == {"login": "t"}


@pytest.mark.parametrize("bad", ["", 5, None, ["s"], b"s", {"a": 1}], ids=repr)
def test_a_value_that_is_not_a_nonempty_string_reads_as_absent(bad: Any) -> None:
    """A framework's multi-valued form field (a list) or an empty header is not an id:
    the next source is read."""
    incoming = web.read_request(
        {"x-statekit-session": bad},
        form={"statekit_session": bad},
        cookies={"statekit_session": "c"},
    )
    assert (incoming.sid, incoming.source) == ("c", "cookie")


@pytest.mark.parametrize("bad", [["statekit_session=c"], "statekit_session=c", 5], ids=repr)
def test_cookies_or_a_form_that_are_not_mappings_read_as_absent(bad: Any) -> None:
    """read_request never raises: cookies or a form handed over as something else than
    a mapping (a framework's raw cookie header, a list) are not read. Fails if it
    raises (an AttributeError on ``.get``) or reads an id out of them."""
    incoming = web.read_request({}, cookies=bad, form=bad, query=bad)
    assert (incoming.sid, incoming.source) == (None, None)
    assert web.read_request({"x-statekit-session": "h"}, cookies=bad).sid == "h"


@pytest.mark.parametrize(
    "value",
    [
        "not json",
        "[1, 2]",
        '"a string"',
        "null",
        "{" * 100,
        "[" * 5000,  # nested past the parser's depth: a RecursionError, not a ValueError
        '{"login": "t"' + " " * (300 * 1024) + "}",  # over the bound: not even parsed
        "\udcff",
    ],
    ids=lambda v: repr(v[:20]),
)
def test_a_malformed_tokens_header_reads_as_no_tokens(value: str) -> None:
    assert web.browser_tokens(value) == {}
    assert dict(web.read_request({"x-statekit-browser": value}).tokens) == {}


def test_only_string_entries_of_the_tokens_are_kept() -> None:
    raw = json.dumps({"login": "t", "n": 5, "x": None, "l": ["t"], "o": {"a": "b"}})
    assert web.browser_tokens(raw) == {"login": "t"}
    assert web.browser_tokens(raw.encode()) == {"login": "t"}  # bytes, as ASGI gives
    assert web.browser_tokens(b'{"k": "\xe9"}') == {"k": "\xe9"}  # latin-1, never fails
    assert web.browser_tokens(None) == {}


def test_headers_of_odd_types_do_not_raise() -> None:
    """A host may hand over a mapping with non-string keys or values: they read as
    absent, never as an error page."""
    odd: dict[Any, Any] = {1: "x", None: "y", "x-statekit-browser": 7, "accept": "text/html"}
    incoming = web.read_request(odd)
    assert (incoming.sid, dict(incoming.tokens)) == (None, {})
    assert web.is_page_load("GET", odd)
    assert not web.is_page_load("GET", {"accept": 7})  # type: ignore[dict-item]


def test_a_visit_of_odd_headers_reads_them_as_absent(gate: web.SessionGate) -> None:
    odd: dict[Any, Any] = {"accept": None, "x-statekit-session": 5, "x-statekit-browser": 7}
    visit = gate.visit("GET", odd)
    assert (visit.page_load, visit.incoming.sid, dict(visit.tokens)) == (False, None, {})


def test_new_tokens_go_back_as_one_header_value() -> None:
    assert web.browser_set_value({}) is None
    value = web.browser_set_value({"login": "t", "gone": None})
    assert value is not None
    assert json.loads(value) == {"login": "t", "gone": None}  # null removes the key


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("GET", PAGE_LOAD, True),
        ("get", {"accept": "text/html"}, True),
        ("GET", {"Accept": "application/json"}, False),
        ("GET", {}, False),
        ("POST", PAGE_LOAD, False),
        ("HEAD", PAGE_LOAD, False),
        ("GET", {**PAGE_LOAD, "X-Statekit-Session": "s"}, False),  # statekit.js's own
    ],
)
def test_a_page_load_is_a_get_of_html_not_sent_by_statekit_js(
    method: str, headers: dict[str, str], expected: bool
) -> None:
    assert web.is_page_load(method, headers) is expected


# -- answers to errors ------------------------------------------------------------------


def body(answer: web.Answer) -> Any:
    return json.loads(answer.body)


def test_an_ended_session_is_409_naming_the_reason() -> None:
    sid = "s" * 32
    for exc, reason in [
        (SessionExpired(sid, "idle", 5.0), "idle"),
        (SessionExpired(sid, "closed"), "closed"),
        (SessionNotFound(sid), "unknown"),
        (SessionCorrupt(sid, "bad bytes"), "unknown"),
        (SessionNotFound(None, "no session"), "missing"),
    ]:
        answer = web.answer_for(exc)
        assert answer is not None
        assert answer.status == 409
        assert answer.headers[web.ENDED_HEADER] == reason
        assert answer.headers["Content-Type"] == "application/json"
        assert body(answer)["error"] == "session_ended"
        assert body(answer)["reason"] == reason
        assert sid not in answer.body.decode()  # never a whole id


def test_a_busy_session_or_store_is_503_to_retry() -> None:
    busy = web.answer_for(SessionBusy("s" * 32, 30.0))
    down = web.answer_for(StoreUnavailable("redis", "refused"))
    assert busy is not None
    assert down is not None
    assert (busy.status, busy.headers["Retry-After"], body(busy)["error"]) == (503, "1", "busy")
    assert (down.status, body(down)["error"]) == (503, "unavailable")


@pytest.mark.parametrize("exc", [ValueError("bad"), KeyError("k"), RuntimeError(), SystemExit()])
def test_any_other_error_is_the_hosts(exc: BaseException) -> None:
    assert web.answer_for(exc) is None


# -- the gate's endpoints ---------------------------------------------------------------


def test_a_gate_takes_an_engine_and_a_clean_prefix(engine: StateEngine) -> None:
    with pytest.raises(TypeError, match="StateEngine"):
        web.SessionGate(object())  # type: ignore[arg-type]
    for prefix in ("statekit", "/statekit/", "", 5):
        with pytest.raises(ValueError, match="prefix"):
            web.SessionGate(engine, prefix=prefix)  # type: ignore[arg-type]
    assert repr(web.SessionGate(engine, prefix="/sk")) == "SessionGate(prefix='/sk', cookie=True)"


def test_serve_opens_closes_and_serves_the_script(
    gate: web.SessionGate, engine: StateEngine
) -> None:
    assert gate.serve("GET", "/api/cart") is None  # the app's own path
    opened = gate.serve("POST", "/statekit/open")
    assert opened is not None
    assert opened.status == 200
    sid = body(opened)["sid"]
    other = body(gate.serve("POST", "/statekit/open"))["sid"]  # type: ignore[arg-type]
    assert engine.exists(sid)
    closed = gate.serve("POST", "/statekit/close", sid.encode())
    assert closed is not None
    assert (closed.status, closed.body) == (204, b"")
    assert engine.close_session(sid) is False  # already closed
    assert engine.close_session(other) is True  # the other tab's was left open
    script = gate.serve("GET", "/statekit/statekit.js")
    assert script is not None
    assert script.body == web.script()


@pytest.mark.parametrize(
    "payload",
    [b"", b"   ", b"never-issued", "never-issued-str", b"\xff\xfe\x00", b"s" * 257, "é" * 5],
    ids=repr,
)
def test_a_close_of_an_unknown_id_or_a_bad_body_is_204_and_closes_nothing(
    gate: web.SessionGate, engine: StateEngine, payload: Any
) -> None:
    sid = engine.open_session()
    for serve in (gate.serve, lambda *a: asyncio.run(gate.aserve(*a))):
        answer = serve("POST", "/statekit/close", payload)
        assert answer is not None
        assert answer.status == 204
    assert engine.exists(sid)
    assert engine.close_session(sid) is True


def test_a_close_body_with_whitespace_around_the_id_closes_it(
    gate: web.SessionGate, engine: StateEngine
) -> None:
    sid = engine.open_session()
    gate.serve("POST", "/statekit/close", f"  {sid}\n".encode())
    assert engine.close_session(sid) is False


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/statekit/open", "POST"),
        ("PUT", "/statekit/close", "POST"),
        ("POST", "/statekit/statekit.js", "GET, HEAD"),
        ("DELETE", "/statekit/statekit.js", "GET, HEAD"),
    ],
)
def test_a_wrong_method_is_405_with_allow(
    gate: web.SessionGate, engine: StateEngine, method: str, path: str, allow: str
) -> None:
    for answer in (gate.serve(method, path), asyncio.run(gate.aserve(method, path))):
        assert answer is not None
        assert (answer.status, answer.headers["Allow"]) == (405, allow)
    assert engine.session_count() == 0


def test_an_open_the_store_cannot_serve_is_503(
    gate: web.SessionGate, engine: StateEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down() -> str:
        raise StoreUnavailable("redis", "refused")

    async def adown() -> str:
        raise SessionBusy("s" * 32, 1.0)

    monkeypatch.setattr(engine, "open_session", down)
    monkeypatch.setattr(engine, "aopen_session", adown)
    sync = gate.serve("POST", "/statekit/open")
    asynchronous = asyncio.run(gate.aserve("POST", "/statekit/open"))
    assert sync is not None
    assert asynchronous is not None
    assert (sync.status, body(sync)["error"]) == (503, "unavailable")
    assert (asynchronous.status, body(asynchronous)["error"]) == (503, "busy")


def test_aserve_answers_as_serve(gate: web.SessionGate, engine: StateEngine) -> None:
    opened = asyncio.run(gate.aserve("POST", "/statekit/open"))
    assert opened is not None
    sid = body(opened)["sid"]
    assert asyncio.run(gate.aserve("GET", "/x")) is None
    script = asyncio.run(gate.aserve("HEAD", "/statekit/statekit.js"))
    assert script is not None
    assert script.status == 200
    asyncio.run(gate.aserve("POST", "/statekit/close", sid.encode()))
    assert engine.close_session(sid) is False


# -- a visit's session from each source -------------------------------------------------


def test_a_header_session_is_taken_as_sent(gate: web.SessionGate, engine: StateEngine) -> None:
    # (and the answer says it varies with it: fails if a cache could serve one tab's
    # answer to another)
    """The tab's id is used as is (the event checks it), on a page load too: no cookie
    session is opened for a request statekit.js sent."""
    visit = gate.visit("POST", {"X-Statekit-Session": "tab"}, cookies={"statekit_session": "c"})
    assert visit.session() == "tab"
    assert asyncio.run(visit.asession()) == "tab"
    # The answer depends on the tab's session: no cache may give it to another tab.
    assert visit.response_headers() == [("Vary", "X-Statekit-Session, X-Statekit-Browser")]
    assert not visit.wants_form
    assert engine.session_count() == 0


def test_a_form_field_session_is_used_when_no_header_names_one(gate: web.SessionGate) -> None:
    visit = gate.visit("POST", {})
    assert visit.wants_form
    visit.use_form({"statekit_session": "from-form"})
    assert (visit.session(), visit.incoming.source) == ("from-form", "field")
    headed = gate.visit("POST", {"X-Statekit-Session": "tab"})
    headed.use_form({"statekit_session": "from-form"})
    assert headed.session() == "tab"
    for bad in ({"statekit_session": ["a", "b"]}, {"statekit_session": ""}, {}, "not a form"):
        visit = gate.visit("POST", {})
        visit.use_form(bad)  # type: ignore[arg-type]
        with pytest.raises(SessionNotFound):
            visit.session()


def test_no_session_and_no_page_load_is_missing(
    gate: web.SessionGate, engine: StateEngine
) -> None:
    visit = gate.visit("POST", {})
    with pytest.raises(SessionNotFound, match="names no session") as caught:
        visit.session()
    with pytest.raises(SessionNotFound):
        asyncio.run(visit.asession())
    answer = visit.answer(caught.value)
    assert answer is not None
    assert answer.headers[web.ENDED_HEADER] == "missing"
    assert "Set-Cookie" not in answer.headers
    assert engine.session_count() == 0


def test_a_page_load_opens_a_cookie_session_once(
    gate: web.SessionGate, engine: StateEngine
) -> None:
    visit = gate.visit("GET", PAGE_LOAD)
    sid = visit.session()
    assert visit.session() == sid  # once per request
    assert engine.exists(sid)
    [(name, cookie), cache] = visit.response_headers()
    assert name == "Set-Cookie"
    assert cache == ("Cache-Control", "private, no-store")  # no shared cache keeps it
    assert cookie.startswith(f"statekit_session={sid};")
    assert "HttpOnly" in cookie
    assert "Secure" not in cookie
    assert "Path=/" in cookie
    kept = gate.visit("GET", PAGE_LOAD, cookies={"statekit_session": sid})
    assert kept.session() == sid
    # The same session: no new cookie; the answer varies with the cookie.
    assert kept.response_headers() == [("Vary", "Cookie")]
    assert engine.session_count() == 1


def test_an_ended_cookie_session_is_reopened_on_a_page_load_only(
    gate: web.SessionGate, engine: StateEngine, clock: FakeClock
) -> None:
    old = engine.open_session()
    clock.advance(61)
    action = gate.visit("POST", {}, cookies={"statekit_session": old})
    assert action.session() == old  # not a page load: the event will say it ended
    load = gate.visit("GET", PAGE_LOAD, cookies={"statekit_session": old})
    new = asyncio.run(load.asession())
    assert new != old
    assert engine.exists(new)
    assert "Set-Cookie" in dict(load.response_headers())


def test_an_ended_cookie_session_answer_clears_the_cookie(
    gate: web.SessionGate, engine: StateEngine, clock: FakeClock
) -> None:
    old = engine.open_session()
    clock.advance(61)
    # Over HTTPS the cookie is __Host- prefixed: a sibling subdomain cannot plant one.
    tossed = gate.visit("POST", {}, cookies={"statekit_session": old}, secure=True)
    assert tossed.incoming.sid is None
    visit = gate.visit("POST", {}, cookies={"__Host-statekit_session": old}, secure=True)
    with pytest.raises(SessionExpired) as caught, visit.event():
        pass  # pragma: no cover
    answer = visit.answer(caught.value)
    assert answer is not None
    assert answer.headers[web.ENDED_HEADER] == "idle"
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith("__Host-statekit_session=")
    assert "Max-Age=0" in cookie
    assert "Secure" in cookie
    tab = gate.visit("POST", {"X-Statekit-Session": old})
    tab_answer = tab.answer(caught.value)
    assert tab_answer is not None
    assert "Set-Cookie" not in tab_answer.headers  # a tab's session has no cookie


def test_without_the_fallback_no_cookie_is_read_or_opened(engine: StateEngine) -> None:
    gate = web.SessionGate(engine, cookie=False)
    live = engine.open_session()
    visit = gate.visit("GET", PAGE_LOAD, cookies={"statekit_session": live})
    with pytest.raises(SessionNotFound):
        visit.session()
    assert engine.session_count() == 1


def test_a_cookie_of_another_name(engine: StateEngine) -> None:
    gate = web.SessionGate(engine, cookie_name="sid")
    live = engine.open_session()
    assert gate.visit("POST", {}, cookies={"sid": live}).session() == live
    opened = gate.visit("GET", PAGE_LOAD)
    opened.session()
    assert opened.response_headers()[0][1].startswith("sid=")


def test_events_carry_the_pages_tokens_in_and_the_new_ones_out(
    gate: web.SessionGate, engine: StateEngine
) -> None:
    name = engine.browser_state("name", "", keys=BrowserKeys(["k" * 32]), storage_key="login")
    cart: SessionState[list[str]] = engine.session_state("cart", [])
    sid = engine.open_session()
    visit = gate.visit("POST", {"X-Statekit-Session": sid})
    with visit.event() as ev:
        ev[name] = "ann"
        ev[cart].append("milk")
    [(header, value), vary] = visit.response_headers()
    assert header == web.BROWSER_SET_HEADER
    assert vary == ("Vary", "X-Statekit-Session, X-Statekit-Browser")
    tokens = json.loads(value)
    later = gate.visit(
        "POST", {"X-Statekit-Session": sid, "X-Statekit-Browser": json.dumps(tokens)}
    )

    async def read() -> tuple[str, list[str]]:
        async with later.aevent() as ev:
            return ev[name], ev[cart]

    assert asyncio.run(read()) == ("ann", ["milk"])
    assert later.response_headers() == [
        ("Vary", "X-Statekit-Session, X-Statekit-Browser")
    ]  # no new tokens
    assert dict(later.tokens) == tokens


def test_a_closed_sessions_missing_object_is_answered_as_an_ended_session() -> None:
    # Fails if a registry object that went with its closed session were the host's
    # error (a 500), or if one never made (a bug of the host's) were hidden as a 409.
    closed = web.answer_for(SessionNotInitialized("counter", "a" * 32, closed=True))
    assert closed is not None
    assert closed.status == 409
    assert closed.headers[web.ENDED_HEADER] == "closed"
    assert json.loads(closed.body)["reason"] == "closed"
    assert web.answer_for(SessionNotInitialized("counter", "a" * 32)) is None


# -- another site's page ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        ({"Sec-Fetch-Site": "cross-site"}, True),
        ({"Sec-Fetch-Site": "same-site"}, True),  # a sibling subdomain's page
        ({"Sec-Fetch-Site": "same-origin"}, False),
        ({"Sec-Fetch-Site": "none"}, False),  # typed by the user
        ({"Sec-Fetch-Site": "Same-Origin", "Origin": "https://evil.example"}, False),
        ({"Origin": "https://evil.example", "Host": "shop.example"}, True),
        ({"Origin": "https://shop.example", "Host": "shop.example"}, False),
        ({"Origin": "http://shop.example:8000", "Host": "shop.example:8000"}, False),
        ({"Origin": "https://shop.example:8443", "Host": "shop.example"}, True),
        ({"Origin": "https://shop.example"}, True),  # no Host to match
        ({"Origin": "null", "Host": "shop.example"}, True),  # a sandboxed frame
        ({}, False),  # not a browser (curl, a test client)
    ],
    ids=repr,
)
def test_another_sites_page_cannot_open_or_close_a_session(
    gate: web.SessionGate, engine: StateEngine, headers: dict[str, str], refused: bool
) -> None:
    """A browser says which site's page sent a request (``Sec-Fetch-Site``, else
    ``Origin`` against ``Host``): another site's page may not open sessions (to fill the
    store and evict real tabs) nor close a tab's by its id. A gate that did not look
    would answer 200/204 and close the session here."""
    sid = engine.open_session()
    for serve in (gate.serve, lambda *a: asyncio.run(gate.aserve(*a))):
        opened = serve("POST", "/statekit/open", b"", headers)
        closed = serve("POST", "/statekit/close", sid.encode(), headers)
        assert opened is not None
        assert closed is not None
        if refused:
            assert (opened.status, closed.status) == (403, 403)
            assert body(opened)["error"] == "cross_site"
        else:
            assert (opened.status, closed.status) == (200, 204)
    assert engine.close_session(sid) is refused  # still open only if refused
    assert engine.session_count() == (1 if refused else 3)
    script = gate.serve("GET", "/statekit/statekit.js", b"", headers)
    assert script is not None
    assert script.status == 200  # a script may be loaded by any page


def test_allowed_origins_let_a_front_end_served_elsewhere_in(engine: StateEngine) -> None:
    """A front end on another origin is let in when listed (any case, a trailing slash
    ignored); any other origin is still refused."""
    gate = web.SessionGate(engine, allowed_origins=["https://APP.example.com/"])
    front = {"Origin": "https://app.example.com", "Sec-Fetch-Site": "same-site"}
    other = {"Origin": "https://blog.example.com", "Sec-Fetch-Site": "same-site"}
    allowed = gate.serve("POST", "/statekit/open", b"", front)
    assert allowed is not None
    assert allowed.status == 200
    assert gate.serve("POST", "/statekit/open", b"", other).status == 403  # type: ignore[union-attr]
    assert not gate.cross_site(front)
    assert web.is_cross_site(front)  # without the gate's list
    with pytest.raises(TypeError, match="allowed_origins"):
        web.SessionGate(engine, allowed_origins="https://app.example.com")


def test_a_form_another_site_posts_cannot_name_the_session(gate: web.SessionGate) -> None:
    """Another site's form naming a tab's session (learned somehow) is not run in it:
    its field is ignored, and a form loader is not even called."""
    cross = {"Sec-Fetch-Site": "cross-site"}
    visit = gate.visit("POST", cross)
    assert visit.cross_site
    visit.use_form({web.SESSION_FIELD: "tab"})
    with pytest.raises(SessionNotFound):
        visit.session()
    calls: list[str] = []
    lazy = gate.visit("POST", cross, form=lambda: calls.append("read") or {})  # type: ignore[func-returns-value]
    with pytest.raises(SessionNotFound):
        lazy.session()
    assert calls == []


def test_a_close_the_store_cannot_take_is_204_and_logged(
    gate: web.SessionGate,
    engine: StateEngine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A close beacon cannot act on an answer: with the store down, the close is still
    ``204`` (not a 500 in the server's log for every tab closed) and a warning says the
    close was not recorded."""

    def down(sid: str) -> bool:
        raise StoreUnavailable("redis", "connection refused")

    async def adown(sid: str) -> bool:
        raise StoreUnavailable("redis", "connection refused")

    monkeypatch.setattr(engine, "close_session", down)
    monkeypatch.setattr(engine, "aclose_session", adown)
    sid = "s" * 32
    sync = gate.serve("POST", "/statekit/close", sid.encode())
    asynchronous = asyncio.run(gate.aserve("POST", "/statekit/close", sid.encode()))
    assert sync is not None
    assert asynchronous is not None
    assert (sync.status, asynchronous.status) == (204, 204)
    warnings = [r for r in caplog.records if "close was not recorded" in r.getMessage()]
    assert len(warnings) == 2
    assert all(r.levelname == "WARNING" for r in warnings)


def test_the_script_is_answered_304_to_a_browser_that_has_it(gate: web.SessionGate) -> None:
    """The script carries an ETag; a browser that sends it back (alone or in a list) is
    told its copy is current, without the bytes; another tag gets the script."""
    first = gate.serve("GET", "/statekit/statekit.js")
    assert first is not None
    etag = first.headers["ETag"]
    assert first.headers["Cache-Control"] == "no-cache"  # revalidated on every load
    for sent in (etag, f'"old", {etag}'):
        again = asyncio.run(
            gate.aserve("GET", "/statekit/statekit.js", b"", {"If-None-Match": sent})
        )
        assert again is not None
        assert (again.status, again.body, again.headers["ETag"]) == (304, b"", etag)
    other = gate.serve("GET", "/statekit/statekit.js", b"", {"if-none-match": '"old"'})
    assert other is not None
    assert (other.status, other.body) == (200, web.script())


# -- the form, read only when asked for -------------------------------------------------


def test_a_form_loader_is_called_only_when_the_session_is_asked_for(
    gate: web.SessionGate,
) -> None:
    """A handler that never asks for its session keeps its body unread: the loader is
    called on the first ``session()``, once."""
    calls: list[str] = []

    def load() -> dict[str, str]:
        calls.append("read")
        return {web.SESSION_FIELD: "from-form"}

    visit = gate.visit("POST", {}, form=load)
    assert calls == []
    assert visit.wants_form
    assert (visit.session(), visit.incoming.source) == ("from-form", "field")
    assert visit.session() == "from-form"
    assert calls == ["read"]
    given = gate.visit("POST", {}, form={web.SESSION_FIELD: "mapped"})  # a mapping too
    assert given.session() == "mapped"


def test_an_async_form_loader_is_awaited_by_asession(gate: web.SessionGate) -> None:
    calls: list[str] = []

    async def load() -> dict[str, str]:
        calls.append("read")
        return {web.SESSION_FIELD: "from-form"}

    visit = gate.visit("POST", {}, form=load)
    assert calls == []
    assert asyncio.run(visit.asession()) == "from-form"
    assert calls == ["read"]
    nothing = gate.visit("POST", {}, form=lambda: None)
    with pytest.raises(SessionNotFound):
        asyncio.run(nothing.asession())


def test_an_async_form_loader_in_blocking_code_is_a_usage_error(gate: web.SessionGate) -> None:
    """``session()`` cannot await: it says to use ``asession()``, and the loader's
    coroutine is closed (no "never awaited" warning, an error under pytest here)."""

    async def load() -> dict[str, str]:
        return {web.SESSION_FIELD: "from-form"}  # pragma: no cover

    visit = gate.visit("POST", {}, form=load)
    with pytest.raises(UsageError, match="asession"):
        visit.session()


def test_a_form_loader_is_never_called_when_a_header_names_the_session(
    gate: web.SessionGate,
) -> None:
    def load() -> dict[str, str]:
        raise AssertionError("the form was read")

    async def aload() -> dict[str, str]:
        raise AssertionError("the form was read")

    assert gate.visit("POST", {"X-Statekit-Session": "tab"}, form=load).session() == "tab"
    tab = gate.visit("POST", {"X-Statekit-Session": "tab"}, form=aload)
    assert tab.session() == "tab"  # no UsageError either: nothing to await
    assert asyncio.run(tab.asession()) == "tab"


# -- a websocket's query ----------------------------------------------------------------


def test_the_query_names_the_session_only_when_given(gate: web.SessionGate) -> None:
    """A websocket handshake names its session in the ``statekit_session`` query
    parameter, which an integration passes for websockets only; a header still wins,
    and the query wins over the cookie."""
    query = {web.SESSION_QUERY: "q"}
    ws = gate.visit("GET", {}, query=query, cookies={web.SESSION_COOKIE: "c"})
    assert (ws.incoming.sid, ws.incoming.source) == ("q", "query")
    assert not ws.wants_form
    assert gate.visit("GET", {"X-Statekit-Session": "h"}, query=query).incoming.sid == "h"
    assert gate.visit("GET", {}).incoming.sid is None  # no query given: none read
    for bad in ({web.SESSION_QUERY: ["q"]}, {web.SESSION_QUERY: ""}, "statekit_session=q"):
        assert gate.visit("GET", {}, query=bad).incoming.sid is None  # type: ignore[arg-type]


# -- the fallback cookie over HTTPS -----------------------------------------------------


def test_over_https_the_fallback_cookie_is_host_prefixed(
    gate: web.SessionGate, engine: StateEngine
) -> None:
    """Over HTTPS the cookie is ``__Host-statekit_session``: Secure, Path=/, no Domain,
    so a sibling subdomain cannot set it (and plant its session in this site's
    pages)."""
    assert gate.cookie_name_for(True) == "__Host-statekit_session"
    assert gate.cookie_name_for(False) == "statekit_session"
    visit = gate.visit("GET", PAGE_LOAD, secure=True)
    sid = visit.session()
    cookie = dict(visit.response_headers())["Set-Cookie"]
    assert cookie.startswith(f"__Host-statekit_session={sid};")
    assert "Secure" in cookie
    assert "Path=/" in cookie
    assert "Domain" not in cookie
    kept = gate.visit("GET", PAGE_LOAD, cookies={"__Host-statekit_session": sid}, secure=True)
    assert kept.session() == sid
    assert kept.response_headers() == [("Vary", "Cookie")]
    plain = gate.visit("GET", PAGE_LOAD, cookies={"statekit_session": sid}, secure=True)
    assert plain.session() != sid  # an unprefixed cookie is not read over HTTPS
    assert engine.session_count() == 2


# -- errors about another session -------------------------------------------------------


def test_a_visit_answers_only_errors_about_its_own_session(
    gate: web.SessionGate, engine: StateEngine
) -> None:
    """A handler that looks up another session (an admin page, a shared cart) and
    finds it ended gets its own error to handle: telling this page that *its* session
    ended (409) would make statekit.js reload a tab whose session is fine."""
    sid, other = "a" * 32, "b" * 32
    visit = gate.visit("POST", {"X-Statekit-Session": sid})
    for exc in (
        SessionNotFound(other),
        SessionExpired(other, "idle"),
        SessionNotInitialized("cart", other, closed=True),
    ):
        assert visit.answer(exc) is None, exc
    for exc in (
        SessionNotFound(sid),
        SessionExpired(sid, "idle"),
        SessionNotInitialized("cart", sid, closed=True),
        SessionNotFound(None, "no session"),
    ):
        answer = visit.answer(exc)
        assert answer is not None, exc
        assert answer.status == 409
    down = visit.answer(StoreUnavailable("redis", "refused"))
    assert down is not None
    assert down.status == 503  # the store is everyone's


_REQUEST = {
    "Host": "shop.example.com",
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0.0.0",
    "Accept": "text/html,*/*",
    "Accept-Language": "en-US,en;q=0.9",
    "Origin": "https://evil.example",
    "Sec-Fetch-Site": "cross-site",
    "X-Statekit-Browser": '{"k": "t"}',
    "Cookie": "theme=dark; statekit_session=from-cookie",
}


def _django_headers(headers: dict[str, str]) -> Any:
    from django.http.request import HttpHeaders  # (made without Django's settings)

    return HttpHeaders({"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()})


def _werkzeug_headers(headers: dict[str, str]) -> Any:
    from werkzeug.datastructures import EnvironHeaders

    return EnvironHeaders({"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()})


@pytest.mark.parametrize("kind", ["dict", "django", "werkzeug"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_visit_headers_read_what_a_visit_reads_from_any_mapping(
    engine: StateEngine, kind: str, method: str
) -> None:
    """``web.visit_headers`` (and the gate, given any mapping) keep the seven headers a
    visit reads: the visit is the one made from every header lower-cased. Fails if a
    name is missed in one of the ways (a title-case dict read in one pass; Django's
    and Werkzeug's case-insensitive headers looked up), so that a cross-site page, a
    page load, a cookie session or the tokens went unseen."""
    gate = web.SessionGate(engine)
    cookies = {"theme": "dark", "statekit_session": "from-cookie"}
    expected = gate.visit(method, {k.lower(): v for k, v in _REQUEST.items()}, cookies=cookies)
    assert expected.cross_site
    assert expected.incoming.source == "cookie"
    make: dict[str, Callable[[dict[str, str]], Any]] = {
        "dict": dict,
        "django": _django_headers,
        "werkzeug": _werkzeug_headers,
    }
    source = make[kind](_REQUEST)
    headers = web.visit_headers(source, any_case=kind != "dict")
    assert set(headers) == {
        "host",
        "accept",
        "origin",
        "sec-fetch-site",
        "x-statekit-browser",
        "cookie",
    }
    for given in (headers, source) if kind == "dict" else (headers,):
        got = gate.visit(method, given, cookies=cookies)
        assert (got.incoming, got.page_load, got.cross_site, got.tokens) == (
            expected.incoming,
            expected.page_load,
            expected.cross_site,
            expected.tokens,
        )
