"""The Flask extension through Flask's own test client, and the Flask example under
gunicorn with two workers on Redis.

A test client with its cookie jar is one browser; a session id sent in the
``X-Statekit-Session`` header is one tab (as statekit.js sends it).
"""

from __future__ import annotations

import gc
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, request
from flask.testing import FlaskClient

from statekit import BrowserKeys, DeleteReason, StateEngine
from statekit.exceptions import SessionBusy, StoreUnavailable
from statekit.integrations.flask import StateKit, visit
from statekit.testing import FakeClock, RedisServer
from statekit.web import script

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
sys.path.insert(0, str(EXAMPLES))

from shop import ITEMS, PAGE, Shop  # noqa: E402

SECRET = "flask-test-secret-" + "x" * 24
#: Bounds every wait on a server process.
WAIT = 30.0


def open_tab(client: FlaskClient) -> str:
    """A tab's session, as statekit.js opens it."""
    answer = client.post("/statekit/open")
    assert answer.status_code == 200
    sid = answer.get_json()["sid"]
    assert isinstance(sid, str)
    return sid


def tab(sid: str, tokens: dict[str, str] | None = None) -> dict[str, str]:
    """The headers statekit.js sends for a tab."""
    headers = {"X-Statekit-Session": sid}
    if tokens:
        headers["X-Statekit-Browser"] = json.dumps(tokens)
    return headers


@pytest.fixture
def shop(clock: FakeClock) -> Iterator[Shop]:
    made = Shop(StateEngine(clock=clock, idle_ttl=60, closed_ttl=30), keys=BrowserKeys([SECRET]))
    yield made
    made.engine.shutdown()


def make_app(shop: Shop, **options: Any) -> Flask:
    """The shop's handlers, plus a page without JavaScript, a form and errors."""
    app = Flask("statekit_test")
    StateKit(app, shop.engine, **options)
    loads = shop.engine.session_state("loads", 0)

    @app.errorhandler(ValueError)
    def bad_value(exc: ValueError) -> tuple[dict[str, str], int]:
        return {"detail": str(exc)}, 400

    @app.post("/api/cart")
    def add() -> dict[str, Any]:
        with visit().event() as ev:
            return shop.add(ev, (request.get_json(silent=True) or {}).get("item"))

    @app.post("/api/login")
    def login() -> dict[str, Any]:
        with visit().event() as ev:
            return shop.login(ev, (request.get_json(silent=True) or {}).get("username"))

    @app.route("/api/show", methods=["GET", "POST"])
    def show() -> dict[str, Any]:
        with visit().event() as ev:
            return shop.show(ev)

    @app.get("/page")
    def page() -> str:  # a page that works without JavaScript: the cookie fallback
        with visit().event() as ev:
            ev[loads] += 1
            return f"<p>load {ev[loads]}, cart {ev[shop.cart]}</p>"

    @app.post("/form")
    def form() -> dict[str, Any]:
        with visit().event() as ev:
            return shop.add(ev, request.form.get("item"))

    @app.get("/raise/<kind>")
    def fail(kind: str) -> str:
        if kind == "busy":
            raise SessionBusy("b" * 32, 2.0)
        if kind == "unavailable":
            raise StoreUnavailable("redis at 127.0.0.1:1", "connection refused")
        raise LookupError("the host's own error")

    return app


@pytest.fixture
def app(shop: Shop) -> Flask:
    return make_app(shop)


def test_the_endpoints_open_close_and_serve_the_script(shop: Shop, app: Flask) -> None:
    """statekit.js needs ``open`` (a new session per tab), ``close`` (the beacon) and
    the script itself at the prefix. Fails if the blueprint is missing, answers the
    wrong method with an HTML page, or a beacon for an unknown id is an error."""
    closed: list[tuple[str, DeleteReason]] = []
    shop.engine.on_close(lambda sid, reason: closed.append((sid, reason)))
    client = app.test_client()

    answer = client.post("/statekit/open")
    assert answer.status_code == 200
    assert answer.headers["Cache-Control"] == "no-store"
    sid = answer.get_json()["sid"]
    assert shop.engine.exists(sid)

    js = client.get("/statekit/statekit.js")
    assert js.status_code == 200
    assert js.headers["Content-Type"].startswith("text/javascript")
    assert js.data == script()

    wrong = client.get("/statekit/open")
    assert (wrong.status_code, wrong.headers["Allow"]) == (405, "POST")
    assert wrong.get_json()["error"] == "method_not_allowed"

    assert client.post("/statekit/close", data=sid).status_code == 204
    assert closed == [(sid, DeleteReason.CLOSED)]
    assert client.post("/statekit/close", data="never-issued").status_code == 204
    assert closed == [(sid, DeleteReason.CLOSED)]


