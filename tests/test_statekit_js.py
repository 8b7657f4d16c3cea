"""statekit.js in a real browser (Debian's Chromium driven by Playwright), on pages whose
every request Playwright answers: the page's origin is ``http://app.test``, another
origin is ``http://other.test``, and no server runs. What the page sends is recorded
as the network saw it. htmx is the real one (htmx 2, ``tests/vendor/htmx.min.js``,
Zero-Clause BSD). A missing Chromium fails these tests; nothing skips."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, Route

from .test_browser_e2e import ROOT, WAIT_MS, chromium

sys.path.insert(0, str(ROOT / "docs" / "examples"))
import shop

SCRIPT = (ROOT / "statekit" / "static" / "statekit.js").read_text(encoding="utf-8")
HTMX = (Path(__file__).parent / "vendor" / "htmx.min.js").read_text(encoding="utf-8")
APP = "http://app.test"
OTHER = "http://other.test"
#: What the other origin answers: CORS that lets the page read statekit's headers, so
#: only statekit.js's own origin check keeps them from counting.
CORS = {
    "Access-Control-Allow-Origin": APP,
    "Access-Control-Allow-Headers": "*",
    "Access-Control-Allow-Methods": "*",
    "Access-Control-Expose-Headers": "X-Statekit-Browser-Set, X-Statekit-Session-Ended",
}
PAGE = '<!doctype html><html><body><script src="/statekit/statekit.js"></script></body></html>'


@dataclass
class Sent:
    """One request as the network saw it."""

    method: str
    url: str
    headers: dict[str, str]
    body: str | None

    @property
    def path(self) -> str:
        return urlsplit(self.url).path


Handler = Callable[[Route, Sent], None]


class Site:
    """Every request of a browser context, answered here and recorded in order.

    ``pages`` maps a path of the app to its HTML; ``handlers`` maps a path to a function
    that answers it (the default answers are statekit's: the script, a session per
    ``open``, 204 for ``close``; anything else is ``{}``)."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.pages: dict[str, str] = {"/": PAGE}
        self.handlers: dict[str, Handler] = {}
        self.opened = 0
        #: Answers held back by a test (``hold``), to be given later.
        self.held: list[tuple[Route, Sent]] = []

    def __call__(self, route: Route) -> None:
        request = route.request
        sent = Sent(request.method, request.url, dict(request.headers), request.post_data)
        self.sent.append(sent)
        if request.url.startswith(OTHER):
            headers = {**CORS, "X-Statekit-Browser-Set": '{"login":"FOREIGN"}'}
            headers["X-Statekit-Session-Ended"] = "closed"
            route.fulfill(status=204 if request.method == "OPTIONS" else 200, headers=headers)
        elif sent.path in self.handlers:
            self.handlers[sent.path](route, sent)
        elif sent.path in self.pages:
            route.fulfill(body=self.pages[sent.path], content_type="text/html")
        elif sent.path == "/statekit/statekit.js":
            route.fulfill(body=SCRIPT, content_type="text/javascript")
        elif sent.path == "/htmx.min.js":
            route.fulfill(body=HTMX, content_type="text/javascript")
        elif sent.path == "/statekit/open":
            self.opened += 1
            body = json.dumps({"sid": f"sid-{self.opened}"})
            route.fulfill(body=body, content_type="application/json")
        elif sent.path == "/statekit/close":
            route.fulfill(status=204)
        else:
            route.fulfill(body="{}", content_type="application/json")

    def hold(self, route: Route, sent: Sent) -> None:
        """A handler that answers nothing until the test calls :meth:`release`."""
        self.held.append((route, sent))

    def release(self) -> None:
        """Answer the held requests as the defaults would."""
        held, self.held = self.held, []
        for route, sent in held:
            del self.handlers[sent.path]
            self(route)
            self.sent.remove(sent)  # recorded once, when it was sent

    def to(self, path: str) -> list[Sent]:
        return [sent for sent in self.sent if sent.path == path]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def site() -> Site:
    return Site()


@pytest.fixture
def page(browser: Browser, site: Site) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    context.route("**/*", site)
    errors: list[str] = []
    opened = context.new_page()
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield opened
    finally:
        context.close()
    assert errors == []


