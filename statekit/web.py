"""What crosses the wire between a page and the server, for any web framework.

statekit's integrations (ASGI, Flask, Django) and any adapter a host writes itself
share this one description of the wire, so that ``statekit.js`` talks to all of them
alike:

- **A session per tab.** On load, the page asks for a session (``POST
  <prefix>/open``, answered ``{"sid": "..."}``) and keeps its id in page memory, not
  in storage: a refresh or a duplicated tab is a new session. It sends the id with every
  request it makes, in the ``X-Statekit-Session`` header (``fetch``, htmx) or the
  ``statekit_session`` form field (plain forms), and on ``pagehide`` it sends its own id
  to ``<prefix>/close`` with ``navigator.sendBeacon``.
- **A cookie only as a fallback**, for pages without JavaScript: one session per
  *browser* (every tab shares it), opened on a page load that carries no session.
- **Browser state** travels in ``X-Statekit-Browser`` (the page's tokens, a JSON object
  of storage key to token) and comes back in ``X-Statekit-Browser-Set`` (new tokens;
  ``null`` removes a key).
- **Errors the page can act on**: an ended or unknown session is answered ``409`` with
  ``X-Statekit-Session-Ended: <reason>`` and a JSON body; the page can open a new
  session or reload. A busy session or an unavailable store is ``503`` with
  ``Retry-After``.

Everything here is plain data and functions over strings and mappings: no framework is
imported. Reading a request never raises on bad input (a malformed header reads as
absent).

An integration is a :class:`SessionGate` (one per app, over the app's engine) and, per
request, a :class:`Visit`: the gate answers statekit's own endpoints
(:meth:`SessionGate.serve`), the visit gives the handler its session and events with the
page's browser tokens in and out, and says what to add to the response. A host with no
integration of its own (aiohttp, Litestar, a websocket server) writes one from these
two classes in a few lines.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from http.cookies import SimpleCookie
from importlib import resources
from typing import Any, Literal

import attrs

from ._engine import StateEngine
from ._events import Event, EventResult
from .exceptions import (
    SessionBusy,
    SessionExpired,
    SessionNotFound,
    SessionNotInitialized,
    StoreUnavailable,
)

__all__ = [
    "BROWSER_HEADER",
    "BROWSER_SET_HEADER",
    "CLOSE_PATH",
    "ENDED_HEADER",
    "OPEN_PATH",
    "PREFIX",
    "SCRIPT_PATH",
    "SESSION_COOKIE",
    "SESSION_FIELD",
    "SESSION_HEADER",
    "Answer",
    "Incoming",
    "SessionGate",
    "Visit",
    "answer_for",
    "browser_set_value",
    "browser_tokens",
    "is_page_load",
    "opened",
    "read_request",
    "script",
]

#: Where an integration serves the page's endpoints, by default.
PREFIX = "/statekit"
#: ``POST <prefix>/open``: open a session for a tab; answered ``{"sid": ...}``.
OPEN_PATH = "/open"
#: ``POST <prefix>/close`` with the session id as the body: the tab was closed.
CLOSE_PATH = "/close"
#: ``GET <prefix>/statekit.js``: the page's helper.
SCRIPT_PATH = "/statekit.js"

SESSION_HEADER = "X-Statekit-Session"
SESSION_FIELD = "statekit_session"
SESSION_COOKIE = "statekit_session"
BROWSER_HEADER = "X-Statekit-Browser"
BROWSER_SET_HEADER = "X-Statekit-Browser-Set"
ENDED_HEADER = "X-Statekit-Session-Ended"

#: The largest header value read for browser tokens (a page's tokens are small).
_MAX_TOKENS_BYTES = 256 * 1024


@attrs.frozen(kw_only=True)
class Incoming:
    """What a request carries for statekit.

    Attributes:
        sid: the session id it names, or None.
        source: where the id came from: ``"header"`` (statekit.js), ``"field"`` (a
            form), ``"cookie"`` (the no-JavaScript fallback), or None.
        tokens: the page's browser-state tokens, by storage key.
    """

    sid: str | None
    source: Literal["header", "field", "cookie"] | None
    tokens: Mapping[str, str] = attrs.field(factory=dict)


def _lower(mapping: Mapping[str, str]) -> dict[str, str]:
    return {str(k).lower(): v for k, v in mapping.items()}


def read_request(
    headers: Mapping[str, str],
    *,
    cookies: Mapping[str, str] | None = None,
    form: Mapping[str, Any] | None = None,
) -> Incoming:
    """What a request carries: its session id (the header first, then a form field,
    then the cookie) and its browser tokens. Never raises: a value that is not a
    string, or a malformed tokens header, reads as absent.

    Args:
        headers: the request's headers (any case).
        cookies: its cookies, if the host reads them.
        form: its form fields, if the host has parsed them (statekit never reads a
            request's body itself).
    """
    lowered = _lower(headers)
    tokens = browser_tokens(lowered.get(BROWSER_HEADER.lower()))
    for source, value in (
        ("header", lowered.get(SESSION_HEADER.lower())),
        ("field", (form or {}).get(SESSION_FIELD)),
        ("cookie", (cookies or {}).get(SESSION_COOKIE)),
    ):
        if isinstance(value, str) and value:
            return Incoming(sid=value, source=source, tokens=tokens)  # type: ignore[arg-type]
    return Incoming(sid=None, source=None, tokens=tokens)


def browser_tokens(value: str | bytes | None) -> dict[str, str]:
    """The tokens in an ``X-Statekit-Browser`` header: a JSON object of storage key to
    token. Anything else (absent, too long, not JSON, not an object) reads as none, and
    entries whose key or token is not a string are left out."""
    if value is None:
        return {}
    if isinstance(value, bytes):
        try:
            value = value.decode("latin-1")
        except ValueError:  # pragma: no cover - latin-1 decodes every byte
            return {}
    if not isinstance(value, str) or len(value) > _MAX_TOKENS_BYTES:
        return {}
    try:
        raw = json.loads(value)
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


def browser_set_value(tokens: Mapping[str, str | None]) -> str | None:
    """The ``X-Statekit-Browser-Set`` header value for new tokens (``None`` removes a
    key), or None when there are none to send."""
    if not tokens:
        return None
    return json.dumps(dict(tokens), separators=(",", ":"))


def is_page_load(method: str, headers: Mapping[str, str]) -> bool:
    """Whether a request is a browser loading a page (a ``GET`` that accepts HTML and
    was not sent by statekit.js): where the cookie fallback opens a session."""
    lowered = _lower(headers)
    return (
        method.upper() == "GET"
        and "text/html" in str(lowered.get("accept", ""))
        and SESSION_HEADER.lower() not in lowered
    )


@attrs.frozen(kw_only=True)
class Answer:
    """A response an integration sends for statekit: status, headers, JSON body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def _json_answer(status: int, body: Mapping[str, Any], **headers: str) -> Answer:
    return Answer(
        status=status,
        headers={"Content-Type": "application/json", **headers},
        body=json.dumps(dict(body), separators=(",", ":")).encode(),
    )


def opened(sid: str) -> Answer:
    """The answer to ``POST <prefix>/open``."""
    return _json_answer(200, {"sid": sid}, **{"Cache-Control": "no-store"})


def answer_for(exc: BaseException) -> Answer | None:
    """The answer the page can act on for an error statekit raised in a request, or
    None for an error that is the host's to handle (a bug, a bad value).

    - :class:`~statekit.SessionNotFound` (ended, unknown, damaged): ``409``, with
      ``X-Statekit-Session-Ended`` naming the reason (``unknown`` when the id was never
      known, ``missing`` when the request named none): open a new session, or reload.
    - :class:`~statekit.SessionNotInitialized` for a session that was closed (its
      per-session objects were cleaned up): ``409``, reason ``closed``. One for a
      session whose object was never made is the host's to handle.
    - :class:`~statekit.SessionBusy`: ``503``, ``Retry-After: 1``.
    - :class:`~statekit.StoreUnavailable`: ``503``, ``Retry-After: 1``.

    Messages go in the body; they never hold a whole session id.
    """
    if isinstance(exc, SessionNotFound):
        if isinstance(exc, SessionExpired):
            reason = exc.reason
        else:
            reason = "unknown" if exc.sid else "missing"
        return _json_answer(
            409,
            {"error": "session_ended", "reason": reason, "detail": str(exc)},
            **{ENDED_HEADER: reason},
        )
    if isinstance(exc, SessionNotInitialized) and exc.closed:
        # The tab's per-session object went with its session: the page was closed.
        return _json_answer(
            409,
            {"error": "session_ended", "reason": "closed", "detail": str(exc)},
            **{ENDED_HEADER: "closed"},
        )
    if isinstance(exc, SessionBusy):
        return _json_answer(503, {"error": "busy", "detail": str(exc)}, **{"Retry-After": "1"})
    if isinstance(exc, StoreUnavailable):
        return _json_answer(
            503, {"error": "unavailable", "detail": str(exc)}, **{"Retry-After": "1"}
        )
    return None


def script() -> bytes:
    """The text of ``statekit.js``, the page's helper, to serve at
    ``<prefix>/statekit.js``."""
    return resources.files("statekit.static").joinpath("statekit.js").read_bytes()


#: The longest body ``<prefix>/close`` reads (an id is 32 characters).
_MAX_CLOSE_BYTES = 256

_Endpoint = Literal["script", "open", "close"]


def _cookie_header(name: str, value: str, *, secure: bool, max_age: int | None = None) -> str:
    cookie: SimpleCookie = SimpleCookie()
    cookie[name] = value
    morsel = cookie[name]
    morsel["path"] = "/"
    morsel["httponly"] = True
    morsel["samesite"] = "Lax"
    if secure:
        morsel["secure"] = True
    if max_age is not None:
        morsel["max-age"] = max_age
    return morsel.OutputString()


class SessionGate:
    """Where an app's requests meet its engine: one per app.

    Args:
        engine: the app's engine.
        prefix: where statekit's endpoints live (``<prefix>/open``, ``/close``,
            ``/statekit.js``).
        cookie: whether a page load with no session of its own may open one kept in a
            cookie (the fallback for pages without JavaScript: one session per
            *browser*). With ``cookie=False`` such a request is answered as having no
            session.
        cookie_name: the fallback cookie's name.

    Example, in a host with no integration of its own::

        gate = SessionGate(engine)
        answer = await gate.aserve(method, path, body)  # statekit's own endpoints
        if answer is None:
            visit = gate.visit(method, headers, cookies=cookies)
            async with visit.aevent() as ev:
                ...
            extra_headers = visit.response_headers()
    """

    def __init__(
        self,
        engine: StateEngine,
        *,
        prefix: str = PREFIX,
        cookie: bool = True,
        cookie_name: str = SESSION_COOKIE,
    ) -> None:
        if not isinstance(engine, StateEngine):
            raise TypeError(
                f"SessionGate takes a StateEngine, got {type(engine).__name__}: pass the "
                "app's engine"
            )
        if not isinstance(prefix, str) or not prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(
                f"prefix must be a path that starts with '/' and does not end with one "
                f"(like {PREFIX!r}), got {prefix!r}"
            )
        self.engine = engine
        self.prefix = prefix
        self.cookie = cookie
        self.cookie_name = cookie_name
        self._paths: dict[str, _Endpoint] = {
            prefix + SCRIPT_PATH: "script",
            prefix + OPEN_PATH: "open",
            prefix + CLOSE_PATH: "close",
        }

    def __repr__(self) -> str:
        return f"SessionGate(prefix={self.prefix!r}, cookie={self.cookie})"

    # -- statekit's own endpoints ----------------------------------------------------

    def endpoint(self, path: str) -> _Endpoint | None:
        """Which of statekit's endpoints a path is, or None for the app's own."""
        return self._paths.get(path)

    def serve(self, method: str, path: str, body: bytes = b"") -> Answer | None:
        """The answer to a request for one of statekit's endpoints, or None when the
        path is the app's. ``body`` is only read for ``<prefix>/close``."""
        endpoint, refused = self._check(method, path)
        if endpoint is None or refused is not None:
            return refused
        if endpoint == "script":
            return _script_answer()
        if endpoint == "open":
            return self._answer_or_raise(self.engine.open_session)
        sid = _close_body(body)
        if sid is not None:
            # A beacon cannot act on an answer: an unknown id is no error.
            with contextlib.suppress(SessionNotFound):
                self.engine.close_session(sid)
        return _closed()

    async def aserve(self, method: str, path: str, body: bytes = b"") -> Answer | None:
        """:meth:`serve` with the engine's async calls (never blocks the event loop)."""
        endpoint, refused = self._check(method, path)
        if endpoint is None or refused is not None:
            return refused
        if endpoint == "script":
            return _script_answer()
        if endpoint == "open":
            try:
                return opened(await self.engine.aopen_session())
            except (SessionBusy, StoreUnavailable) as exc:
                return answer_for(exc)
        sid = _close_body(body)
        if sid is not None:
            with contextlib.suppress(SessionNotFound):
                await self.engine.aclose_session(sid)
        return _closed()

    def _check(self, method: str, path: str) -> tuple[_Endpoint | None, Answer | None]:
        endpoint = self._paths.get(path)
        if endpoint is None:
            return None, None
        wanted = "GET" if endpoint == "script" else "POST"
        allowed = ("GET", "HEAD") if wanted == "GET" else ("POST",)
        if method.upper() not in allowed:
            return endpoint, _json_answer(
                405,
                {"error": "method_not_allowed", "detail": f"{path} takes {wanted}"},
                Allow=", ".join(allowed),
            )
        return endpoint, None

    @staticmethod
    def _answer_or_raise(call: Any) -> Answer:
        try:
            return opened(call())
        except (SessionBusy, StoreUnavailable) as exc:
            answer = answer_for(exc)
            assert answer is not None
            return answer

    # -- the app's requests ----------------------------------------------------------

    def visit(
        self,
        method: str,
        headers: Mapping[str, str],
        *,
        cookies: Mapping[str, str] | None = None,
        form: Mapping[str, Any] | None = None,
        secure: bool = False,
    ) -> Visit:
        """One request of the app's, as statekit sees it.

        Args:
            method: the request's method.
            headers: its headers (any case).
            cookies: its cookies (the fallback cookie is read only when ``cookie`` is on).
            form: its parsed form fields, if any (for the ``statekit_session`` field).
            secure: whether it came over HTTPS (the fallback cookie is then ``Secure``).
        """
        incoming = read_request(
            headers, cookies={} if not self.cookie else _only(cookies, self.cookie_name), form=form
        )
        return Visit(self, incoming, page_load=is_page_load(method, headers), secure=secure)


def _only(cookies: Mapping[str, str] | None, name: str) -> dict[str, str]:
    if not cookies or name not in cookies:
        return {}
    return {SESSION_COOKIE: cookies[name]}


def _close_body(body: bytes | str) -> str | None:
    if isinstance(body, str):
        body = body.encode("latin-1", "replace")
    if not body or len(body) > _MAX_CLOSE_BYTES:
        return None
    try:
        text = body.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    return text or None


def _closed() -> Answer:
    return Answer(status=204, headers={"Cache-Control": "no-store"}, body=b"")


def _script_answer() -> Answer:
    return Answer(
        status=200,
        headers={"Content-Type": "text/javascript; charset=utf-8", "Cache-Control": "no-cache"},
        body=script(),
    )


class Visit:
    """One request of the app's, as statekit sees it: its session, its browser tokens,
    and what to add to the response. Made by :meth:`SessionGate.visit`; integrations
    hand it to the handler.

    Attributes:
        incoming: what the request carried (session id, where from, tokens).
        page_load: whether it is a browser loading a page.
    """

    def __init__(self, gate: SessionGate, incoming: Incoming, *, page_load: bool, secure: bool):
        self.gate = gate
        self.incoming = incoming
        self.page_load = page_load
        self._secure = secure
        self._sid: str | None = incoming.sid
        self._tokens: dict[str, str] = dict(incoming.tokens)
        self._sent: dict[str, str | None] = {}
        self._cookie: str | None = None
        self._checked = False

    def __repr__(self) -> str:
        return f"Visit(source={self.incoming.source!r}, page_load={self.page_load})"

    @property
    def wants_form(self) -> bool:
        """Whether the session may be in the request's form (the request named none in
        a header): an integration then reads the form, when it is one, and passes it
        to :meth:`use_form`."""
        return self.incoming.source in (None, "cookie") and not self._checked

    def use_form(self, form: Mapping[str, Any]) -> None:
        """Take the session from a form's ``statekit_session`` field (a page's hidden
        field), when the request named none in a header."""
        value = form.get(SESSION_FIELD) if isinstance(form, Mapping) else None
        if self.wants_form and isinstance(value, str) and value:
            self.incoming = attrs.evolve(self.incoming, sid=value, source="field")
            self._sid = value

    @property
    def tokens(self) -> Mapping[str, str]:
        """The browser tokens for this request's events: those the page sent, updated
        by the request's events so far."""
        return self._tokens

    # -- the session -------------------------------------------------------------------

    def session(self) -> str:
        """The request's session id: the one the page sent, or, on a page load with the
        cookie fallback on, the browser's cookie session (opened now if it has none or
        its session ended).

        Raises:
            SessionNotFound: the request names no session and may not open one (it is
                not a page load, or the fallback is off).
        """
        if self._fallback_needed():
            self._checked = True
            if self._sid is None or not self.gate.engine.exists(self._sid):
                self._opened(self.gate.engine.open_session())
        return self._named()

    async def asession(self) -> str:
        """:meth:`session` with the engine's async calls."""
        if self._fallback_needed():
            self._checked = True
            if self._sid is None or not await self.gate.engine.aexists(self._sid):
                self._opened(await self.gate.engine.aopen_session())
        return self._named()

    def _fallback_needed(self) -> bool:
        return (
            self.gate.cookie
            and self.page_load
            and self.incoming.source in (None, "cookie")
            and not self._checked
        )

    def _opened(self, sid: str) -> None:
        self._sid = sid
        self._cookie = _cookie_header(self.gate.cookie_name, sid, secure=self._secure)

    def _named(self) -> str:
        if self._sid is None:
            raise SessionNotFound(
                None,
                "the request names no session (statekit.js sends it in the "
                f"{SESSION_HEADER} header; a form sends it in the {SESSION_FIELD!r} field)",
            )
        return self._sid

    # -- events ------------------------------------------------------------------------

    @contextlib.contextmanager
    def event(self, *, bind: str = "") -> Iterator[Event]:
        """``engine.event`` on the request's session with the page's browser tokens; the
        tokens the event makes go back with the response."""
        with self.gate.engine.event(self.session(), browser=self._tokens, bind=bind) as ev:
            yield ev
        self.keep(ev.result)

    @contextlib.asynccontextmanager
    async def aevent(self, *, bind: str = "") -> AsyncIterator[Event]:
        """``engine.aevent`` on the request's session with the page's browser tokens; the
        tokens the event makes go back with the response."""
        sid = await self.asession()
        async with self.gate.engine.aevent(sid, browser=self._tokens, bind=bind) as ev:
            yield ev
        self.keep(ev.result)

    def keep(self, result: EventResult) -> None:
        """Send back the browser tokens an event made (for events the handler opened
        with ``engine.event`` itself)."""
        self._tokens.update(result.browser)
        self._sent.update(result.browser)

    # -- the response ------------------------------------------------------------------

    def response_headers(self) -> list[tuple[str, str]]:
        """The headers to add to the response: new browser tokens, and the fallback
        cookie when this request opened its session."""
        out: list[tuple[str, str]] = []
        value = browser_set_value(self._sent)
        if value is not None:
            out.append((BROWSER_SET_HEADER, value))
        if self._cookie is not None:
            out.append(("Set-Cookie", self._cookie))
        return out

    def answer(self, exc: BaseException) -> Answer | None:
        """:func:`answer_for` this request: an ended session kept in the fallback
        cookie also clears the cookie, so that the next page load opens a new one."""
        answer = answer_for(exc)
        if (
            answer is not None
            and answer.status == 409
            and self.incoming.source == "cookie"
            and self._cookie is None
        ):
            clear = _cookie_header(self.gate.cookie_name, "", secure=self._secure, max_age=0)
            answer = attrs.evolve(answer, headers={**answer.headers, "Set-Cookie": clear})
        return answer