def test_a_prefix_of_ones_own(shop: Shop) -> None:
    """The endpoints move with ``prefix``; the default path is then the app's own."""
    client = make_app(shop, prefix="/state").test_client()
    assert client.post("/state/open").status_code == 200
    assert client.post("/statekit/open").status_code == 404


def test_two_tabs_have_independent_carts(app: Flask) -> None:
    """Two tabs of one browser (one test client, one cookie jar) each have a cart of
    their own: fails if the integration fell back to one session per browser."""
    client = app.test_client()
    one, two = open_tab(client), open_tab(client)
    assert one != two
    client.post("/api/cart", json={"item": "Milk"}, headers=tab(one))
    client.post("/api/cart", json={"item": "Water"}, headers=tab(one))
    client.post("/api/cart", json={"item": "Cereal"}, headers=tab(two))
    assert client.post("/api/show", headers=tab(one)).get_json()["cart"] == ["Milk", "Water"]
    shown = client.post("/api/show", headers=tab(two)).get_json()
    assert (shown["cart"], shown["cart_size"]) == (["Cereal"], 1)


def test_closing_a_tab_ends_only_its_own_session(shop: Shop, app: Flask, clock: FakeClock) -> None:
    """The close beacon names the tab's own id: the other tab's next action succeeds,
    and once the closed session's grace is over, its id is answered 409 with the
    reason, which the page shows."""
    closed: list[str] = []
    shop.engine.on_close(lambda sid, reason: closed.append(sid))
    client = app.test_client()
    one, two = open_tab(client), open_tab(client)
    client.post("/api/cart", json={"item": "Milk"}, headers=tab(one))
    assert client.post("/statekit/close", data=one).status_code == 204
    assert closed == [one]

    answer = client.post("/api/cart", json={"item": "Water"}, headers=tab(two))
    assert (answer.status_code, answer.get_json()["cart"]) == (200, ["Water"])

    clock.advance(31)
    shop.engine.reap()
    ended = client.post("/api/cart", json={"item": "Milk"}, headers=tab(one))
    assert ended.status_code == 409
    assert ended.headers["X-Statekit-Session-Ended"] == "closed"
    assert ended.get_json()["reason"] == "closed"
    assert client.post("/api/show", headers=tab(two)).status_code == 200


def test_an_idle_unknown_or_missing_session_is_409_with_its_reason(
    app: Flask, clock: FakeClock
) -> None:
    """Every way a request can lack a live session reads as 409 with a reason the page
    acts on (reopen or reload), never as a 500."""
    client = app.test_client()
    sid = open_tab(client)
    clock.advance(61)
    idle = client.post("/api/show", headers=tab(sid))
    assert (idle.status_code, idle.headers["X-Statekit-Session-Ended"]) == (409, "idle")

    unknown = client.post("/api/show", headers=tab("x" * 32))
    assert (unknown.status_code, unknown.get_json()["reason"]) == (409, "unknown")
    assert "x" * 32 not in unknown.get_data(as_text=True)  # ids are secrets

    missing = client.post("/api/show")  # not a page load: no session is opened for it
    assert (missing.status_code, missing.headers["X-Statekit-Session-Ended"]) == (409, "missing")
    assert "Set-Cookie" not in missing.headers