def started(page: Page, options: str = "{ keys: ['login'] }") -> str:
    """Load the app's page and start statekit.js with ``options``; the tab's sid."""
    page.goto(APP + "/")
    sid: str = page.evaluate(f"StateKit.start({options}).then((kit) => (window.kit = kit).sid)")
    return sid


STATEKIT_HEADERS = ("x-statekit-session", "x-statekit-browser", "x-csrftoken")


def statekit_headers(sent: Sent) -> dict[str, str]:
    return {name: sent.headers[name] for name in STATEKIT_HEADERS if name in sent.headers}


def test_another_origin_gets_no_session_no_tokens_and_is_not_read(page: Page, site: Site) -> None:
    # Fails if kit.fetch, StateKit.create().fetch or an htmx request sends the tab's
    # session, the browser's tokens or the app's headers to another origin, or if an
    # answer from another origin stores tokens or says the session ended.
    site.pages["/"] = PAGE + '<script src="/htmx.min.js"></script>'
    sid = started(page, "{ keys: ['login'], headers: () => ({ 'X-CSRFToken': 'csrf-1' }) }")
    page.evaluate("localStorage.setItem('statekit:login', 'MINE')")
    page.evaluate("""async () => {
      await kit.fetch("http://other.test/a", { method: "POST", body: "x" });
      await kit.fetch(new Request("http://other.test/b"));
      await kit.fetch(new URL("http://other.test/c"));
      await StateKit.create({ keys: ["login"] }).fetch("http://other.test/d");
      htmx.config.selfRequestsOnly = false;  // htmx 2 sends to its own origin only by default
      await new Promise((resolve) => {
        document.body.addEventListener("htmx:afterRequest", resolve, { once: true });
        htmx.ajax("GET", "http://other.test/e", { target: "body", swap: "none" });
      });
      await kit.fetch("/api/own");
    }""")
    foreign = [sent for sent in site.sent if sent.url.startswith(OTHER)]
    assert [sent.path for sent in foreign if sent.method != "OPTIONS"] == [
        "/a",
        "/b",
        "/c",
        "/d",
        "/e",
    ]
    assert [statekit_headers(sent) for sent in foreign] == [{}] * len(foreign)
    assert page.evaluate("localStorage.getItem('statekit:login')") == "MINE"
    assert page.evaluate("kit.ended") is None
    (own,) = site.to("/api/own")  # this origin gets all three
    assert statekit_headers(own) == {
        "x-statekit-session": sid,
        "x-statekit-browser": '{"login":"MINE"}',
        "x-csrftoken": "csrf-1",
    }


def test_fetch_keeps_the_callers_request_and_init(page: Page, site: Site) -> None:
    # Fails if kit.fetch(new Request(...)) loses the Request's headers, method or
    # credentials, if the caller's own headers are overwritten by the app's, or if the
    # caller's init object is changed.
    sid = started(page)
    kept = page.evaluate("""async () => {
      const seen = [];
      const fetch = window.fetch;
      window.fetch = (input, init) => {
        seen.push([input.method, input.credentials]);
        return fetch(input, init);
      };
      const request = new Request("/api/request", { method: "PUT", body: "{}",
        headers: { Authorization: "Bearer abc", "Content-Type": "application/json" },
        credentials: "include" });
      await kit.fetch(request);
      const init = { method: "POST", headers: { "X-Mine": "1" }, body: "b" };
      const before = JSON.stringify(init);
      await kit.fetch("/api/init", init);
      window.fetch = fetch;
      return [seen, before === JSON.stringify(init), init.headers instanceof Headers,
              "credentials" in init];
    }""")
    assert kept == [[["PUT", "include"], ["POST", "same-origin"]], True, False, False]
    (request,) = site.to("/api/request")
    assert request.method == "PUT"
    assert request.headers["authorization"] == "Bearer abc"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-statekit-session"] == sid
    (init,) = site.to("/api/init")
    assert (init.method, init.headers["x-mine"], init.body) == ("POST", "1", "b")
    assert init.headers["x-statekit-session"] == sid


HTMX_ON_LOAD = """<!doctype html><html><body>
<div id="box" hx-post="/api/box" hx-trigger="load" hx-swap="innerHTML">waiting</div>
<script src="/statekit/statekit.js"></script>
<script src="/htmx.min.js"></script>
<script>
addEventListener("statekit:ended", (event) => {
  document.title = "ended " + event.detail.reason;
});
StateKit.start({ keys: [], headers: () => ({ "X-CSRFToken": "csrf-2" }) })
  .then((kit) => { window.kit = kit; });
</script></body></html>"""


