"""A simulated browser: tabs that speak ``statekit.js``'s wire to an app through its
framework's own test client, with one shared ``localStorage``, close beacons and
restarts; no server, no sleeps."""

from __future__ import annotations

import contextlib
import json as _json
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

from typing_extensions import Self

from statekit import web
from statekit.exceptions import StateError, UsageError, redact

#: What a transport answers: status, headers (a mapping or (name, value) pairs), body.
TransportAnswer = tuple[int, Mapping[str, str] | Iterable[tuple[str, str]], bytes | str]
#: A way to send one request to an app: ``(method, url, headers, body) -> answer``.
Transport = Callable[[str, str, dict[str, str], bytes], TransportAnswer]

#: What a browser's address bar sends when it loads a page.
#: The answers a browser follows to another page, and how many in a row at most.
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 10
PAGE_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
#: The key prefix statekit.js stores tokens under in ``localStorage``.
STORAGE_PREFIX = "statekit:"
_MISSING: Any = object()

__all__ = [
    "Browser",
    "BrowserError",
    "Headers",
    "Response",
    "Tab",
    "Transport",
    "TransportAnswer",
    "transport_for",
]


class BrowserError(StateError, RuntimeError):
    """The app did not answer as a page using statekit.js needs it to: the page did not
    load, or ``<prefix>/open`` gave no session.

    Attributes:
        response: the answer that was refused.
    """

    def __init__(self, message: str, response: Response) -> None:
        super().__init__(message)
        self.response = response


def transport_for(client: object) -> Transport:
    """A transport over a framework's own test client, found by what it offers (no
    framework is imported):

    - Django's ``django.test.Client`` (it has ``generic``);
    - Flask's ``app.test_client()``, or any Werkzeug test client (``open`` and
      ``application``);
    - Starlette's or FastAPI's ``TestClient``, or any httpx-like client (``request``
      taking ``content=``);
    - or a callable transport itself, returned as it is.

    Raises:
        TypeError: ``client`` is none of these.
    """
    generic = getattr(client, "generic", None)
    if callable(generic):
        return _django_transport(generic)
    opener = getattr(client, "open", None)
    if callable(opener) and hasattr(client, "application"):
        return _werkzeug_transport(opener)
    request = getattr(client, "request", None)
    if callable(request):
        return _httpx_transport(request)
    if callable(client):
        return client
    raise TypeError(
        f"Browser needs a test client (Starlette/FastAPI TestClient, Flask test_client(), "
        f"django.test.Client) or a transport (method, url, headers, body) -> (status, "
        f"headers, body); got {type(client).__name__}"
    )


def _django_transport(generic: Callable[..., Any]) -> Transport:
    def send(method: str, url: str, headers: dict[str, str], body: bytes) -> TransportAnswer:
        others = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        kind = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
        extra = {"content_type": kind} if kind is not None else {}
        response = generic(method, url, data=body, headers=others, **extra)
        if getattr(response, "streaming", False):
            content = b"".join(response.streaming_content)
        else:
            content = response.content
        # Django keeps the cookies a response sets apart from its headers.
        cookies = [("Set-Cookie", morsel.OutputString()) for morsel in response.cookies.values()]
        return response.status_code, [*response.headers.items(), *cookies], content

    return send


def _werkzeug_transport(opener: Callable[..., Any]) -> Transport:
    def send(method: str, url: str, headers: dict[str, str], body: bytes) -> TransportAnswer:
        response = opener(url, method=method, headers=headers, data=body)
        try:
            return response.status_code, list(response.headers.items()), response.get_data()
        finally:
            response.close()

    return send


def _httpx_transport(request: Callable[..., Any]) -> Transport:
    def send(method: str, url: str, headers: dict[str, str], body: bytes) -> TransportAnswer:
        # Redirects come back to the browser, as from the other clients: it follows a
        # page's itself (its address is then the last one).
        response = request(method, url, headers=headers, content=body, follow_redirects=False)
        multi = getattr(response.headers, "multi_items", None)
        pairs = multi() if callable(multi) else list(response.headers.items())
        return response.status_code, pairs, response.content

    return send