def test_browser_tokens_go_out_and_come_back_in(app: Flask) -> None:
    """A sign-in in one tab comes back as a token in ``X-Statekit-Browser-Set``; another
    tab of the browser that sends it (statekit.js keeps it in localStorage) sees the
    user. Fails if tokens are not passed to the event or not sent back."""
    client = app.test_client()
    one, two = open_tab(client), open_tab(client)
    signed = client.post("/api/login", json={"username": "ann"}, headers=tab(one))
    assert signed.status_code == 200
    tokens = json.loads(signed.headers["X-Statekit-Browser-Set"])
    assert set(tokens) == {"login"}

    seen = client.post("/api/show", headers=tab(two, tokens)).get_json()
    assert seen["user"] == "ann"
    assert client.post("/api/show", headers=tab(two)).get_json()["user"] == ""
    assert "X-Statekit-Browser-Set" not in client.post("/api/show", headers=tab(two)).headers


def test_a_page_without_javascript_gets_one_session_per_browser(
    shop: Shop, app: Flask, clock: FakeClock
) -> None:
    """The cookie fallback: a page load that names no session opens one kept in a
    cookie, which every later request of that browser shares (every tab: one session
    per browser); another browser gets its own. An ended cookie session is answered 409
    with the cookie cleared, and the next page load opens a new one."""
    html = {"Accept": "text/html"}
    browser = app.test_client()
    first = browser.get("/page", headers=html)
    assert first.get_data(as_text=True) == "<p>load 1, cart []</p>"
    cookie = first.headers["Set-Cookie"]
    assert cookie.startswith("statekit_session=")
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie

    again = browser.get("/page", headers=html)  # a reload, or a second tab: same session
    assert again.get_data(as_text=True) == "<p>load 2, cart []</p>"
    assert "Set-Cookie" not in again.headers
    assert browser.post("/api/cart", json={"item": "Milk"}).status_code == 200  # cookie

    other = app.test_client()
    assert other.get("/page", headers=html).get_data(as_text=True) == "<p>load 1, cart []</p>"
    assert browser.get("/page", headers=html).get_data(as_text=True) == (
        "<p>load 3, cart ['Milk']</p>"
    )

    clock.advance(61)  # the browser's session ends
    shop.engine.reap()
    ended = browser.post("/api/show")
    assert ended.status_code == 409
    assert "Max-Age=0" in ended.headers["Set-Cookie"]
    renewed = browser.get("/page", headers=html)
    assert renewed.get_data(as_text=True) == "<p>load 1, cart []</p>"
    assert renewed.headers["Set-Cookie"] != cookie


def test_without_the_cookie_a_page_load_opens_nothing(shop: Shop) -> None:
    """``cookie=False``: pages must open their session with statekit.js."""
    client = make_app(shop, cookie=False).test_client()
    answer = client.get("/page", headers={"Accept": "text/html"})
    assert (answer.status_code, answer.headers["X-Statekit-Session-Ended"]) == (409, "missing")
    assert "Set-Cookie" not in answer.headers
    assert shop.engine.session_count() == 0


def test_a_form_names_its_session_in_a_field(app: Flask) -> None:
    """A plain form sends the tab's id in the ``statekit_session`` field (statekit.js
    fills it); a header, when there is one, wins."""
    client = app.test_client()
    one, two = open_tab(client), open_tab(client)
    posted = client.post("/form", data={"statekit_session": one, "item": "Milk"})
    assert (posted.status_code, posted.get_json()["cart"]) == (200, ["Milk"])
    both = client.post("/form", data={"statekit_session": one, "item": "Water"}, headers=tab(two))
    assert both.get_json()["cart"] == ["Water"]
    assert client.post("/api/show", headers=tab(one)).get_json()["cart"] == ["Milk"]


def test_statekit_errors_are_answered_and_others_left_to_the_app(app: Flask) -> None:
    """A busy session or an unavailable store is 503 with Retry-After (retry later);
    the app's own error handlers and errors are untouched."""
    client = app.test_client()
    busy = client.get("/raise/busy")
    assert (busy.status_code, busy.headers["Retry-After"]) == (503, "1")
    assert busy.get_json()["error"] == "busy"
    down = client.get("/raise/unavailable")
    assert (down.status_code, down.get_json()["error"]) == (503, "unavailable")
    bad = client.post("/api/cart", json={"item": "Beer"}, headers=tab(open_tab(client)))
    assert bad.status_code == 400
    assert bad.get_json()["detail"].startswith("unknown item 'Beer'")
    app.testing = False  # an error of the app's own is still the app's 500
    assert client.get("/raise/other").status_code == 500