def test_an_htmx_request_made_while_the_session_opens_waits_for_it(page: Page, site: Site) -> None:
    # Fails if an htmx request fired on load, before the session is open, goes out
    # without it (the server would answer it 409 and the page would say "ended"), or
    # if it is not sent once the session opened, or lacks the app's headers.
    site.pages["/"] = HTMX_ON_LOAD
    site.handlers["/statekit/open"] = site.hold
    page.goto(APP + "/")
    page.wait_for_function("document.readyState === 'complete' && window.htmx")
    page.wait_for_timeout(300)  # htmx's load trigger has fired by now
    assert site.to("/api/box") == []  # held back: no session yet
    site.release()
    page.wait_for_function("document.getElementById('box').textContent === '{}'")
    (box,) = site.to("/api/box")
    assert box.headers["x-statekit-session"] == "sid-1"
    assert box.headers["x-csrftoken"] == "csrf-2"
    assert page.title() == ""  # no statekit:ended


def test_the_headers_hook_is_asked_per_request(page: Page, site: Site) -> None:
    # Fails if the app's headers function is not called for each kit.fetch and htmx
    # request (a CSRF token read once would go stale), or if a header the caller set
    # itself is overwritten by it.
    site.pages["/"] = PAGE + '<script src="/htmx.min.js"></script>'
    started(page, "{ headers: () => ({ 'X-CSRFToken': 'csrf-' + (++window.calls) }) }")
    page.evaluate("""async () => {
      window.calls = 0;
      await kit.fetch("/api/one");
      await kit.fetch("/api/two", { headers: { "X-CSRFToken": "given" } });
      await new Promise((resolve) => {
        document.body.addEventListener("htmx:afterRequest", resolve, { once: true });
        htmx.ajax("POST", "/api/three", { target: "body", swap: "none" });
      });
    }""")
    tokens = [
        site.to(path)[0].headers.get("x-csrftoken")
        for path in ("/api/one", "/api/two", "/api/three")
    ]
    assert tokens == ["csrf-1", "given", "csrf-3"]


def test_one_kit_per_page_and_reopen_closes_the_live_session(page: Page, site: Site) -> None:
    # Fails if a second StateKit.start() on the page opens a second session (the first
    # would never be closed), or if kit.reopen() on a live session leaves it open on the
    # server instead of closing it before opening the next.
    sid = started(page)
    again = page.evaluate(
        "StateKit.start({ keys: ['login'] }).then((other) => [other === kit, other.sid])"
    )
    assert again == [True, sid]
    assert len(site.to("/statekit/open")) == 1
    reopened = page.evaluate("kit.reopen().then((kit) => kit.sid)")
    assert reopened == "sid-2"
    page.wait_for_function("true")  # the beacon may reach the network after the open
    closed = [sent.body for sent in site.to("/statekit/close")]
    assert closed == [sid]


def test_the_script_loaded_twice_keeps_one_kit(page: Page, site: Site) -> None:
    # Fails if a second copy of the script (a base template's and a widget's) replaces
    # StateKit: the page then has two kits, two sessions, and splits its state.
    sid = started(page)
    page.evaluate("""() => new Promise((loaded) => {
      const again = document.createElement("script");
      again.src = "/statekit/statekit.js";
      again.onload = loaded;
      document.body.appendChild(again);
    })""")
    again = page.evaluate("StateKit.start().then((other) => [other === kit, other.sid])")
    assert again == [True, sid]
    assert len(site.to("/statekit/open")) == 1


