"""The Django middleware through Django's own test client, and the Django example under
gunicorn with two workers on Redis.

Settings come from the example (``docs/examples/django_shop.py`` is a whole Django
project: importing it configures Django); each test overrides what it needs. A test
client with its cookie jar is one browser; a session id sent in the
``X-Statekit-Session`` header is one tab (as statekit.js sends it).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.test import Client, RequestFactory, override_settings
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from statekit import BrowserKeys, DeleteReason, StateEngine
from statekit.exceptions import SessionBusy, StoreUnavailable
from statekit.integrations.django import StateKitMiddleware, engine_from_settings, visit_of
from statekit.testing import FakeClock
from statekit.web import script

from .conftest import declared
from .test_integration_flask import (
    EXAMPLES,
    ROOT,
    SECRET,
    WAIT,
    free_port,
    run_shop_under_gunicorn,
    wait_for_port,
)

sys.path.insert(0, str(EXAMPLES))

with pytest.MonkeyPatch.context() as _env:
    _env.setenv("STATEKIT_SECRETS", SECRET)
    import django_shop  # configures Django: a project in one file

from shop import PAGE, Shop

MIDDLEWARE = "statekit.integrations.django.StateKitMiddleware"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
#: The shop of the running test (the views below serve it).
CURRENT: dict[str, Shop] = {}


def body(request: HttpRequest) -> dict[str, Any]:
    data = json.loads(request.body or b"{}")
    return data if isinstance(data, dict) else {}


def add(request: HttpRequest) -> JsonResponse:
    with visit_of(request).event() as ev:
        return JsonResponse(CURRENT["shop"].add(ev, body(request).get("item")))


def login(request: HttpRequest) -> JsonResponse:
    with visit_of(request).event() as ev:
        return JsonResponse(CURRENT["shop"].login(ev, body(request).get("username")))


def show(request: HttpRequest) -> JsonResponse:
    with request.statekit.event() as ev:  # type: ignore[attr-defined]
        return JsonResponse(CURRENT["shop"].show(ev))


def page(request: HttpRequest) -> HttpResponse:
    """A page that works without JavaScript: the cookie fallback."""
    shop = CURRENT["shop"]
    loads = declared(shop.engine, "loads")
    with visit_of(request).event() as ev:
        ev[loads] += 1
        return HttpResponse(f"<p>load {ev[loads]}, cart {ev[shop.cart]}</p>")


def form(request: HttpRequest) -> JsonResponse:
    with visit_of(request).event() as ev:
        return JsonResponse(CURRENT["shop"].add(ev, request.POST.get("item")))


def cached(request: HttpRequest) -> HttpResponse:
    """A page of its own cache policy, setting a cookie of its own."""
    with visit_of(request).event() as ev:
        response = HttpResponse(f"cart {ev[CURRENT['shop'].cart]}")
    response["Cache-Control"] = "public, max-age=600"
    response.set_cookie("theme", "dark")
    return response


@csrf_exempt
def hook(request: HttpRequest) -> JsonResponse:
    """A webhook checking a signature over the raw body: never asks for the session."""
    return JsonResponse({"raw": len(request.body)})


@csrf_exempt
def hook_then_session(request: HttpRequest) -> JsonResponse:
    """Reads the raw body, then asks for the session (named in the form's field)."""
    raw = request.body
    with visit_of(request).event() as ev:
        ev[CURRENT["shop"].cart].append("Water")
        return JsonResponse({"raw": len(raw), "cart": ev[CURRENT["shop"].cart]})


def other(request: HttpRequest, sid: str) -> JsonResponse:
    """Looks up another session than the request's own (an admin page, say)."""
    visit_of(request).session()
    with CURRENT["shop"].engine.event(sid) as ev:
        return JsonResponse({"cart": ev[CURRENT["shop"].cart]})


class CatchAll:
    """A project's middleware answering every error a view raises as JSON."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exc: Exception) -> HttpResponse:
        return JsonResponse({"error": "caught", "type": type(exc).__name__}, status=500)


def fail(request: HttpRequest, kind: str) -> HttpResponse:
    if kind == "busy":
        raise SessionBusy("b" * 32, 2.0)
    if kind == "unavailable":
        raise StoreUnavailable("redis at 127.0.0.1:1", "connection refused")
    raise LookupError("the project's own error")


urlpatterns = [
    path("api/cart", add),
    path("api/login", login),
    path("api/show", show),
    path("page", page),
    path("form", form),
    path("raise/<str:kind>", fail),
    path("cached", cached),
    path("hook", hook),
    path("hook-then-session", hook_then_session),
    path("other/<str:sid>", other),
]


@pytest.fixture
def shop(clock: FakeClock) -> Iterator[Shop]:
    made = Shop(StateEngine(clock=clock, idle_ttl=60, closed_ttl=30), keys=BrowserKeys([SECRET]))
    made.engine.session_state("loads", 0)
    CURRENT["shop"] = made
    yield made
    CURRENT.clear()
    made.engine.shutdown()


def project(shop: Shop, *extra: str, **more: Any) -> override_settings:
    """This module's views behind the middleware, listed last as its page says (after
    the example's ValueError → 400 and any ``extra`` middleware)."""
    return override_settings(
        **{
            "ROOT_URLCONF": __name__,
            "ALLOWED_HOSTS": ["testserver"],
            "MIDDLEWARE": [*extra, "django_shop.BadValue", MIDDLEWARE],  # statekit's last
            "STATEKIT_ENGINE": shop.engine,
            **more,
        }
    )


@pytest.fixture
def client(shop: Shop) -> Iterator[Client]:
    with project(shop):
        yield Client()


def open_tab(client: Client) -> str:
    """A tab's session, as statekit.js opens it."""
    answer = client.post("/statekit/open")
    assert answer.status_code == 200
    sid = answer.json()["sid"]
    assert isinstance(sid, str)
    return sid


def tab(sid: str, tokens: dict[str, str] | None = None) -> dict[str, str]:
    """The headers statekit.js sends for a tab."""
    headers = {"X-Statekit-Session": sid}
    if tokens:
        headers["X-Statekit-Browser"] = json.dumps(tokens)
    return headers


def post(client: Client, url: str, data: object = None, **kwargs: Any) -> Any:
    return client.post(url, json.dumps(data or {}), content_type="application/json", **kwargs)


def test_the_middleware_serves_the_endpoints_itself(shop: Shop, client: Client) -> None:
    """No urls to add: ``open``, ``close`` and the script are answered at the prefix,
    before URL resolution. Fails if a wrong method gets Django's HTML page, or a
    beacon for an unknown id is an error."""
    closed: list[tuple[str, DeleteReason]] = []
    shop.engine.on_close(lambda sid, reason: closed.append((sid, reason)))

    answer = client.post("/statekit/open")
    assert (answer.status_code, answer.headers["Cache-Control"]) == (200, "no-store")
    sid = answer.json()["sid"]
    assert shop.engine.exists(sid)

    js = client.get("/statekit/statekit.js")
    assert js.status_code == 200
    assert js.headers["Content-Type"].startswith("text/javascript")
    assert js.content == script()

    wrong = client.get("/statekit/open")
    assert (wrong.status_code, wrong.headers["Allow"]) == (405, "POST")

    beacon = client.post("/statekit/close", sid, content_type="text/plain")
    assert beacon.status_code == 204
    assert closed == [(sid, DeleteReason.CLOSED)]
    assert client.post("/statekit/close", "never-issued", content_type="text/plain").status_code
    assert closed == [(sid, DeleteReason.CLOSED)]


def test_settings_move_the_prefix_and_turn_off_the_cookie(shop: Shop) -> None:
    """``STATEKIT_PREFIX`` and ``STATEKIT_COOKIE``."""
    with project(shop, STATEKIT_PREFIX="/state", STATEKIT_COOKIE=False):
        middleware = StateKitMiddleware(lambda request: HttpResponse())
        assert repr(middleware) == "StateKitMiddleware(SessionGate(prefix='/state', cookie=False))"
        client = Client()
        assert client.post("/state/open").status_code == 200
        assert client.post("/statekit/open").status_code == 404
        answer = client.get("/page", headers={"Accept": "text/html"})
        assert (answer.status_code, answer.headers["X-Statekit-Session-Ended"]) == (409, "missing")
        assert not answer.cookies


def test_the_endpoints_come_before_csrf(shop: Shop) -> None:
    """A close beacon carries no CSRF token: the middleware answers it before
    ``CsrfViewMiddleware`` looks; the project's own views stay protected."""
    with project(shop, "django.middleware.csrf.CsrfViewMiddleware"):
        client = Client(enforce_csrf_checks=True)
        sid = open_tab(client)
        assert client.post("/statekit/close", sid, content_type="text/plain").status_code == 204
        assert post(client, "/api/cart", {"item": "Milk"}, headers=tab(sid)).status_code == 403


OTHER_SITE = {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}


def test_open_and_close_refuse_another_sites_page(shop: Shop) -> None:
    """Another site's page cannot open a session in the visitor's browser, close one,
    or choose one with a form field: ``open`` and ``close`` answer it ``403`` (they
    come before CSRF, so they check this themselves), and its form's field is ignored.
    ``STATEKIT_ALLOWED_ORIGINS`` lets in a front end served elsewhere. Fails if the
    middleware does not pass the request's headers to the gate."""
    closed: list[str] = []
    shop.engine.on_close(lambda sid, reason: closed.append(sid))
    with project(shop):
        client = Client()
        sid = open_tab(client)
        assert client.post("/statekit/open", headers=OTHER_SITE).status_code == 403
        only_origin = {"Origin": "https://evil.example"}
        assert client.post("/statekit/open", headers=only_origin).status_code == 403
        refused = client.post(
            "/statekit/close", sid, content_type="text/plain", headers=OTHER_SITE
        )
        assert (refused.status_code, refused.json()["error"]) == (403, "cross_site")
        assert closed == []
        form = client.post("/form", {"statekit_session": sid, "item": "Milk"}, headers=OTHER_SITE)
        assert (form.status_code, form.headers["X-Statekit-Session-Ended"]) == (409, "missing")
        assert post(client, "/api/show", headers=tab(sid)).json()["cart"] == []
        own = {"Sec-Fetch-Site": "same-origin", "Origin": "http://testserver"}
        assert (
            client.post("/statekit/close", sid, content_type="text/plain", headers=own).status_code
            == 204
        )
        assert closed == [sid]
    front = {"Sec-Fetch-Site": "same-site", "Origin": "https://app.example.com"}
    with project(shop, STATEKIT_ALLOWED_ORIGINS=["https://app.example.com"]):
        assert Client().post("/statekit/open", headers=front).status_code == 200
        assert Client().post("/statekit/open", headers=OTHER_SITE).status_code == 403
    with (
        project(shop, STATEKIT_ALLOWED_ORIGINS="https://app.example.com"),
        pytest.raises(ImproperlyConfigured, match=r"STATEKIT_ALLOWED_ORIGINS: .*list"),
    ):
        StateKitMiddleware(lambda request: HttpResponse())


def test_the_script_is_answered_304_to_a_browser_that_has_it(client: Client) -> None:
    """A page load revalidates the script (``no-cache``): the browser's copy is
    answered ``304`` by its ETag. Fails if the request's headers are not passed."""
    etag = client.get("/statekit/statekit.js").headers["ETag"]
    again = client.get("/statekit/statekit.js", headers={"If-None-Match": etag})
    assert (again.status_code, again.content, again.headers["ETag"]) == (304, b"", etag)


def test_over_https_the_cookie_is_host_prefixed_and_its_response_private(
    shop: Shop, client: Client
) -> None:
    """Over HTTPS the fallback cookie is ``__Host-statekit_session`` (``Secure``,
    ``Path=/``, no domain: a sibling subdomain cannot plant one) and a plain
    ``statekit_session`` cookie is not read; the response that sets it says
    ``Cache-Control: private, no-store`` (replacing the view's own, which would let a
    shared cache hand the cookie to others) and keeps the view's own cookies."""
    planted = shop.engine.open_session()
    client.cookies["statekit_session"] = planted
    first = client.get("/cached", headers={"Accept": "text/html"}, secure=True)
    assert first.status_code == 200
    assert first.headers["Cache-Control"] == "private, no-store"
    assert first.cookies["theme"].value == "dark"
    ours = first.cookies["__Host-statekit_session"]
    assert (ours["secure"], ours["path"], ours["domain"], ours["httponly"]) == (
        True,
        "/",
        "",
        True,
    )
    assert ours.value != planted  # the plain cookie was not taken over HTTPS
    assert "statekit_session" not in first.cookies
    again = client.get("/cached", headers={"Accept": "text/html"}, secure=True)
    assert again.headers["Cache-Control"] == "public, max-age=600"  # it set nothing
    assert "__Host-statekit_session" not in again.cookies
    assert shop.engine.session_count() == 2  # the planted one and the browser's


def test_a_view_that_reads_the_raw_body_keeps_it(shop: Shop) -> None:
    """The form is read (``request.POST``) only when the session is asked for: a
    ``csrf_exempt`` multipart webhook that reads ``request.body`` works (Django refuses
    ``body`` once ``POST`` was read), and a view that reads the body first can still ask
    for the session its form names. Fails if the middleware reads the form up front."""
    with project(shop, "django.middleware.csrf.CsrfViewMiddleware"):
        client = Client(enforce_csrf_checks=True, raise_request_exception=True)
        fields = {"note": "x" * 100, "statekit_session": ""}
        assert client.post("/hook", fields).json()["raw"] > 100  # multipart, no session
        sid = open_tab(client)
        answer = client.post("/hook-then-session", {"statekit_session": sid, "note": "y"})
        assert answer.status_code == 200
        assert answer.json()["raw"] > len(sid)
        assert answer.json()["cart"] == ["Water"]


def test_list_the_middleware_last_so_that_it_answers_first(shop: Shop, clock: FakeClock) -> None:
    """Django calls ``process_exception`` from the last middleware listed to the first:
    listed last, as its page says, statekit answers an ended session 409 before a
    project middleware that answers every error; listed first, that middleware answers
    it (500) and the page never learns its session ended. An error about another
    session than the request's own is left to the project either way."""
    catch_all = f"{__name__}.CatchAll"
    with project(shop, catch_all):  # [CatchAll, BadValue, StateKitMiddleware]
        client = Client()
        sid = open_tab(client)
        clock.advance(61)
        ended = post(client, "/api/show", headers=tab(sid))
        assert (ended.status_code, ended.headers["X-Statekit-Session-Ended"]) == (409, "idle")
        mine = open_tab(client)
        other = client.get("/other/" + "z" * 32, headers=tab(mine))
        assert (other.status_code, other.json()) == (
            500,
            {"error": "caught", "type": "SessionNotFound"},
        )
    with project(shop, MIDDLEWARE=[MIDDLEWARE, catch_all]):  # listed first: too late
        client = Client()
        sid = open_tab(client)
        clock.advance(61)
        ended = post(client, "/api/show", headers=tab(sid))
        assert ended.status_code == 500
        assert "X-Statekit-Session-Ended" not in ended.headers


def test_two_tabs_have_independent_carts(client: Client) -> None:
    """Two tabs of one browser each have a cart of their own: fails if the middleware
    fell back to one session per browser."""
    one, two = open_tab(client), open_tab(client)
    post(client, "/api/cart", {"item": "Milk"}, headers=tab(one))
    post(client, "/api/cart", {"item": "Water"}, headers=tab(one))
    post(client, "/api/cart", {"item": "Cereal"}, headers=tab(two))
    assert post(client, "/api/show", headers=tab(one)).json()["cart"] == ["Milk", "Water"]
    shown = post(client, "/api/show", headers=tab(two)).json()
    assert (shown["cart"], shown["cart_size"]) == (["Cereal"], 1)


def test_a_shared_cache_never_serves_one_sessions_page_to_another(shop: Shop) -> None:
    """Behind Django's cache middleware (a CDN does the same), a page made from a
    session must not be served to another browser or tab: the answer varies with the
    cookie or the session header that named its session. Fails if it says nothing of
    it (browser B was served browser A's cart, tab B tab A's)."""
    caches = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    cache_first = "django.middleware.cache.UpdateCacheMiddleware"
    with project(
        shop,
        cache_first,
        "django.middleware.cache.FetchFromCacheMiddleware",
        CACHES=caches,
        CACHE_MIDDLEWARE_SECONDS=600,
    ):
        a = Client(HTTP_ACCEPT="text/html")
        assert a.get("/page").status_code == 200  # opens A's cookie session
        again = a.get("/page")
        assert "Cookie" in again["Vary"]
        b = Client(HTTP_ACCEPT="text/html")
        answer_b = b.get("/page")
        assert answer_b.content == b"<p>load 1, cart []</p>"  # its own, not A's
        tabs = Client()
        one, two = open_tab(tabs), open_tab(tabs)
        post(tabs, "/api/cart", {"item": "Milk"}, headers=tab(one))
        shown_one = tabs.get("/api/show", headers=tab(one))
        assert "X-Statekit-Session" in shown_one["Vary"]
        assert tabs.get("/api/show", headers=tab(two)).json()["cart"] == []


def test_closing_a_tab_ends_only_its_own_session(
    shop: Shop, client: Client, clock: FakeClock
) -> None:
    """The close beacon names the tab's own id: the other tab's next action succeeds,
    and once the closed session's grace is over its id is answered 409 with the
    reason."""
    closed: list[str] = []
    shop.engine.on_close(lambda sid, reason: closed.append(sid))
    one, two = open_tab(client), open_tab(client)
    post(client, "/api/cart", {"item": "Milk"}, headers=tab(one))
    assert client.post("/statekit/close", one, content_type="text/plain").status_code == 204
    assert closed == [one]
    answer = post(client, "/api/cart", {"item": "Water"}, headers=tab(two))
    assert (answer.status_code, answer.json()["cart"]) == (200, ["Water"])

    clock.advance(31)
    shop.engine.reap()
    ended = post(client, "/api/cart", {"item": "Milk"}, headers=tab(one))
    assert ended.status_code == 409
    assert ended.headers["X-Statekit-Session-Ended"] == "closed"
    assert ended.json()["reason"] == "closed"
    assert post(client, "/api/show", headers=tab(two)).status_code == 200


def test_an_idle_unknown_or_missing_session_is_409_with_its_reason(
    client: Client, clock: FakeClock
) -> None:
    """Every way a request can lack a live session is a 409 with a reason, never a
    500, and never opens a session unless the request is a page load."""
    sid = open_tab(client)
    clock.advance(61)
    idle = post(client, "/api/show", headers=tab(sid))
    assert (idle.status_code, idle.headers["X-Statekit-Session-Ended"]) == (409, "idle")
    unknown = post(client, "/api/show", headers=tab("x" * 32))
    assert (unknown.status_code, unknown.json()["reason"]) == (409, "unknown")
    assert "x" * 32 not in unknown.content.decode()  # ids are secrets
    missing = post(client, "/api/show")
    assert (missing.status_code, missing.headers["X-Statekit-Session-Ended"]) == (409, "missing")
    assert not missing.cookies


def test_browser_tokens_go_out_and_come_back_in(client: Client) -> None:
    """A sign-in in one tab comes back as a token; another tab that sends it sees the
    user (``request.statekit`` works as ``visit_of(request)`` does)."""
    one, two = open_tab(client), open_tab(client)
    signed = post(client, "/api/login", {"username": "ann"}, headers=tab(one))
    assert signed.status_code == 200
    tokens = json.loads(signed.headers["X-Statekit-Browser-Set"])
    assert set(tokens) == {"login"}
    assert post(client, "/api/show", headers=tab(two, tokens)).json()["user"] == "ann"
    plain = post(client, "/api/show", headers=tab(two))
    assert plain.json()["user"] == ""
    assert "X-Statekit-Browser-Set" not in plain.headers


def test_a_page_without_javascript_gets_one_session_per_browser(
    shop: Shop, client: Client, clock: FakeClock
) -> None:
    """The cookie fallback: a page load naming no session opens one kept in a cookie
    that every later request of the browser shares (one session per browser); another
    browser gets its own; an ended one is answered 409 with the cookie cleared, and the
    next page load opens a new one."""
    html = {"Accept": "text/html"}
    first = client.get("/page", headers=html)
    assert first.content == b"<p>load 1, cart []</p>"
    cookie = first.cookies["statekit_session"]
    assert (cookie["httponly"], cookie["samesite"], cookie["path"]) == (True, "Lax", "/")

    again = client.get("/page", headers=html)  # a reload, or a second tab
    assert again.content == b"<p>load 2, cart []</p>"
    assert not again.cookies
    assert post(client, "/api/cart", {"item": "Milk"}).status_code == 200  # by the cookie

    other = Client()
    assert other.get("/page", headers=html).content == b"<p>load 1, cart []</p>"
    assert client.get("/page", headers=html).content == b"<p>load 3, cart ['Milk']</p>"

    clock.advance(61)
    shop.engine.reap()
    ended = post(client, "/api/show")
    assert ended.status_code == 409
    assert str(ended.cookies["statekit_session"]["max-age"]) == "0"
    renewed = client.get("/page", headers=html)
    assert renewed.content == b"<p>load 1, cart []</p>"
    assert renewed.cookies["statekit_session"].value != cookie.value


def test_a_form_names_its_session_in_a_field(client: Client) -> None:
    """A plain form (multipart here) sends the tab's id in the ``statekit_session``
    field; a header, when there is one, wins."""
    one, two = open_tab(client), open_tab(client)
    posted = client.post("/form", {"statekit_session": one, "item": "Milk"})
    assert (posted.status_code, posted.json()["cart"]) == (200, ["Milk"])
    urlencoded = client.post(
        "/form",
        f"statekit_session={one}&item=Water",
        content_type="application/x-www-form-urlencoded",
    )
    assert urlencoded.json()["cart"] == ["Milk", "Water"]
    both = client.post("/form", {"statekit_session": one, "item": "Cereal"}, headers=tab(two))
    assert both.json()["cart"] == ["Cereal"]


def test_statekit_errors_are_answered_and_others_left_to_the_project(shop: Shop) -> None:
    """A busy session or an unavailable store is 503 with Retry-After; the project's
    own ValueError handling and its other errors are untouched."""
    with project(shop):
        client = Client(raise_request_exception=False)
        busy = client.get("/raise/busy")
        assert (busy.status_code, busy.headers["Retry-After"]) == (503, "1")
        assert busy.json()["error"] == "busy"
        down = client.get("/raise/unavailable")
        assert (down.status_code, down.json()["error"]) == (503, "unavailable")
        bad = post(client, "/api/cart", {"item": "Beer"}, headers=tab(open_tab(client)))
        assert (bad.status_code, bad.json()["detail"][:12]) == (400, "unknown item")
        assert client.get("/raise/other").status_code == 500


def test_the_engine_setting_takes_an_engine_a_path_or_a_factory(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``STATEKIT_ENGINE``: the engine, its dotted path, or a factory called once per
    process however many times Django loads the middleware (each test client does)."""
    monkeypatch.setattr(sys.modules[__name__], "named_engine", shop.engine, raising=False)
    with override_settings(STATEKIT_ENGINE=f"{__name__}.named_engine"):
        assert engine_from_settings() is shop.engine
    calls: list[StateEngine] = []

    def factory() -> StateEngine:
        calls.append(shop.engine)
        return shop.engine

    with project(shop, STATEKIT_ENGINE=factory):
        assert Client().post("/statekit/open").status_code == 200
        assert Client().post("/statekit/open").status_code == 200
    assert calls == [shop.engine]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (None, "needs STATEKIT_ENGINE"),
        ("nowhere.engine", "No module named 'nowhere'"),
        ("os.sep", "is an object of type str, not a StateEngine"),
        (lambda: 42, "returned an object of type int"),
    ],
)
def test_a_bad_engine_setting_says_what_is_wrong(setting: object, message: str) -> None:
    with (
        override_settings(STATEKIT_ENGINE=setting),
        pytest.raises(ImproperlyConfigured, match=message),
    ):
        StateKitMiddleware(lambda request: HttpResponse())


def test_a_bad_prefix_is_refused(shop: Shop) -> None:
    with (
        project(shop, STATEKIT_PREFIX="statekit/"),
        pytest.raises(ImproperlyConfigured, match="STATEKIT_PREFIX"),
    ):
        StateKitMiddleware(lambda request: HttpResponse())


def test_visit_of_a_request_without_the_middleware_says_so() -> None:
    needed = r"add 'statekit\.integrations\.django\.StateKitMiddleware' to MIDDLEWARE"
    with pytest.raises(RuntimeError, match=needed):
        visit_of(RequestFactory().get("/"))


def test_the_middleware_does_not_keep_an_engine_alive() -> None:
    """Shutdown at exit holds engines weakly."""
    engine = StateEngine()
    with override_settings(STATEKIT_ENGINE=engine):
        middleware = StateKitMiddleware(lambda request: HttpResponse())
    ref = weakref.ref(engine)
    del engine, middleware
    gc.collect()
    assert ref() is None


EXIT_SCRIPT = """
import sys
import django
from django.conf import settings
from statekit import StateEngine

engine = StateEngine()
note = engine.session_state("note", "", on_delete=lambda value, why: print("deleted", why.value))
settings.configure(
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["testserver"],
    MIDDLEWARE=["statekit.integrations.django.StateKitMiddleware"],
    STATEKIT_ENGINE=engine,
)
django.setup()
from django.http import HttpResponse
from django.test import Client
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from statekit.integrations.django import visit_of

def write(request):
    with visit_of(request).event() as ev:
        ev[note] = "kept"
    return HttpResponse("ok")

urlpatterns = [path("note", write)]
client = Client()
sid = client.post("/statekit/open").json()["sid"]
assert client.post("/note", headers={"X-Statekit-Session": sid}).status_code == 200
if sys.argv[1] == "early":
    engine.shutdown()
print("exiting")
"""


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("on", "exiting\ndeleted shutdown\n"), ("early", "deleted shutdown\nexiting\n")],
)
def test_the_engine_is_shut_down_once_when_the_process_exits(mode: str, expected: str) -> None:
    """A WSGI server tells the app nothing when it stops: the middleware shuts the
    engine down at exit (a memory store's sessions end, their callbacks run), once."""
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


def test_the_example_serves_the_shop() -> None:
    """The Django example: the page, a visit counter shared by every tab, a cart per
    tab, sign-in kept by the browser, a bad value answered 400 with its detail."""
    client = Client(HTTP_HOST="localhost")
    assert client.get("/").content.decode() == django_shop.DJANGO_PAGE
    assert client.post("/").status_code == 405
    one, two = open_tab(client), open_tab(client)
    first = post(client, "/api/visit", headers=tab(one)).json()["visits"]
    assert post(client, "/api/visit", headers=tab(two)).json()["visits"] == first + 1

    assert post(client, "/api/cart", {"item": "Milk"}, headers=tab(one)).status_code == 200
    shown = post(client, "/api/visit", headers=tab(one)).json()
    assert (shown["cart"], shown["cart_size"]) == (["Milk"], 1)
    assert post(client, "/api/visit", headers=tab(two)).json()["cart"] == []

    bad = post(client, "/api/cart", {"item": "Beer"}, headers=tab(one))
    assert (bad.status_code, bad.json()["detail"][:12]) == (400, "unknown item")
    nobody = post(client, "/api/login", {"username": " "}, headers=tab(one))
    assert (nobody.status_code, nobody.json()) == (
        400,
        {"detail": "a username is 1 to 40 characters"},
    )
    signed = post(client, "/api/login", {"username": "ann"}, headers=tab(one))
    tokens = json.loads(signed.headers["X-Statekit-Browser-Set"])
    assert post(client, "/api/visit", headers=tab(two, tokens)).json()["user"] == "ann"
    assert post(client, "/api/cart", {"item": "Milk"}).status_code == 409
    assert django_shop.shop.engine.exists(one)


def test_the_example_keeps_csrf_on_and_its_page_sends_the_token() -> None:
    """The example runs with ``CsrfViewMiddleware``, as a new Django project does: its
    page is the shop's with a ``headers`` hook that sends the ``csrftoken`` cookie's
    token as ``X-CSRFToken`` with every ``kit.fetch``, and the page sets that cookie.
    The API is served with the token and refused (403) without it; ``open`` and
    ``close`` need none (a beacon cannot send one) but refuse another site's page."""
    client = Client(HTTP_HOST="localhost", enforce_csrf_checks=True)
    page = client.get("/")
    token = page.cookies["csrftoken"].value
    hook = (
        ' headers: () => ({ "X-CSRFToken": '
        "(document.cookie.match(/(?:^|; )csrftoken=([^;]+)/) || [])[1] }),"
    )
    html = page.content.decode()
    assert "StateKit.start({" + hook in html  # per request: a rotated token is read anew
    assert html.replace(hook, "", 1) == PAGE  # otherwise the shop's page

    sid = open_tab(client)  # no token
    with_token = {**tab(sid), "X-CSRFToken": token}
    counted = post(client, "/api/visit", headers=with_token)
    assert counted.status_code == 200
    assert post(client, "/api/visit", headers=tab(sid)).status_code == 403
    added = post(client, "/api/cart", {"item": "Milk"}, headers=with_token)
    assert added.json()["cart"] == ["Milk"]
    assert post(client, "/api/cart", {"item": "Milk"}, headers=tab(sid)).status_code == 403
    assert post(client, "/api/visit", headers=with_token).json()["cart"] == ["Milk"]

    assert client.post("/statekit/open", headers=OTHER_SITE).status_code == 403
    assert client.post("/statekit/close", sid, "text/plain", headers=OTHER_SITE).status_code == 403
    assert django_shop.shop.engine.exists(sid)
    assert client.post("/statekit/close", sid, content_type="text/plain").status_code == 204


def test_the_example_counts_no_visit_for_an_ended_session() -> None:
    """A page whose session the server no longer has (ended and deleted, or lost in a
    restart) is answered 409 and is not counted as a visit. Fails if ``/api/visit``
    increments before its event checks the session."""
    client = Client(HTTP_HOST="localhost")
    before = post(client, "/api/visit", headers=tab(open_tab(client))).json()["visits"]
    for _ in range(3):
        ended = post(client, "/api/visit", headers=tab("e" * 32))
        assert (ended.status_code, ended.headers["X-Statekit-Session-Ended"]) == (409, "unknown")
    after = post(client, "/api/visit", headers=tab(open_tab(client))).json()["visits"]
    assert after == before + 1


def test_the_example_page_works_in_chromium_with_csrf_enforced(tmp_path: Path) -> None:
    """The example's page in a real browser against the example served by gunicorn,
    CSRF on: the page's first visit, a cart addition and a sign-in all succeed (each a
    ``kit.fetch`` POST that Django refuses without the token). Fails if the page's
    ``headers`` hook is missing or the script does not send what it returns."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    errors = tmp_path / "gunicorn.err"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STATEKIT_SECRETS": SECRET}
    for name in ("STATEKIT_REDIS_URL", "STATEKIT_SQLITE_PATH"):
        env.pop(name, None)
    command = [sys.executable, "-m", "gunicorn", "--workers", "1", "--chdir", str(EXAMPLES)]
    command += ["--bind", f"127.0.0.1:{port}", "--no-control-socket", "django_shop:application"]
    with errors.open("wb") as err:
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for_port(port, server, errors)
        if not Path(CHROMIUM).exists():
            raise RuntimeError("Chromium is not installed (Debian: apt-get install -y chromium)")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            try:
                page = browser.new_context().new_page()
                page.set_default_timeout(WAIT * 1000 / 3)
                failed: list[str] = []
                page.on("pageerror", lambda exc: failed.append(str(exc)))
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector("body[data-ready=yes]")
                assert page.text_content("#error") == ""
                assert (page.text_content("#visits") or "").isdigit()
                page.click("button[data-item=Milk]")
                page.wait_for_function("document.getElementById('cart-size').textContent === '1'")
                page.fill("#name", "ann")
                page.click("#login")
                page.wait_for_function("document.getElementById('user').textContent === 'ann'")
                assert (page.text_content("#cart"), page.text_content("#error")) == (
                    '["Milk"]',
                    "",
                )
                assert failed == []
            finally:
                browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=WAIT)
    log = errors.read_text()
    assert "Traceback" not in log, log


@pytest.mark.parametrize("preload", [False, True], ids=["import-per-worker", "preload"])
def test_the_example_under_gunicorn_with_two_workers_on_redis(
    preload: bool, tmp_path: Path
) -> None:
    run_shop_under_gunicorn(
        "django_shop:application", preload=preload, tmp_path=tmp_path, csrf=True
    )