def test_open_and_close_refuse_another_sites_page(shop: Shop) -> None:
    """Another site's page cannot open a session in the visitor's browser, close one,
    or choose one with a form field: ``open`` and ``close`` answer it ``403``, and its
    form's field is ignored. The app's own pages (and clients that are no browser)
    are served; ``allowed_origins`` lets in a front end served elsewhere. Fails if the
    extension does not pass the request's headers to the gate."""
    closed: list[str] = []
    shop.engine.on_close(lambda sid, reason: closed.append(sid))
    client = make_app(shop).test_client()
    sid = open_tab(client)
    other_site = {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}
    assert client.post("/statekit/open", headers=other_site).status_code == 403
    assert (
        client.post("/statekit/open", headers={"Origin": "https://evil.example"}).status_code
        == 403
    )
    refused = client.post("/statekit/close", data=sid, headers=other_site)
    assert (refused.status_code, refused.get_json()["error"]) == (403, "cross_site")
    assert closed == []
    form = client.post("/form", data={"statekit_session": sid, "item": "Milk"}, headers=other_site)
    assert (form.status_code, form.headers["X-Statekit-Session-Ended"]) == (409, "missing")
    assert client.post("/api/show", headers=tab(sid)).get_json()["cart"] == []
    own = {"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"}
    assert client.post("/statekit/close", data=sid, headers=own).status_code == 204
    assert closed == [sid]

    front = {"Sec-Fetch-Site": "same-site", "Origin": "https://app.example.com"}
    elsewhere = Flask("front_end_elsewhere")
    StateKit(elsewhere, shop.engine, allowed_origins=["https://app.example.com"])
    allowed = elsewhere.test_client()
    assert allowed.post("/statekit/open", headers=front).status_code == 200
    assert allowed.post("/statekit/open", headers=other_site).status_code == 403


def test_the_script_is_answered_304_to_a_browser_that_has_it(app: Flask) -> None:
    """A page load revalidates the script (``no-cache``): the browser's copy is
    answered ``304`` by its ETag. Fails if the request's headers are not passed."""
    client = app.test_client()
    first = client.get("/statekit/statekit.js")
    etag = first.headers["ETag"]
    again = client.get("/statekit/statekit.js", headers={"If-None-Match": etag})
    assert (again.status_code, again.data, again.headers["ETag"]) == (304, b"", etag)
    assert client.get("/statekit/statekit.js", headers={"If-None-Match": '"old"'}).data == script()


def test_over_https_the_cookie_is_host_prefixed_and_its_response_private(shop: Shop) -> None:
    """Over HTTPS the fallback cookie is ``__Host-statekit_session`` (``Secure``,
    ``Path=/``: a sibling subdomain cannot plant one) and a plain ``statekit_session``
    cookie is not read; the response that sets it is ``Cache-Control: private,
    no-store`` in one header (replacing a view's own, which would let a shared cache
    hand the cookie to others), next to the view's own cookies."""
    app = make_app(shop)

    @app.get("/cached")
    def cached() -> Response:
        with visit().event() as ev:
            response = Response(f"cart {ev[shop.cart]}")
        response.headers["Cache-Control"] = "public, max-age=600"
        response.set_cookie("theme", "dark")
        return response

    browser = app.test_client()
    planted = shop.engine.open_session()
    browser.set_cookie("statekit_session", planted)
    first = browser.get("https://localhost/cached", headers={"Accept": "text/html"})
    assert first.status_code == 200
    assert first.headers.getlist("Cache-Control") == ["private, no-store"]
    cookies = first.headers.getlist("Set-Cookie")
    assert len(cookies) == 2
    assert any(c.startswith("theme=dark") for c in cookies)
    [ours] = [c for c in cookies if c.startswith("__Host-statekit_session=")]
    assert ("; Secure" in ours, "; Path=/" in ours, "Domain" in ours) == (True, True, False)
    sid = ours.split(";")[0].split("=", 1)[1]
    assert sid != planted  # the plain cookie was not taken over HTTPS
    again = browser.get("https://localhost/cached", headers={"Accept": "text/html"})
    assert again.headers.getlist("Cache-Control") == ["public, max-age=600"]  # set nothing
    assert not any("statekit" in c for c in again.headers.getlist("Set-Cookie"))
    assert shop.engine.session_count() == 2  # the planted one and the browser's


