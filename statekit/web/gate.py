"""Where an app's requests meet its engine: :class:`SessionGate` (one per app, answers
statekit's own endpoints) and :class:`Visit` (one per request: its session, events with
the page's browser tokens in and out, what to add to the response)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from http.cookies import SimpleCookie
from types import TracebackType
from typing import Any, Literal, TypeAlias

import attrs

from statekit._engine import StateEngine
from statekit._events import Event, EventResult
from statekit._states import GlobalState
from statekit._watch import Watch, global_names
from statekit.exceptions import (
    SessionBusy,
    SessionNotFound,
    SessionNotInitialized,
    StoreUnavailable,
    UsageError,
)
from statekit.web.wire import (
    BROWSER_HEADER,
    BROWSER_SET_HEADER,
    CLOSE_PATH,
    OPEN_PATH,
    PREFIX,
    SCRIPT_PATH,
    SESSION_COOKIE,
    SESSION_FIELD,
    SESSION_HEADER,
    WATCH_PATH,
    Answer,
    Incoming,
    answer_for,
    browser_set_value,
    is_cross_site,
    is_page_load,
    json_answer,
    opened,
    read_request,
    script_answer,
    visit_headers,
)

__all__ = ["FormSource", "SessionGate", "Visit", "VisitEvent"]

logger = logging.getLogger("statekit")

#: A form, or how to read one when it is needed (an integration's loader, which may be
#: async): see :meth:`SessionGate.visit`.
_Form: TypeAlias = "Mapping[str, Any]"
FormSource: TypeAlias = "_Form | Callable[[], _Form | Awaitable[_Form | None] | None] | None"


#: The longest body ``<prefix>/close`` reads (an id is 32 characters).
_MAX_CLOSE_BYTES = 256

_Endpoint = Literal["script", "open", "close", "watch"]


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
        cookie_name: the fallback cookie's name; over HTTPS it is sent as
            ``__Host-<name>``, which a sibling subdomain cannot set.
        allowed_origins: origins of pages served elsewhere that may open and close
            sessions and name one in a form (by default only the app's own pages:
            see :func:`is_cross_site`).
        streams: global states whose changes every tab's change stream carries
            (``<prefix>/watch``), besides its own session's; none by default, since
            any page may open a stream.

    Example, in a host with no integration of its own::

        gate = SessionGate(engine)
        answer = await gate.aserve(method, path, body, headers)  # statekit's endpoints
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
        allowed_origins: Iterable[str] = (),
        streams: Iterable[GlobalState[Any]] = (),
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
        if isinstance(allowed_origins, str):
            raise TypeError(
                "allowed_origins takes a list of origins, like ['https://app.example.com'], "
                f"got the string {allowed_origins!r}"
            )
        self.engine = engine
        self.prefix = prefix
        self.cookie = cookie
        self.cookie_name = cookie_name
        self.allowed_origins = tuple(allowed_origins)
        self.streams = tuple(streams)
        global_names(engine, self.streams)  # raises for anything but its globals
        self._paths: dict[str, _Endpoint] = {
            prefix + SCRIPT_PATH: "script",
            prefix + OPEN_PATH: "open",
            prefix + CLOSE_PATH: "close",
            prefix + WATCH_PATH: "watch",
        }

    def __repr__(self) -> str:
        return f"SessionGate(prefix={self.prefix!r}, cookie={self.cookie})"

    def cross_site(self, headers: Mapping[str, str]) -> bool:
        """:func:`is_cross_site` with this gate's allowed origins."""
        return is_cross_site(headers, allowed_origins=self.allowed_origins)

    # -- statekit's own endpoints ----------------------------------------------------

    def endpoint(self, path: str) -> _Endpoint | None:
        """Which of statekit's endpoints a path is, or None for the app's own."""
        return self._paths.get(path)

    def serve(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Answer | None:
        """The answer to a request for one of statekit's endpoints, or None when the
        path is the app's.

        Args:
            method: the request's method.
            path: its path.
            body: its body (read only for ``<prefix>/close``, at most 256 bytes).
            headers: its headers: a request another site's page sent to open or close
                is refused (``403``), and the script is answered ``304`` to a browser
                that has it.
        """
        endpoint, refused = self._check(method, path, headers or {})
        if endpoint is None or refused is not None:
            return refused
        if endpoint == "script":
            return script_answer(headers or {})
        if endpoint == "watch":
            return _not_streamed()
        if endpoint == "open":
            try:
                return opened(self.engine.open_session())
            except (SessionBusy, StoreUnavailable) as exc:
                return answer_for(exc)
        sid = _close_body(body)
        if sid is not None:
            # A beacon cannot act on an answer: an unknown id is no error, and a close
            # the store could not take is logged.
            try:
                self.engine.close_session(sid)
            except (SessionBusy, StoreUnavailable) as exc:
                logger.warning("statekit: a tab's close was not recorded: %s", exc)
            except SessionNotFound:
                pass
        return _closed()

    async def aserve(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Answer | None:
        """:meth:`serve` with the engine's async calls (never blocks the event loop)."""
        endpoint, refused = self._check(method, path, headers or {})
        if endpoint is None or refused is not None:
            return refused
        if endpoint == "script":
            return script_answer(headers or {})
        if endpoint == "watch":
            return _not_streamed()
        if endpoint == "open":
            try:
                return opened(await self.engine.aopen_session())
            except (SessionBusy, StoreUnavailable) as exc:
                return answer_for(exc)
        sid = _close_body(body)
        if sid is not None:
            # A beacon cannot act on an answer: an unknown id is no error, and a close
            # the store could not take is logged.
            try:
                await self.engine.aclose_session(sid)
            except (SessionBusy, StoreUnavailable) as exc:
                logger.warning("statekit: a tab's close was not recorded: %s", exc)
            except SessionNotFound:
                pass
        return _closed()

    def _check(
        self, method: str, path: str, headers: Mapping[str, str]
    ) -> tuple[_Endpoint | None, Answer | None]:
        endpoint = self._paths.get(path)
        if endpoint is None:
            return None, None
        wanted = "GET" if endpoint in ("script", "watch") else "POST"
        # A change stream never ends by itself: HEAD, whose answer has no body, would
        # keep the connection and the watch open for nothing.
        allowed = ("GET", "HEAD") if endpoint == "script" else (wanted,)
        if method.upper() not in allowed:
            return endpoint, json_answer(
                405,
                {"error": "method_not_allowed", "detail": f"{path} takes {wanted}"},
                Allow=", ".join(allowed),
            )
        if endpoint != "script" and self.cross_site(headers):
            return endpoint, json_answer(
                403,
                {
                    "error": "cross_site",
                    "detail": f"{path} is called by the app's own pages only; a page served "
                    "from another origin is allowed with allowed_origins=[...]",
                },
            )
        return endpoint, None

    def open_watch(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        query: Mapping[str, str],
        user: str | None = None,
    ) -> Watch | Answer:
        """For ``GET <prefix>/watch`` (a host that streams: see
        ``statekit.web.stream``): the tab's change stream, its session named by the
        ``statekit_session`` query parameter (an ``EventSource`` cannot send headers)
        or the session header, with the user states of ``user`` (the id of the user
        the host authenticated for the request, if any); or the answer that refuses
        it (another site's page: ``403``; no session: ``409``). A session unknown or
        ended gives a stream that ends at once."""
        endpoint, refused = self._check(method, path, headers)
        if refused is not None:
            return refused
        if endpoint != "watch":
            raise ValueError(f"{path} is not statekit's change stream")
        sid = read_request(headers, query=query).sid
        try:
            if not sid:
                raise SessionNotFound("")
            return self.engine.watch(sid, user=user, globals=self.streams)
        except SessionNotFound as exc:  # none, or a malformed id
            answer = answer_for(exc)
            assert answer is not None  # an ended session always has one
            return answer

    # -- the app's requests ----------------------------------------------------------

    def visit(
        self,
        method: str,
        headers: Mapping[str, str],
        *,
        cookies: Mapping[str, str] | None = None,
        form: FormSource = None,
        query: Mapping[str, Any] | None = None,
        secure: bool = False,
    ) -> Visit:
        """One request of the app's, as statekit sees it.

        Args:
            method: the request's method.
            headers: its headers (any case).
            cookies: its cookies (the fallback cookie is read only when ``cookie`` is on).
            form: its form fields (for the ``statekit_session`` field), or a function
                that reads them (it may be async), called only when the session is asked
                for and the request names none in a header: a handler that never asks
                keeps its body unread. A form sent from another site's page is ignored.
            query: a websocket handshake's query parameters (for websockets only).
            secure: whether it came over HTTPS (the fallback cookie is then ``Secure``
                and named ``__Host-<cookie_name>``).
        """
        name = self.cookie_name_for(secure)
        headers = visit_headers(headers)  # lower case once, for the three readers
        incoming = read_request(
            headers,
            cookies=_only(cookies, name) if self.cookie else {},
            query=query,
        )
        visit = Visit(
            self,
            incoming,
            page_load=is_page_load(method, headers),
            secure=secure,
            cross_site=self.cross_site(headers),
        )
        if form is not None:
            visit.read_form_with(form)
        return visit

    def cookie_name_for(self, secure: bool) -> str:
        """The fallback cookie's name on a request over HTTPS (``secure``) or not."""
        return f"__Host-{self.cookie_name}" if secure else self.cookie_name


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


def _not_streamed() -> Answer:
    return json_answer(
        404,
        {
            "error": "not_streamed",
            "detail": "this server does not stream changes; an ASGI app with "
            "StateKitMiddleware does",
        },
    )


def _closed() -> Answer:
    return Answer(status=204, headers={"Cache-Control": "no-store"}, body=b"")


class Visit:
    """One request of the app's, as statekit sees it: its session, its browser tokens,
    and what to add to the response. Made by :meth:`SessionGate.visit`; integrations
    hand it to the handler.

    Attributes:
        incoming: what the request carried (session id, where from, tokens).
        page_load: whether it is a browser loading a page.
        cross_site: whether another site's page sent it (its form field is ignored).
    """

    def __init__(
        self,
        gate: SessionGate,
        incoming: Incoming,
        *,
        page_load: bool,
        secure: bool,
        cross_site: bool = False,
    ):
        self.gate = gate
        self.incoming = incoming
        self.page_load = page_load
        self.cross_site = cross_site
        self._secure = secure
        self._sid: str | None = incoming.sid
        self._tokens: dict[str, str] = dict(incoming.tokens)
        self._sent: dict[str, str | None] = {}
        self._cookie: str | None = None
        self._checked = False
        self._used = False  # the session was asked for: the response depends on it
        self._form: FormSource = None

    def __repr__(self) -> str:
        return f"Visit(source={self.incoming.source!r}, page_load={self.page_load})"

    @property
    def wants_form(self) -> bool:
        """Whether the session may be in the request's form: it named none in a header
        (or a websocket's query), and its form was not read yet."""
        return self.incoming.source in (None, "cookie") and not self._checked

    def use_form(self, form: Mapping[str, Any]) -> None:
        """Take the session from a form's ``statekit_session`` field (a page's hidden
        field), when the request named none in a header and came from the app's own
        pages (a form another site posts cannot choose the session)."""
        value = form.get(SESSION_FIELD) if isinstance(form, Mapping) else None
        if self.wants_form and not self.cross_site and isinstance(value, str) and value:
            self.incoming = attrs.evolve(self.incoming, sid=value, source="field")
            self._sid = value

    def read_form_with(self, form: FormSource) -> None:
        """Read the form (a mapping, or a function returning one, which may be async)
        only when the session is asked for and no header named it."""
        self._form = form

    def _take_form(self) -> Awaitable[Mapping[str, Any] | None] | None:
        """Read the form if it is still wanted: use it now when it reads at once, or
        hand back what to await."""
        loader, self._form = self._form, None
        if loader is None or not self.wants_form or self.cross_site:
            return None
        form = loader() if callable(loader) else loader
        if inspect.isawaitable(form):
            return form
        if isinstance(form, Mapping):
            self.use_form(form)
        return None

    @property
    def tokens(self) -> Mapping[str, str]:
        """The browser tokens for this request's events: those the page sent, updated
        by the request's events so far."""
        return self._tokens

    # -- the session -------------------------------------------------------------------

    def session(self) -> str:
        """The request's session id: the one the page sent (header, form field), or, on
        a page load with the cookie fallback on, the browser's cookie session (opened
        now if it has none or its session ended).

        Raises:
            SessionNotFound: the request names no session and may not open one (it is
                not a page load, or the fallback is off).
            UsageError: the integration reads forms asynchronously: use
                :meth:`asession` (or :meth:`aevent`).
        """
        pending = self._take_form()
        if pending is not None:
            if hasattr(pending, "close"):
                pending.close()
            raise UsageError(
                "this request's form is read asynchronously: use visit.asession() or "
                "visit.aevent() in async code"
            )
        if self._fallback_needed():
            self._checked = True
            if self._sid is None or not self.gate.engine.exists(self._sid):
                self._opened(self.gate.engine.open_session())
        return self._named()

    async def asession(self) -> str:
        """:meth:`session` with the engine's async calls."""
        pending = self._take_form()
        if pending is not None:
            form = await pending
            if isinstance(form, Mapping):
                self.use_form(form)
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
        self._cookie = _cookie_header(
            self.gate.cookie_name_for(self._secure), sid, secure=self._secure
        )

    def _named(self) -> str:
        self._used = True
        if self._sid is None:
            raise SessionNotFound(
                None,
                "the request names no session (statekit.js sends it in the "
                f"{SESSION_HEADER} header; a form sends it in the {SESSION_FIELD!r} field)",
            )
        return self._sid

    # -- events ------------------------------------------------------------------------

    def event(self, *, bind: str = "", user: str | None = None) -> VisitEvent:
        """``engine.event`` on the request's session with the page's browser tokens (and
        ``user``, the id of the user the host authenticated, if any): ``with
        visit.event() as ev:``; the tokens the event makes go back with the response."""
        return VisitEvent(self, bind, user)

    def aevent(self, *, bind: str = "", user: str | None = None) -> VisitEvent:
        """``engine.aevent`` on the request's session with the page's browser tokens (and
        ``user``, as :meth:`event`): ``async with visit.aevent() as ev:``; the tokens
        the event makes go back with the response."""
        return VisitEvent(self, bind, user)

    def keep(self, result: EventResult) -> None:
        """Send back the browser tokens an event made (for events the handler opened
        with ``engine.event`` itself)."""
        self._tokens.update(result.browser)
        self._sent.update(result.browser)

    # -- the response ------------------------------------------------------------------

    def response_headers(self) -> list[tuple[str, str]]:
        """The headers to add to the response: new browser tokens; ``Vary`` on what
        named the session, when the handler used it (add it to the response's own
        ``Vary``: a cache must not serve one session's page to another); and the
        fallback cookie, with ``Cache-Control: private, no-store``, when this request
        opened its session."""
        out: list[tuple[str, str]] = []
        value = browser_set_value(self._sent)
        if value is not None:
            out.append((BROWSER_SET_HEADER, value))
        # A response made from a session must not be served to another session by a
        # cache: it varies with what named the session (added to the app's own Vary).
        if self._used and self._cookie is None:
            if self.incoming.source == "cookie":
                out.append(("Vary", "Cookie"))
            elif self.incoming.source == "header":
                out.append(("Vary", f"{SESSION_HEADER}, {BROWSER_HEADER}"))
        if self._cookie is not None:
            out.append(("Set-Cookie", self._cookie))
            # A response that sets a session cookie is this browser's alone.
            out.append(("Cache-Control", "private, no-store"))
        return out

    def answer(self, exc: BaseException) -> Answer | None:
        """:func:`answer_for` this request, for an error about *its* session (or the
        store): an error about another session the handler looked up is the host's to
        handle, not a sign that this page's session ended. An ended session kept in the
        fallback cookie also clears the cookie, so that the next page load opens a new
        one."""
        named = getattr(exc, "sid", None)
        if isinstance(exc, (SessionNotFound, SessionNotInitialized)) and named not in (
            None,
            "",
            self._sid,
        ):
            return None
        answer = answer_for(exc)
        if (
            answer is not None
            and answer.status == 409
            and self.incoming.source == "cookie"
            and self._cookie is None
        ):
            name = self.gate.cookie_name_for(self._secure)
            clear = _cookie_header(name, "", secure=self._secure, max_age=0)
            answer = attrs.evolve(answer, headers={**answer.headers, "Set-Cookie": clear})
        return answer


class VisitEvent:
    """An event of a visit's session (:meth:`Visit.event`, :meth:`Visit.aevent`): a
    context manager, plain or async, that opens the engine's event on the request's
    session with the page's browser tokens and, once it committed, keeps the tokens it
    made for the response. (A class of its own rather than a generator-based context
    manager: it is made for every request, and costs a fifth as much.)"""

    __slots__ = ("_bind", "_event", "_user", "_visit")

    def __init__(self, visit: Visit, bind: str, user: str | None) -> None:
        self._visit = visit
        self._bind = bind
        self._user = user
        self._event: Event | None = None

    def __enter__(self) -> Event:
        visit = self._visit
        ev = self._event = visit.gate.engine.event(
            visit.session(), browser=visit.tokens, bind=self._bind, user=self._user
        )
        return ev.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ev = self._event
        assert ev is not None
        ev.__exit__(exc_type, exc, tb)
        if exc_type is None and ev.browser is not None and ev.browser.out:
            self._visit.keep(ev.result)  # (made only when it has tokens to keep)

    async def __aenter__(self) -> Event:
        visit = self._visit
        sid = await visit.asession()
        ev = self._event = visit.gate.engine.aevent(
            sid, browser=visit.tokens, bind=self._bind, user=self._user
        )
        return await ev.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ev = self._event
        assert ev is not None
        await ev.__aexit__(exc_type, exc, tb)
        if exc_type is None and ev.browser is not None and ev.browser.out:
            self._visit.keep(ev.result)