#: The hosts test clients give the app they drive: a redirect to an absolute URL on one
#: of them stays on the app.
_LOCAL_HOSTS = frozenset({"testserver", "localhost", "127.0.0.1", "[::1]"})


def _followed(current: str, location: str, page: Response) -> str:
    """Where a redirect from ``current`` to ``location`` leads, resolved as a browser
    resolves it (``done`` from ``/cart/add`` is ``/cart/done``), as a path on the app.

    Raises:
        BrowserError: the redirect leads to another site, which a Browser (that talks to
            one app) cannot follow.
    """
    parts = urlsplit(urljoin(current, location))
    if parts.netloc and parts.hostname not in _LOCAL_HOSTS and parts.netloc not in _LOCAL_HOSTS:
        raise BrowserError(
            f"the page {current} redirected to another site ({location}): a Browser talks "
            "to one app; check the redirect's target in the test instead",
            page,
        )
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class Headers(Mapping[str, str]):
    """A response's headers: read in any case; a repeated header reads as its values
    joined by ``", "`` (:meth:`get_all` gives them one by one)."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._pairs = [(str(k), str(v)) for k, v in pairs]
        self._joined: dict[str, str] = {}
        for key, value in self._pairs:
            low = key.lower()
            self._joined[low] = f"{self._joined[low]}, {value}" if low in self._joined else value

    def __getitem__(self, name: str) -> str:
        return self._joined[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._joined

    def __iter__(self) -> Iterator[str]:
        return iter(self._joined)

    def __len__(self) -> int:
        return len(self._joined)

    def __repr__(self) -> str:
        return f"Headers({self._pairs!r})"

    def get_all(self, name: str) -> list[str]:
        """Every value of a header, in order."""
        return [v for k, v in self._pairs if k.lower() == name.lower()]


class Response:
    """An app's answer to a tab.

    Attributes:
        status: the HTTP status.
        headers: the headers (:class:`Headers`, any case).
        body: the body, as bytes.
        method, url: the request it answers.
    """

    def __init__(self, method: str, url: str, status: int, headers: Headers, body: bytes) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"<Response {self.status} to {self.method} {self.url}>"

    @property
    def ok(self) -> bool:
        """Whether the status is 2xx."""
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        """The body, decoded as UTF-8."""
        return self.body.decode("utf-8", "replace")

    @property
    def ended(self) -> str | None:
        """Why the tab's session ended, when the answer says it did (the reason in
        ``X-Statekit-Session-Ended``, sent with a ``409``), else None."""
        return self.headers.get(web.ENDED_HEADER) or None

    def json(self) -> Any:
        """The body, read as JSON.

        Raises:
            ValueError: it is not JSON (the message shows its start).
        """
        try:
            return _json.loads(self.body)
        except ValueError:
            raise ValueError(
                f"{self.method} {self.url} answered {self.status} with a body that is not "
                f"JSON: {self.body[:80]!r}"
            ) from None


class Browser:
    """A simulated browser that speaks statekit's wire exactly as ``statekit.js`` does,
    through a framework's own test client: no server, no sleeps.

    Each :meth:`open` is a tab loading a page: it gets the page, then opens the tab's
    own session (``POST <prefix>/open``), kept by the tab only (a reload is a new
    session). The tabs share one :attr:`local_storage`, where browser-state tokens are
    kept as statekit.js keeps them (under ``"statekit:" + key``), for the storage keys
    the page names (``keys``, as in ``StateKit.start({keys})``): what one tab stores,
    every tab sends. Closing a tab sends the close beacon for its own session.

    Args:
        client: the app's test client (Starlette/FastAPI ``TestClient``, Flask
            ``app.test_client()``, ``django.test.Client``) or a transport, a callable
            ``(method, url, headers, body) -> (status, headers, body)``; see
            :func:`transport_for`.
        prefix: where the app serves statekit's endpoints.
        keys: the storage keys the page's statekit.js manages, as the page passes them
            to ``StateKit.start({keys})``; none by default, as in statekit.js (tokens of
            other keys the app sets are neither kept nor sent).
        local_storage: the storage to start with, such as another browser's
            :attr:`local_storage` (the same browser after a restart).

    Example::

        browser = Browser(TestClient(app), keys=["login"])
        one, two = browser.open("/"), browser.open("/")
        one.post("/api/cart", json={"item": "Milk"})
        two.close()
        assert one.post("/api/cart", json={"item": "Water"}).json()["cart"] == ["Milk", "Water"]

    Not thread-safe: drive a browser from one thread.
    """

    def __init__(
        self,
        client: object,
        *,
        prefix: str = web.PREFIX,
        keys: Iterable[str] = (),
        local_storage: dict[str, str] | None = None,
    ) -> None:
        self._send = transport_for(client)
        self.prefix = prefix
        if isinstance(keys, str):
            raise TypeError(f"keys is a list of storage keys, such as [{keys!r}]")
        self.keys = tuple(keys)
        #: The browser's ``localStorage``, shared by its tabs.
        self.local_storage: dict[str, str] = {} if local_storage is None else local_storage
        self.tabs: list[Tab] = []
        self._opened = 0

    def __repr__(self) -> str:
        open_tabs = sum(1 for tab in self.tabs if not tab.closed)
        return f"Browser(prefix={self.prefix!r}, tabs={open_tabs}, stored={sorted(self.tokens)!r})"

    @property
    def tokens(self) -> dict[str, str]:
        """The browser-state tokens the tabs send, by storage key."""
        return {
            key[len(STORAGE_PREFIX) :]: token
            for key, token in self.local_storage.items()
            if key.startswith(STORAGE_PREFIX) and self._manages(key[len(STORAGE_PREFIX) :])
        }

    def open(self, path: str = "/") -> Tab:
        """Open a tab on a page: get it (as a browser loads a page), then open the tab's
        session as statekit.js does.

        Raises:
            BrowserError: the page did not load (not 2xx), or the app gave no session.
        """
        self._opened += 1
        tab = Tab(self, self._opened, path)
        tab.go(path)
        self.tabs.append(tab)
        return tab

    def restart(self, client: object) -> Self:
        """The server restarted: from now on this browser talks to ``client`` (the new
        app). Its tabs stay open with the sessions they had, and its local storage is
        as it was, as in a real browser: a tab's next action tells whether its session
        survived (on a shared store it does), and browser state reads back when the new
        app has the same secrets."""
        self._send = transport_for(client)
        return self

    def close(self) -> None:
        """Close every open tab (each sends its close beacon)."""
        for tab in self.tabs:
            if not tab.closed:
                tab.close()

    # -- what the tabs share -----------------------------------------------------------

    def _manages(self, key: str) -> bool:
        return key in self.keys

    def store_tokens(self, value: str | None) -> None:
        """Keep the tokens of an ``X-Statekit-Browser-Set`` header value, as statekit.js
        does (``null`` removes a key; a value that is not a JSON object is not
        statekit's: left alone)."""
        try:
            update = _json.loads(value) if value is not None else None
        except ValueError:
            return
        for key, token in update.items() if isinstance(update, dict) else ():
            if self._manages(key) and token is None:
                self.local_storage.pop(STORAGE_PREFIX + key, None)
            elif self._manages(key):
                self.local_storage[STORAGE_PREFIX + key] = str(token)

    def send(self, method: str, url: str, headers: dict[str, str], body: bytes) -> Response:
        """Send one request as it is, with none of statekit.js's headers (what a tab
        sends goes through here)."""
        status, answer_headers, content = self._send(method, url, headers, body)
        pairs = answer_headers.items() if isinstance(answer_headers, Mapping) else answer_headers
        if isinstance(content, str):
            content = content.encode()
        return Response(method, url, int(status), Headers(pairs), bytes(content))


class Tab:
    """A browser tab with a page that runs statekit.js: made by :meth:`Browser.open`.

    Attributes:
        browser: its browser.
        number: its number in the browser (1 for the first tab opened).
        path: the page it shows.
        sid: its session id (page memory only: a reload gets a new one).
        ended: why its session ended, once an answer said so (``409`` with
            ``X-Statekit-Session-Ended``: what statekit.js reports as the
            ``statekit:ended`` event), else None. A reload clears it.
        closed: whether it was closed.
        page: the page's last load.
    """

    def __init__(self, browser: Browser, number: int, path: str) -> None:
        self.browser = browser
        self.number = number
        self.path = path
        self.sid = ""
        self.ended: str | None = None
        self.closed = False
        self.page: Response | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"ended={self.ended!r}" if self.ended else "open"
        return f"Tab({self.number}, path={self.path!r}, sid={redact(self.sid)}, {state})"

    # -- the page's life ---------------------------------------------------------------

    def _navigate(self, method: str, url: str, headers: dict[str, str], body: bytes) -> Response:
        """The tab goes to another page, as a browser does: the request goes (following
        redirects), the answer replaces the page, so the old page's close beacon goes
        (``pagehide``), then the new page's statekit.js opens a session."""
        self._check_open()
        page = self.browser.send(method, url, headers, body)
        for _ in range(MAX_REDIRECTS):
            location = page.headers.get("Location")
            if page.status not in REDIRECTS or not location:
                break
            url = _followed(url, location, page)
            if page.status in (307, 308):
                page = self.browser.send(method, url, headers, body)
            else:
                method, body = "GET", b""
                page = self.browser.send("GET", url, {"Accept": PAGE_ACCEPT}, b"")
        self._beacon()
        self.sid = ""
        self.page = page
        self.path = url
        if not page.ok:
            raise BrowserError(
                f"the page {url} did not load: {method} answered {page.status} {page.body[:80]!r}",
                page,
            )
        self._open_session()
        return page

    def _open_session(self) -> None:
        url = self.browser.prefix + web.OPEN_PATH
        opened = self.browser.send("POST", url, {"Accept": "*/*"}, b"")
        sid = None
        if opened.status == 200:
            with contextlib.suppress(ValueError):
                answer = opened.json()
                sid = answer.get("sid") if isinstance(answer, dict) else None
        if not isinstance(sid, str) or not sid:
            hint = f": is statekit's integration installed, with prefix {self.browser.prefix!r}?"
            raise BrowserError(
                f"POST {url} gave the tab no session: {opened.status} {opened.body[:80]!r}"
                + (hint if opened.status == 404 else ""),
                opened,
            )
        self.sid = sid
        self.ended = None

    def reopen(self) -> None:
        """Open a new session for the tab without reloading, as ``kit.reopen()`` does
        (after ``statekit:ended``, say); the page stays. A session that is still live
        (no answer said it ended) is closed first, with its beacon.

        Raises:
            UsageError: the tab is closed.
            BrowserError: the app gave no session.
        """
        self._check_open()
        if self.ended is None:
            self._beacon()
        self.sid = ""
        self._open_session()

    def go(self, path: str) -> Response:
        """Go to another page in this tab, as following a link does: the page is got
        (redirects followed), the old page's close beacon goes, the new page opens a new
        session.

        Raises:
            UsageError: the tab is closed.
            BrowserError: the page did not load (not 2xx), or the app gave no session.
        """
        return self._navigate("GET", path, {"Accept": PAGE_ACCEPT}, b"")

    def reload(self) -> None:
        """Reload the page in a browser's order: the page is got again, then the old
        page's close beacon goes (``pagehide``, as the new page replaces it), then the
        new page opens a new session.

        Raises:
            UsageError: the tab is closed.
            BrowserError: the page did not load (not 2xx; the old session is closed all
                the same), or the app gave no session.
        """
        self._navigate("GET", self.path, {"Accept": PAGE_ACCEPT}, b"")

    def submit(self, url: str, fields: Mapping[str, str] | None = None) -> Response:
        """Submit a plain HTML form of the page (``method="post"``), as a browser does:
        a urlencoded body with ``fields`` and the ``statekit_session`` hidden field
        statekit.js filled, and none of statekit.js's headers (no session header, no
        browser tokens: a form cannot send them, nor read the tokens its answer
        carries). The answer is the tab's new page (redirects followed), so the old
        page's close beacon goes after it, and the new page opens a new session.

        Args:
            url: the form's ``action``.
            fields: the form's other fields.

        Returns:
            The answer (after redirects): the tab's new page.

        Raises:
            UsageError: the tab is closed.
            BrowserError: the answer is not 2xx (the old session is closed all the
                same), or the app gave the new page no session.

        Example::

            page = tab.submit("/cart", {"item": "Milk"})
            assert "Milk" in page.text
        """
        self._check_open()
        body = urlencode({**(fields or {}), web.SESSION_FIELD: self.sid}).encode()
        headers = {
            "Accept": PAGE_ACCEPT,
            "Content-Type": "application/x-www-form-urlencoded",
            "Sec-Fetch-Site": "same-origin",  # the app's own page
        }
        return self._navigate("POST", url, headers, body)

    def close(self) -> None:
        """Close the tab: statekit.js sends the close beacon for its own session.

        Raises:
            UsageError: the tab is already closed.
        """
        self._beacon()
        self.closed = True

    def _beacon(self) -> None:
        self._check_open()
        if not self.sid:
            return  # a tab whose page never opened a session sends none
        self.browser.send(
            "POST",
            self.browser.prefix + web.CLOSE_PATH,
            {"Content-Type": "text/plain;charset=UTF-8"},
            self.sid.encode(),
        )

    def _check_open(self) -> None:
        if self.closed:
            raise UsageError(
                f"tab {self.number} ({self.path}) was closed: open another with browser.open()"
            )

    # -- the page's requests (statekit.js's kit.fetch) ---------------------------------

    def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = _MISSING,
        form: Mapping[str, str] | None = None,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send a request as the page's ``kit.fetch`` does: with the tab's session
        (``X-Statekit-Session``) and the browser's stored tokens
        (``X-Statekit-Browser``); new tokens in the answer are stored for every tab,
        and an answer saying the session ended sets :attr:`ended`.

        Args:
            method: the HTTP method.
            url: the app's path (a query string may follow).
            json: a value sent as a JSON body.
            form: fields sent as a urlencoded form body.
            body: a raw body (set its ``Content-Type`` in ``headers``).
            headers: more headers.

        Raises:
            UsageError: the tab is closed, or more than one body was given.
        """
        self._check_open()
        if sum([json is not _MISSING, form is not None, body is not None]) > 1:
            raise UsageError("give one body: json=, form= or body=")
        sent: dict[str, str] = {"Accept": "*/*"}
        payload = b""
        if json is not _MISSING:
            sent["Content-Type"] = "application/json"
            payload = _json.dumps(json).encode()
        elif form is not None:
            sent["Content-Type"] = "application/x-www-form-urlencoded;charset=UTF-8"
            payload = urlencode(form).encode()
        elif body is not None:
            payload = body.encode() if isinstance(body, str) else body
        ours = {
            web.SESSION_HEADER: self.sid,
            web.BROWSER_HEADER: _json.dumps(self.browser.tokens, separators=(",", ":")),
        }
        for name, value in [*(headers or {}).items(), *ours.items()]:  # set in any case
            sent = {k: v for k, v in sent.items() if k.lower() != name.lower()}
            sent[name] = value
        response = self.browser.send(method.upper(), url, sent, payload)
        self.browser.store_tokens(response.headers.get(web.BROWSER_SET_HEADER))
        if response.ended is not None:
            self.ended = response.ended
        return response

    def get(self, url: str, **kwargs: Any) -> Response:
        """:meth:`request` with ``GET``."""
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Response:
        """:meth:`request` with ``POST``."""
        return self.request("POST", url, **kwargs)