def test_the_form_is_read_only_when_the_session_is_asked_for(shop: Shop) -> None:
    """A view that reads the raw body (a webhook checking a signature over it) keeps
    it, also when it has made the visit first; asking for the session afterwards still
    reads the form's field. Fails if the visit parses the form when it is made (the
    body is then gone: ``get_data()`` is empty)."""
    app = make_app(shop)

    @app.post("/hook")
    def hook() -> dict[str, Any]:
        made = visit()  # a before_request function may well have made it
        raw = request.get_data()
        with made.event() as ev:
            ev[shop.cart].append("Water")
            return {"raw": len(raw), "cart": ev[shop.cart]}

    @app.post("/raw")
    def raw() -> dict[str, Any]:
        visit()
        return {"raw": len(request.get_data())}

    client = app.test_client()
    sid = open_tab(client)
    fields = {"statekit_session": sid, "note": "x" * 100}
    sent = client.post("/hook", data=fields, content_type="multipart/form-data")
    assert sent.status_code == 200
    assert sent.get_json()["raw"] > 100
    assert sent.get_json()["cart"] == ["Water"]
    only_raw = client.post("/raw", data={"note": "y" * 300})  # urlencoded, no session
    assert only_raw.get_json() == {"raw": len("note=" + "y" * 300)}


def test_an_error_about_another_session_is_the_apps_own(shop: Shop) -> None:
    """A view that looks up some other session (an admin page, say) and finds it gone
    gets the app's own handler for it (here ``KeyError`` → 404), not a 409 telling the
    page that *its* session ended. Fails if the extension answers every
    ``SessionNotFound``."""
    app = make_app(shop)

    @app.errorhandler(KeyError)
    def not_found(exc: KeyError) -> tuple[dict[str, str], int]:
        return {"detail": "no such thing"}, 404

    @app.get("/other/<sid>")
    def other(sid: str) -> dict[str, Any]:
        visit().session()
        with shop.engine.event(sid) as ev:
            return {"cart": ev[shop.cart]}

    client = app.test_client()
    mine = open_tab(client)
    answer = client.get("/other/" + "z" * 32, headers=tab(mine))
    assert (answer.status_code, answer.get_json()) == (404, {"detail": "no such thing"})
    assert "X-Statekit-Session-Ended" not in answer.headers
    bare = Flask("no_handler_of_its_own")
    StateKit(bare, shop.engine)

    @bare.get("/other/<sid>")
    def other_bare(sid: str) -> dict[str, Any]:
        with shop.engine.event(sid) as ev:
            return {"cart": ev[shop.cart]}

    bare.testing = False  # no handler of the app's: Flask's own 500
    bare_client = bare.test_client()
    assert (
        bare_client.get("/other/" + "z" * 32, headers=tab(open_tab(bare_client))).status_code
        == 500
    )
    ended = client.get("/other/" + "q" * 32, headers=tab("q" * 32))  # its own: 409
    assert (ended.status_code, ended.headers["X-Statekit-Session-Ended"]) == (409, "unknown")