def test_an_ended_answer_about_a_session_the_tab_left_ends_nothing(page: Page, site: Site) -> None:
    # Two requests in flight when the session ends: the first answer's listener reopens
    # (as the docs suggest), and the second, stale answer arrives once the tab has its
    # new session. Fails if that answer marks the new, live session ended: the listener
    # then reopens again without closing it (it is never closed).
    held: list[Route] = []
    site.handlers["/api/slow"] = lambda route, sent: held.append(route)
    started(page, "{}")
    page.evaluate("""() => {
      window.endedEvents = [];
      addEventListener("statekit:ended", (e) => {
        endedEvents.push(e.detail.reason);
        e.detail.kit.reopen();
      });
      window.first = kit.fetch("/api/slow");
      window.second = kit.fetch("/api/slow");
    }""")
    page.wait_for_function("true")
    for _ in range(100):
        if len(held) == 2:
            break
        page.wait_for_timeout(20)
    ended = {"X-Statekit-Session-Ended": "idle"}
    held[0].fulfill(status=409, headers=ended, body="{}")
    page.wait_for_function("kit.sid === 'sid-2' && kit.ended === null")
    held[1].fulfill(status=409, headers=ended, body="{}")
    page.evaluate("second")
    assert page.evaluate("[kit.sid, kit.ended, endedEvents]") == ["sid-2", None, ["idle"]]
    assert site.opened == 2


def test_a_stream_that_ends_with_its_session_tells_the_page(page: Page, site: Site) -> None:
    # Fails if the stream's end (its session ended: the reason comes with it) leaves
    # the page unaware (kit.ended unset, no statekit:ended), or a refused stream leaves
    # kit.stream set to a dead EventSource.
    watches = 0

    def watch(route: Route, sent: Sent) -> None:
        nonlocal watches
        watches += 1
        if watches == 1:
            body = 'retry: 3000\n\nevent: end\ndata: {"reason": "idle"}\n\n'
            route.fulfill(body=body, content_type="text/event-stream")
        else:
            route.fulfill(status=409, body="{}", content_type="application/json")

    site.handlers["/statekit/watch"] = watch
    started(page, "{}")
    page.evaluate("""() => {
      window.endedEvents = [];
      addEventListener("statekit:ended", (e) => endedEvents.push(e.detail.reason));
      kit.watch();
    }""")
    page.wait_for_function("kit.ended === 'idle' && kit.stream === null")
    assert page.evaluate("endedEvents") == ["idle"]
    page.evaluate("kit.reopen()")  # the stream follows the new session: refused this time
    page.wait_for_function("kit.sid === 'sid-2'")
    page.wait_for_function("kit.stream === null")
    assert page.evaluate("[kit.ended, endedEvents]") == [None, ["idle"]]


WORKER = """importScripts("/statekit/statekit.js");
StateKit.start().then(
  (kit) => kit.fetch("/api/worker").then(() => postMessage(kit.sid)),
  (error) => postMessage("failed: " + error.message));"""


def test_start_without_a_document_opens_one_working_session(page: Page, site: Site) -> None:
    # Fails if StateKit.start() where there is no document (a web worker) rejects after
    # the server opened a session, which no one would then close.
    site.handlers["/worker.js"] = lambda route, sent: route.fulfill(
        body=WORKER, content_type="text/javascript"
    )
    page.goto(APP + "/")
    answer = page.evaluate(
        "new Promise((resolve) => {"
        " new Worker('/worker.js').onmessage = (e) => resolve(e.data); })"
    )
    assert answer == "sid-1"
    assert site.to("/api/worker")[0].headers["x-statekit-session"] == "sid-1"


def test_kit_url_names_the_session_for_this_origin_only(page: Page) -> None:
    # Fails if kit.url() does not put the tab's session in the query (keeping the
    # path's own query), cannot give a websocket URL, or would make a URL of another
    # origin that carries the session.
    sid = started(page)
    assert page.evaluate("kit.url('/live?room=1')") == f"{APP}/live?room=1&statekit_session={sid}"
    assert page.evaluate("kit.url('/live', { websocket: true })") == (
        f"ws://app.test/live?statekit_session={sid}"
    )
    refused = page.evaluate(
        "() => { try { kit.url('http://other.test/live'); } catch (e) { return e.message; } }"
    )
    assert "this page's origin only" in refused


# -- the examples' page (shop.PAGE) ---------------------------------------------------


def shop_page(site: Site) -> None:
    site.pages["/"] = shop.PAGE


def answer(status: int, body: str, content_type: str = "application/json") -> Handler:
    return lambda route, sent: route.fulfill(status=status, body=body, content_type=content_type)


def error_text(page: Page) -> str:
    return page.text_content("#error") or ""