def test_a_blueprints_own_handler_does_not_hide_an_ended_session(shop: Shop) -> None:
    """Flask tries a blueprint's error handlers before the app's, for any of an
    error's classes: an API blueprint answering every ``Exception`` itself would tell
    the page nothing of its ended session. Fails if statekit's answer comes from an app
    error handler only (the blueprint's 500 wins then)."""
    from flask import Blueprint

    app = make_app(shop)
    api = Blueprint("api", __name__, url_prefix="/bp")

    @api.errorhandler(Exception)
    def anything(exc: Exception) -> tuple[dict[str, str], int]:
        return {"detail": "the blueprint's"}, 500

    @api.post("/cart")
    def add() -> dict[str, Any]:
        with visit().event() as ev:
            return shop.add(ev, ITEMS[0])

    @api.get("/other/<sid>")
    def other(sid: str) -> dict[str, Any]:
        with shop.engine.event(sid) as ev:
            return {"cart": ev[shop.cart]}

    app.register_blueprint(api)
    client = app.test_client()
    sid = open_tab(client)
    assert client.post("/bp/cart", headers=tab(sid)).status_code == 200
    ended = client.post("/bp/cart", headers=tab("u" * 32))
    assert (ended.status_code, ended.headers["X-Statekit-Session-Ended"]) == (
        409,
        "unknown",
    )
    # Another session a view looked up: the blueprint's own handler, as without statekit.
    looked_up = client.get("/bp/other/" + "z" * 32, headers=tab(open_tab(client)))
    assert (looked_up.status_code, looked_up.get_json()) == (500, {"detail": "the blueprint's"})


def test_a_registry_object_of_a_closed_session_is_409_closed(shop: Shop) -> None:
    """An event in a closed session's grace that reads a registry finds its objects
    removed (``SessionNotInitialized``, closed): the page's session has ended. Fails if
    Flask answers it 500, as it did, while ASGI and Django answered 409."""
    app = make_app(shop)
    carts = shop.engine.registry("connections", lambda sid: object())

    @app.post("/api/connection")
    def connection() -> dict[str, Any]:
        with visit().event() as ev:
            ev[carts]
            return {}

    client = app.test_client()
    sid = open_tab(client)
    carts.open(sid)
    assert client.post("/api/connection", headers=tab(sid)).status_code == 200
    shop.engine.close_session(sid)
    ended = client.post("/api/connection", headers=tab(sid))
    assert (ended.status_code, ended.headers["X-Statekit-Session-Ended"]) == (409, "closed")


def test_options_on_statekits_endpoints_is_405_with_allow(app: Flask) -> None:
    """Fails if Flask answers OPTIONS itself (200, with every method in Allow)."""
    client = app.test_client()
    answer = client.options("/statekit/open")
    assert (answer.status_code, answer.headers["Allow"]) == (405, "POST")
    answer = client.options("/statekit/statekit.js")
    assert (answer.status_code, answer.headers["Allow"]) == (405, "GET, HEAD")


def test_misuse_is_refused_saying_what_to_do(shop: Shop) -> None:
    """visit() outside a request, or on an app without the extension; an extension
    without an engine, or twice on one app."""
    with pytest.raises(RuntimeError, match="while Flask handles a request"):
        visit()
    bare = Flask("bare")
    with bare.test_request_context("/"), pytest.raises(RuntimeError, match="has no statekit"):
        visit()
    with pytest.raises(TypeError, match="needs the app's engine"):
        StateKit(Flask("no_engine"))
    app = make_app(shop)
    with pytest.raises(RuntimeError, match="call init_app once"):
        StateKit(app, shop.engine)


def test_an_app_factory_uses_init_app(shop: Shop) -> None:
    kit = StateKit(engine=shop.engine)
    app = Flask("factory")
    gate = kit.init_app(app)
    assert app.extensions["statekit"] is gate
    assert repr(kit) == "StateKit(prefix='/statekit', cookie=True)"
    assert app.test_client().post("/statekit/open").status_code == 200


def test_the_extension_does_not_keep_an_engine_alive() -> None:
    """Shutdown at exit holds engines weakly: a test suite making an app per test does
    not keep every engine (and its store) until the process ends."""
    engine = StateEngine()
    app = Flask("short_lived")
    StateKit(app, engine)
    ref = weakref.ref(engine)
    del engine, app
    gc.collect()
    assert ref() is None


EXIT_SCRIPT = """
import sys
from flask import Flask
from statekit import StateEngine
from statekit.integrations.flask import StateKit, visit

engine = StateEngine()
note = engine.session_state("note", "", on_delete=lambda value, why: print("deleted", why.value))
app = Flask("exit")
StateKit(app, engine, shutdown=sys.argv[1] != "off")

@app.post("/note")
def write() -> str:
    with visit().event() as ev:
        ev[note] = "kept"
    return "ok"

client = app.test_client()
sid = client.post("/statekit/open").get_json()["sid"]
assert client.post("/note", headers={"X-Statekit-Session": sid}).status_code == 200
if sys.argv[1] == "early":
    engine.shutdown()
print("exiting")
"""


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("on", "exiting\ndeleted shutdown\n"),  # at exit, after the app's last words
        ("early", "deleted shutdown\nexiting\n"),  # shut down by the app: not again
        ("off", "exiting\n"),
    ],
)
def test_the_engine_is_shut_down_once_when_the_process_exits(mode: str, expected: str) -> None:
    """Flask has no shutdown of its own: the extension shuts the engine down at exit
    (a memory store's sessions then end, their callbacks run), once, and not at all
    when told not to."""
    out = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout == expected


# -- the example -------------------------------------------------------------------


@pytest.fixture(scope="module")
def example() -> Any:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STATEKIT_SECRETS", SECRET)
        import flask_shop

    return flask_shop


def test_the_example_serves_the_shop(example: Any) -> None:
    """The Flask example: the page, a visit counter shared by every tab, a cart per
    tab, sign-in kept by the browser, a bad value answered 400 with its detail."""
    client = example.app.test_client()
    page = client.get("/")
    assert page.get_data(as_text=True) == PAGE
    one, two = open_tab(client), open_tab(client)
    first = client.post("/api/visit", headers=tab(one)).get_json()["visits"]
    assert client.post("/api/visit", headers=tab(two)).get_json()["visits"] == first + 1

    assert client.post("/api/cart", json={"item": "Milk"}, headers=tab(one)).status_code == 200
    shown = client.post("/api/visit", headers=tab(one)).get_json()
    assert (shown["cart"], shown["cart_size"]) == (["Milk"], 1)
    assert client.post("/api/visit", headers=tab(two)).get_json()["cart"] == []

    bad = client.post("/api/cart", json={"item": "Beer"}, headers=tab(one))
    assert (bad.status_code, bad.get_json()["detail"][:12]) == (400, "unknown item")
    nobody = client.post("/api/login", json={"username": " "}, headers=tab(one))
    assert (nobody.status_code, nobody.get_json()) == (
        400,
        {"detail": "a username is 1 to 40 characters"},
    )
    signed = client.post("/api/login", json={"username": "ann"}, headers=tab(one))
    tokens = json.loads(signed.headers["X-Statekit-Browser-Set"])
    assert client.post("/api/visit", headers=tab(two, tokens)).get_json()["user"] == "ann"
    assert client.post("/api/cart", json={"item": "Milk"}).status_code == 409


def test_the_example_counts_no_visit_for_an_ended_session(example: Any) -> None:
    """A page whose session the server no longer has (ended and deleted, or lost in a
    restart) is answered 409 and is not counted as a visit. Fails if ``/api/visit``
    increments before its event checks the session."""
    client = example.app.test_client()
    before = client.post("/api/visit", headers=tab(open_tab(client))).get_json()["visits"]
    for _ in range(3):
        ended = client.post("/api/visit", headers=tab("e" * 32))
        assert (ended.status_code, ended.headers["X-Statekit-Session-Ended"]) == (409, "unknown")
    after = client.post("/api/visit", headers=tab(open_tab(client))).get_json()["visits"]
    assert after == before + 1


# -- under gunicorn, two workers, on Redis -------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(
    port: int,
    path: str,
    sid: str | None = None,
    body: object = None,
    extra: dict[str, str] | None = None,
) -> tuple[Any, str]:
    """POST to the server (with ``extra`` headers): (JSON answer, worker pid)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        headers = {"Content-Type": "application/json", **(extra or {})}
        if sid is not None:
            headers["X-Statekit-Session"] = sid
        connection.request("POST", path, json.dumps(body or {}), headers)
        answer = connection.getresponse()
        data = json.loads(answer.read())
        assert answer.status == 200, (path, answer.status, data)
        return data, answer.getheader("X-Worker") or ""
    finally:
        connection.close()


def wait_for_port(port: int, server: subprocess.Popen[bytes], errors: Path) -> None:
    """Wait (bounded) until the server listens; fail with its errors if it exited."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert server.poll() is None, errors.read_text()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)