def test_shop_page_says_when_no_session_opens(page: Page, site: Site) -> None:
    # Fails if the examples' page says nothing when the server refuses to open the
    # tab's session (503), or leaves its buttons working without a session.
    shop_page(site)
    site.handlers["/statekit/open"] = answer(503, '{"error": "busy"}')
    page.goto(APP + "/")
    page.wait_for_function("document.getElementById('error').textContent !== ''")
    assert "503" in error_text(page)
    assert page.is_disabled("#login")
    assert page.is_disabled("[data-item=Milk]")


def test_shop_page_survives_answers_that_are_not_json_and_network_failures(
    page: Page, site: Site
) -> None:
    # Fails if a 502 with an HTML body throws on the page (response.json() on it)
    # instead of saying what happened, or if a request that never reached the server
    # is not shown.
    shop_page(site)
    site.handlers["/api/visit"] = answer(502, "<html>Bad gateway</html>", "text/html")
    page.goto(APP + "/")
    page.wait_for_selector("body[data-ready=yes]")
    assert "502" in error_text(page)
    site.handlers["/api/cart"] = lambda route, sent: route.abort()
    page.click("[data-item=Milk]")
    page.wait_for_function("document.getElementById('error').textContent.includes('reach')")
    site.handlers["/api/cart"] = answer(
        200, json.dumps({"cart": ["Milk"], "cart_size": 1, "user": ""})
    )
    page.click("[data-item=Milk]")
    page.wait_for_selector("#cart-size:has-text('1')")
    assert error_text(page) == ""


def test_shop_page_buttons_wait_for_the_kit(page: Page, site: Site) -> None:
    # Fails if a click before the tab's session is open throws (no kit yet) or sends a
    # request without a session.
    shop_page(site)
    site.handlers["/statekit/open"] = site.hold
    page.goto(APP + "/")
    page.wait_for_selector("[data-item=Milk]")
    assert page.is_disabled("[data-item=Milk]")
    page.click("[data-item=Milk]", force=True)
    assert site.to("/api/cart") == []
    site.release()
    page.wait_for_selector("body[data-ready=yes]")
    assert page.is_enabled("[data-item=Milk]")


def test_a_stream_that_dropped_and_came_back_tells_the_page(page: Page, site: Site) -> None:
    # Fails if a stream that dropped (the server's answer ended without "end") and
    # reconnected by itself leaves the page unaware that changes made meanwhile were
    # not replayed (no statekit:reconnected), or if the first opening already says so.
    watches = 0

    def watch(route: Route, sent: Sent) -> None:
        nonlocal watches
        watches += 1
        change = {"scope": "session", "state": "n", "value": watches, "missed": 0}
        body = f"retry: 50\n\nevent: change\ndata: {json.dumps(change)}\n\n"
        route.fulfill(body=body, content_type="text/event-stream")

    site.handlers["/statekit/watch"] = watch
    started(page, "{}")
    page.evaluate("""() => {
      window.seen = [];
      addEventListener("statekit:change", (e) => seen.push("change " + e.detail.value));
      addEventListener("statekit:reconnected", (e) => seen.push("reconnected"));
      kit.watch();
    }""")
    page.wait_for_function("seen.filter((s) => s === 'reconnected').length >= 2")
    seen = page.evaluate("seen")
    assert seen[:3] == ["change 1", "reconnected", "change 2"]
    page.evaluate("kit.unwatch()")


def test_a_stream_whose_first_connection_failed_is_not_said_to_be_back(
    page: Page, site: Site
) -> None:
    # Fails if a stream whose very first request failed (the server not reachable yet)
    # says statekit:reconnected when it first opens: nothing was missed.
    watches = 0

    def watch(route: Route, sent: Sent) -> None:
        nonlocal watches
        watches += 1
        if watches == 1:
            route.abort()
        else:
            route.fulfill(body="retry: 60000\n\n: idle\n\n", content_type="text/event-stream")

    site.handlers["/statekit/watch"] = watch
    started(page, "{}")
    page.evaluate("""() => {
      window.seen = [];
      window.opens = 0;
      addEventListener("statekit:reconnected", () => seen.push("reconnected"));
      kit.watch();
      kit.stream.addEventListener("open", () => opens++);
    }""")
    page.wait_for_function("opens === 1", timeout=WAIT_MS)
    assert watches == 2
    assert page.evaluate("seen") == []
    page.evaluate("kit.unwatch()")