def csrf_headers(port: int) -> dict[str, str]:
    """Django's CSRF cookie, from the page, and the header its script sends."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        connection.request("GET", "/", headers={"Accept": "text/html"})
        answer = connection.getresponse()
        answer.read()
        cookie = SimpleCookie(answer.getheader("Set-Cookie") or "")
        token = cookie["csrftoken"].value
        return {"Cookie": f"csrftoken={token}", "X-CSRFToken": token}
    finally:
        connection.close()


def run_shop_under_gunicorn(
    target: str, *, preload: bool, tmp_path: Path, csrf: bool = False
) -> None:
    """Serve an example with gunicorn ``-w 2`` on a private Redis; two clients at once,
    each with its own session, 200 cart adds and 200 visits each. Every total must be
    exact, and each client's requests must have been served by both workers (a
    session's state lives in Redis, not in a worker). With ``csrf``, the clients send
    Django's CSRF token, as the example's page does."""
    redis = RedisServer().start()
    port = free_port()
    errors = tmp_path / "gunicorn.err"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "STATEKIT_REDIS_URL": redis.url,
        "STATEKIT_SECRETS": SECRET,
        "STATEKIT_EXAMPLE_PID_HEADER": "1",
    }
    command = [sys.executable, "-m", "gunicorn", "--workers", "2", "--chdir", str(EXAMPLES)]
    command += ["--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5", "--no-control-socket"]
    command += ["--preload", target] if preload else [target]
    with errors.open("wb") as err:
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for_port(port, server, errors)

        actions = 200
        start = threading.Barrier(2, timeout=WAIT)
        results: dict[int, dict[str, Any]] = {}
        failures: list[BaseException] = []

        def client(number: int) -> None:
            try:
                sid = call(port, "/statekit/open")[0]["sid"]  # no token: before CSRF
                token = csrf_headers(port) if csrf else {}
                pids: set[str] = set()
                visits: list[int] = []
                start.wait()
                for i in range(actions):
                    item = {"item": ITEMS[(i + number) % 4]}
                    _, pid = call(port, "/api/cart", sid, item, token)
                    pids.add(pid)
                    data, pid = call(port, "/api/visit", sid, extra=token)
                    pids.add(pid)
                    visits.append(data["visits"])
                results[number] = {"sid": sid, "pids": pids, "visits": visits, "token": token}
            except BaseException as exc:
                failures.append(exc)

        began = time.monotonic()
        threads = [threading.Thread(target=client, args=(n,)) for n in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=4 * WAIT)
        assert not failures, failures
        assert all(not thread.is_alive() for thread in threads), "clients did not finish"
        assert time.monotonic() - began < 4 * WAIT

        for number, result in results.items():
            final, _ = call(port, "/api/visit", result["sid"], extra=result["token"])
            expected = [ITEMS[(i + number) % 4] for i in range(actions)]
            assert final["cart"] == expected  # every add kept, in order, in its own cart
            assert final["cart_size"] == actions  # the listener ran for each one
            assert len(result["pids"]) == 2, result["pids"]  # served by both workers
        every_visit = sorted(results[0]["visits"] + results[1]["visits"])
        assert every_visit == list(range(1, 2 * actions + 1))  # each increment once
        assert results[0]["pids"] == results[1]["pids"]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=WAIT)
        redis.stop()
    log = errors.read_text()
    assert "Traceback" not in log, log  # workers, and their shutdown at exit, were clean


@pytest.mark.parametrize("preload", [False, True], ids=["import-per-worker", "preload"])
def test_the_example_under_gunicorn_with_two_workers_on_redis(
    preload: bool, tmp_path: Path
) -> None:
    run_shop_under_gunicorn("flask_shop:app", preload=preload, tmp_path=tmp_path)
