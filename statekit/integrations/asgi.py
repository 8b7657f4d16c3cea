"""statekit in any ASGI app (Starlette, FastAPI, ...): one middleware.

:class:`StateKitMiddleware` serves statekit's own endpoints (``<prefix>/open``,
``<prefix>/close``, ``<prefix>/statekit.js``), gives every other request a
:class:`~statekit.web.Visit` (``request.state.statekit`` in Starlette and FastAPI, or
:func:`visit_of`), adds the visit's headers to the response (new browser tokens, the
fallback cookie), answers an ended session or a busy store as the page expects (``409``
or ``503``, see :func:`statekit.web.answer_for`), and shuts the engine down with the
app's lifespan. It uses only the engine's async calls, so it never blocks the event
loop, whatever the store::

    from starlette.applications import Starlette
    from statekit.integrations.asgi import StateKitMiddleware

    app = Starlette(routes=[...])
    app.add_middleware(StateKitMiddleware, engine=engine)

    async def add(request):
        visit = request.state.statekit
        async with visit.aevent() as ev:
            ev[cart].append("milk")
        return JSONResponse(...)

Add it with ``add_middleware`` (or ``Starlette(middleware=[...])``) rather than around
the app: Starlette answers an exception nobody handled with a ``500`` in its outermost
layer, before a middleware around the whole app could answer it as the page expects.
An app with exception handlers of its own for ``KeyError``, ``ConnectionError`` or
``TimeoutError`` (which statekit's errors are) uses :func:`install` instead, which adds
the middleware and handlers for statekit's errors that win over the app's::

    install(app, engine)

The framework-free part is plain ASGI: this module imports no framework.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from statekit import (
    GlobalState,
    SessionBusy,
    SessionNotFound,
    SessionNotInitialized,
    StateEngine,
    StoreUnavailable,
    UsageError,
    Watch,
    web,
)
from statekit.web import STREAM_HEADERS, server_sent_events

__all__ = ["StateKitMiddleware", "exception_handlers", "install", "visit_of"]

logger = logging.getLogger("statekit")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Where the request's visit is kept in the scope (and in ``scope["state"]``).
SCOPE_KEY = "statekit"

#: The most of ``<prefix>/close``'s body read (an id is 32 characters; the gate
#: refuses a longer body, so reading more is never needed).
_MAX_CLOSE_READ = 1024
#: The longest websocket query string read for its session parameter.
_MAX_QUERY_BYTES = 8 * 1024
#: The most header bytes read into a visit (servers bound headers too; this bounds
#: what a hostile request makes statekit decode).
_MAX_HEADER_BYTES = 512 * 1024


def visit_of(request_or_scope: Any) -> web.Visit:
    """The :class:`~statekit.web.Visit` :class:`StateKitMiddleware` gave a request.

    Args:
        request_or_scope: a Starlette or FastAPI ``Request`` (or ``WebSocket``), or an
            ASGI scope.

    Returns:
        The request's visit.

    Raises:
        UsageError: the request did not pass through :class:`StateKitMiddleware`.

    Example::

        async def add(request):
            async with visit_of(request).aevent() as ev:
                ...
    """
    scope = getattr(request_or_scope, "scope", request_or_scope)
    visit = scope.get(SCOPE_KEY) if isinstance(scope, Mapping) else None
    if not isinstance(visit, web.Visit):
        raise UsageError(
            "this request has no statekit visit: add StateKitMiddleware to the app "
            "(app.add_middleware(StateKitMiddleware, engine=engine))"
        )
    return visit


#: The names of the headers a visit reads, as ASGI servers send them.
_VISIT_NAMES = frozenset(name.encode("latin-1") for name in web.VISIT_HEADERS)
_SESSION_NAME = web.SESSION_HEADER.lower()


def _headers(
    raw: Iterable[tuple[bytes, bytes]], only: frozenset[bytes] | None = None
) -> web.LowerHeaders:
    """The request's headers as one string per name (lower case): repeated headers
    joined as HTTP joins them (``; `` for cookies); with ``only``, just those names (a
    visit decodes the few it reads, not a browser's twenty). Bounded; never raises."""
    if only is not None and raw.__class__ in (list, tuple):
        fast = _picked(raw, only)
        if fast is not None:
            return fast
    out = web.LowerHeaders()
    total = 0
    for pair in raw:
        try:
            name_b, value_b = pair
            if name_b.__class__ is not bytes or value_b.__class__ is not bytes:
                # (servers send bytes; a memoryview refuses what is not bytes-like)
                name_b, value_b = bytes(memoryview(name_b)), bytes(memoryview(value_b))
            if only is not None and name_b not in only:
                name_b = name_b.lower()
                if name_b not in only:
                    continue
            total += len(name_b) + len(value_b)
            if total > _MAX_HEADER_BYTES:
                break
            name = name_b.decode("latin-1").lower()
            value = value_b.decode("latin-1")
        except (TypeError, ValueError):
            continue
        if name in out:
            out[name] += ("; " if name == "cookie" else ", ") + value
        else:
            out[name] = value
    return out


def _picked(
    raw: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...], only: frozenset[bytes]
) -> web.LowerHeaders | None:
    """:func:`_headers` of the names in ``only``, the quick way, for a server's list of
    bytes pairs with lower-case names (as servers should send them) and no repeated
    name: every request, nearly. Anything else (a name in another case, a repeated
    one, a pair of other types, more than the bound) answers None, and the careful
    loop reads it."""
    try:
        # A name not in lower case is picked too, to be refused below.
        picked = [pair for pair in raw if pair[0] in only or not pair[0].islower()]
        out = web.LowerHeaders()
        size = 0
        for name, value in picked:
            size += len(name) + len(value)
            if size > _MAX_HEADER_BYTES or name not in only:
                return None
            out[name.decode("latin-1")] = value.decode("latin-1")
    except (TypeError, ValueError, IndexError, KeyError, AttributeError):
        return None
    return out if len(out) == len(picked) else None  # else a repeated name: joined


def _query(raw: object) -> dict[str, str]:
    """The session parameter of a websocket handshake's query string (bounded; a
    malformed one reads as absent)."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > _MAX_QUERY_BYTES:
        return {}
    for name, value in parse_qsl(bytes(raw).decode("latin-1")):
        if name == web.SESSION_QUERY:
            return {name: value}
    return {}


def _cookies(header: str | None) -> dict[str, str]:
    """The cookies of a ``Cookie`` header, read leniently (as browsers send them, not as
    RFC 6265 would have them): a malformed pair is skipped, never an error."""
    out: dict[str, str] = {}
    if not header:
        return out
    for chunk in header.split(";"):
        name, sep, value = chunk.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        out.setdefault(name, value)
    return out


class StateKitMiddleware:
    """ASGI middleware that puts an app's requests in statekit's sessions.

    Per ``http`` request: statekit's endpoints are answered here (with
    :meth:`SessionGate.aserve <statekit.web.SessionGate.aserve>`; only the close
    endpoint's body is read, at most 1 KiB); any other request gets a
    :class:`~statekit.web.Visit`, kept in the request's own ``scope["statekit"]`` and
    ``scope["state"]["statekit"]`` (``request.state.statekit``; not in copies, so what
    the app writes in its scope and state is seen by middleware around it), whose
    headers are added when the response starts. Statekit's endpoints get the request's
    headers: another site's page may not open or close sessions (``403``) unless its
    origin is in ``allowed_origins``. An exception the app raises that
    :meth:`Visit.answer <statekit.web.Visit.answer>` maps (an ended session: ``409``; a
    busy session or unreachable store: ``503``) is answered, if the response has not
    started; any other, or one raised after the response started, goes on up.

    ``websocket`` requests get a visit too (never a page load, so never a cookie
    session), whose session is the ``statekit_session`` query parameter (a browser
    cannot set headers on a websocket; ``kit.url(path, {websocket: true})`` adds it),
    and pass through untouched.

    ``lifespan``: with ``shutdown`` on, the engine is shut down (``ashutdown``) after
    the app's own shutdown completes, so its session-end callbacks run with reason
    ``shutdown`` on a memory store. An app that does not take part in the lifespan
    protocol is covered too: the middleware then answers the server itself.

    Args:
        app: the ASGI app.
        engine: the app's engine.
        prefix: where statekit's endpoints are served.
        cookie: whether a page load with no session of its own opens one kept in a
            cookie (the fallback for pages without JavaScript: one session per
            browser).
        shutdown: whether to shut the engine down with the app's lifespan.
        allowed_origins: origins of pages served elsewhere (``"https://app.example.com"``)
            that may open and close sessions; by default only the app's own pages may
            (another site's is answered ``403``).
        streams: global states whose changes every tab's change stream carries
            (``GET <prefix>/watch``, Server-Sent Events of the tab's session's changes;
            ``StateKit.start({watch: true})`` opens it).
        user_of: ``user_of(scope)``, the id of the user the app authenticated for a
            request (for example ``scope["user"].identity`` behind Starlette's
            ``AuthenticationMiddleware``, which must then run before this one), or
            None: a tab's change stream then carries that user's user states too.

    Raises:
        TypeError: ``engine`` is not a :class:`~statekit.StateEngine`.
        ValueError: ``prefix`` is not a path like ``"/statekit"``.

    Thread-safety: one instance serves every request of the app, on its event loop;
    it keeps no state between requests.

    Example::

        app = FastAPI()
        app.add_middleware(StateKitMiddleware, engine=engine)
    """

    def __init__(
        self,
        app: ASGIApp,
        engine: StateEngine,
        *,
        prefix: str = web.PREFIX,
        cookie: bool = True,
        shutdown: bool = True,
        allowed_origins: Iterable[str] = (),
        streams: Iterable[GlobalState[Any]] = (),
        user_of: Callable[[Scope], str | None] | None = None,
    ) -> None:
        self.app = app
        self.user_of = user_of
        self.gate = web.SessionGate(
            engine,
            prefix=prefix,
            cookie=cookie,
            allowed_origins=allowed_origins,
            streams=streams,
        )
        self.engine = engine
        self.shutdown = shutdown

    def __repr__(self) -> str:
        return f"StateKitMiddleware(prefix={self.gate.prefix!r}, cookie={self.gate.cookie})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            # Not "GET": a handshake is never a page load (whatever its Accept header),
            # so it never opens a cookie session.
            self._add_visit(scope, "WEBSOCKET")
            await self.app(scope, receive, send)
        elif kind == "lifespan" and self.shutdown:
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # -- http ------------------------------------------------------------------------

    def _add_visit(self, scope: Scope, method: str) -> web.Visit:
        """Make the request's visit and keep it in the request's own scope and state
        (not in copies: what the app writes there is seen by the middleware around it)."""
        headers = _headers(scope.get("headers") or (), _VISIT_NAMES)
        websocket = scope.get("type") == "websocket"
        # A session named in the header wins over the cookie: not parsed then.
        named = headers.get(_SESSION_NAME)
        visit = self.gate.visit(
            method,
            headers,
            cookies=None if named else _cookies(headers.get("cookie")),
            query=_query(scope.get("query_string")) if websocket else None,
            secure=scope.get("scheme") in ("https", "wss"),
        )
        scope[SCOPE_KEY] = visit
        scope.setdefault("state", {})[SCOPE_KEY] = visit
        return visit

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = str(scope.get("method", "GET"))
        path = str(scope.get("path", ""))
        endpoint = self.gate.endpoint(path)
        if endpoint == "watch":
            await self._watch(scope, receive, send, method, path)
            return
        if endpoint is not None:
            headers = _headers(scope.get("headers") or ())
            body = await _read_body(receive) if endpoint == "close" else b""
            answer = await self.gate.aserve(method, path, body, headers)
            assert answer is not None  # the path is one of the gate's
            await _send_answer(send, answer, head=method.upper() == "HEAD")
            return

        visit = self._add_visit(scope, method)
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message.get("type") == "http.response.start" and not started:
                started = True
                extra = visit.response_headers()
                if extra:
                    added = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra]
                    own = message.get("headers", ())
                    if any(name == b"cache-control" for name, _ in added):
                        # One Cache-Control: statekit's (a response that sets the
                        # session cookie is private) replaces the app's.
                        own = [(n, v) for n, v in own if bytes(n).lower() != b"cache-control"]
                    message = {**message, "headers": [*own, *added]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            answer = visit.answer(exc)
            if answer is None or started:
                raise
            # The page acts on this answer: it is not the app's failure to log.
            answered = {**answer.headers}
            extra = [(k, v) for k, v in visit.response_headers() if k not in answered]
            await _send_answer(send, answer, extra=extra, head=method.upper() == "HEAD")

    # -- lifespan --------------------------------------------------------------------

    async def _watch(
        self, scope: Scope, receive: Receive, send: Send, method: str, path: str
    ) -> None:
        """``GET <prefix>/watch``: the tab's change stream as Server-Sent Events, until
        it ends or the page goes away (``http.disconnect``)."""
        headers = _headers(scope.get("headers") or ())
        user = None if self.user_of is None else self.user_of(scope)
        query = _query(scope.get("query_string"))
        opened = self.gate.open_watch(method, path, headers, query, user=user)
        if not isinstance(opened, Watch):
            await _send_answer(send, opened, head=method.upper() == "HEAD")
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in STREAM_HEADERS.items()
                ],
            }
        )

        async def stream() -> None:
            async for chunk in server_sent_events(opened):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def gone() -> None:
            while (await receive()).get("type") != "http.disconnect":
                pass

        streaming, leaving = asyncio.ensure_future(stream()), asyncio.ensure_future(gone())
        try:
            await asyncio.wait({streaming, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.close()
            for task in (streaming, leaving):
                task.cancel()
            await asyncio.gather(streaming, leaving, return_exceptions=True)
        if streaming.done() and not streaming.cancelled() and streaming.exception():
            raise streaming.exception()  # type: ignore[misc]

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen: set[str] = set()  # the lifespan messages that went each way

        async def receive_seen() -> Message:
            message = await receive()
            seen.add(str(message.get("type")))
            return message

        async def send_then_shutdown(message: Message) -> None:
            kind = str(message.get("type"))
            if kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                failure = await self._ashutdown()
                if failure is not None and kind == "lifespan.shutdown.complete":
                    message = {"type": "lifespan.shutdown.failed", "message": failure}
            seen.add(kind)
            await send(message)

        try:
            await self.app(scope, receive_seen, send_then_shutdown)
        except Exception:
            if seen & {"lifespan.startup.failed", "lifespan.shutdown.failed"} or (
                "lifespan.startup.complete" in seen
            ):
                await self._ashutdown()
                raise
            # An app that does not take part in the lifespan protocol: answer the server
            # for it, so the engine still shuts down with the server.
            logger.debug("the app does not support the ASGI lifespan; statekit answers it")
        if "lifespan.shutdown.complete" in seen or "lifespan.shutdown.failed" in seen:
            return
        if "lifespan.startup.failed" in seen:
            await self._ashutdown()
            return
        if "lifespan.startup" not in seen:
            await receive_seen()
        if "lifespan.startup.complete" not in seen:
            await send({"type": "lifespan.startup.complete"})
        while "lifespan.shutdown" not in seen:
            await receive_seen()
        failure = await self._ashutdown()
        if failure is None:
            await send({"type": "lifespan.shutdown.complete"})
        else:
            await send({"type": "lifespan.shutdown.failed", "message": failure})

    async def _ashutdown(self) -> str | None:
        """Shut the engine down; the failure's text, if it failed (logged)."""
        try:
            await self.engine.ashutdown()
        except Exception as exc:
            logger.exception("statekit: the engine's shutdown failed")
            return f"statekit: the engine's shutdown failed: {type(exc).__name__}: {exc}"
        return None


#: The errors a visit answers as the page expects (see :func:`exception_handlers`).
_ANSWERED: tuple[type[Exception], ...] = (
    SessionNotFound,
    SessionNotInitialized,
    SessionBusy,
    StoreUnavailable,
)


def exception_handlers() -> dict[Any, Callable[[Any, Any], Coroutine[Any, Any, Any]]]:
    """Starlette exception handlers that answer statekit's errors as the page expects,
    for an app with exception handlers of its own.

    :class:`StateKitMiddleware` answers an ended session (``409``) or a busy store
    (``503``) when the error reaches it. An app's own handler for a broader class sees
    the error first, though: ``SessionNotFound`` is a ``KeyError``, ``StoreUnavailable``
    a ``ConnectionError``, ``SessionBusy`` a ``TimeoutError``, so an app's "missing key:
    404" handler would answer an ended session with its ``404``. Registered for
    statekit's own classes, these handlers win (Starlette takes the most specific
    handler) and answer with :meth:`Visit.answer <statekit.web.Visit.answer>`. An error
    the visit leaves to the app (about another session than the request's own) goes to
    the app's handler for its broader class, if it has one, else on up; so does one
    raised in a websocket (which has no HTTP answer to send).

    :func:`install` adds them with the middleware; this function is for an app built
    with ``Starlette(exception_handlers=...)`` or ``FastAPI(exception_handlers=...)``.
    The app needs :class:`StateKitMiddleware` too.

    Returns:
        A new dict of exception class to handler, to merge into the app's own (typed
        loosely, so that it merges into Starlette's and FastAPI's own types).

    Example::

        app = FastAPI(exception_handlers={KeyError: not_found, **exception_handlers()})
        app.add_middleware(StateKitMiddleware, engine=engine)
    """
    return dict.fromkeys(_ANSWERED, _answer_error)


async def _answer_error(request: Any, exc: Exception) -> Any:
    """A Starlette exception handler: the visit's answer to ``exc``, else the app's own
    handler for a broader class of it, else ``exc`` goes on up."""
    scope = getattr(request, "scope", {})
    visit = visit_of(request)
    answer = visit.answer(exc) if scope.get("type") == "http" else None  # not a websocket
    if answer is not None:
        return _AnswerApp(answer)
    handler = _apps_handler(scope, exc)
    if handler is None:
        raise exc
    if inspect.iscoroutinefunction(handler):
        return await handler(request, exc)
    from starlette.concurrency import run_in_threadpool  # in a Starlette app here

    return await run_in_threadpool(handler, request, exc)


def _apps_handler(scope: Mapping[str, Any], exc: Exception) -> Callable[..., Any] | None:
    """The app's own Starlette handler for ``exc`` (statekit's own left out), if any."""
    registered = scope.get("starlette.exception_handlers")
    handlers = registered[0] if isinstance(registered, tuple) and registered else None
    if not isinstance(handlers, Mapping):
        return None
    for cls in type(exc).__mro__:
        handler = handlers.get(cls)
        if handler is not None and handler is not _answer_error:
            return handler  # type: ignore[no-any-return]
    return None


class _AnswerApp:
    """An :class:`~statekit.web.Answer` as the ASGI app a Starlette exception handler
    returns."""

    def __init__(self, answer: web.Answer) -> None:
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        head = str(scope.get("method", "")).upper() == "HEAD"
        await _send_answer(send, self.answer, head=head)


def install(
    app: Any,
    engine: StateEngine,
    *,
    prefix: str = web.PREFIX,
    cookie: bool = True,
    shutdown: bool = True,
    allowed_origins: Iterable[str] = (),
    streams: Iterable[GlobalState[Any]] = (),
    user_of: Callable[[Scope], str | None] | None = None,
) -> None:
    """Put a Starlette or FastAPI app's requests in statekit's sessions: adds
    :class:`StateKitMiddleware` and the :func:`exception_handlers` that answer
    statekit's errors before any handler of the app's own for a broader class
    (``KeyError``, ``ConnectionError``, ``TimeoutError``) can.

    Args:
        app: the Starlette or FastAPI app, before it starts.
        engine: the app's engine.
        prefix: as for :class:`StateKitMiddleware`.
        cookie: as for :class:`StateKitMiddleware`.
        shutdown: as for :class:`StateKitMiddleware`.
        allowed_origins: as for :class:`StateKitMiddleware`.
        streams: as for :class:`StateKitMiddleware`.
        user_of: as for :class:`StateKitMiddleware`.

    Raises:
        TypeError: ``engine`` is not a :class:`~statekit.StateEngine`.
        ValueError: ``prefix`` is not a path like ``"/statekit"``.

    Example::

        app = FastAPI()
        install(app, engine)
    """
    if not isinstance(allowed_origins, str):
        allowed_origins = tuple(allowed_origins)
    streams = tuple(streams)
    web.SessionGate(engine, prefix=prefix, allowed_origins=allowed_origins, streams=streams)
    app.add_middleware(
        StateKitMiddleware,
        engine=engine,
        prefix=prefix,
        cookie=cookie,
        shutdown=shutdown,
        allowed_origins=allowed_origins,
        streams=streams,
        user_of=user_of,
    )
    for cls, handler in exception_handlers().items():
        app.add_exception_handler(cls, handler)


async def _read_body(receive: Receive) -> bytes:
    """The request's body, at most ``_MAX_CLOSE_READ + 1`` bytes of it (a longer body is
    refused by the gate whatever its rest)."""
    chunks: list[bytes] = []
    size = 0
    while size <= _MAX_CLOSE_READ:
        message = await receive()
        if message.get("type") != "http.request":
            break
        chunk = message.get("body", b"")
        if isinstance(chunk, (bytes, bytearray)):
            chunks.append(bytes(chunk))
            size += len(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)[: _MAX_CLOSE_READ + 1]


async def _send_answer(
    send: Send, answer: web.Answer, *, extra: Iterable[tuple[str, str]] = (), head: bool = False
) -> None:
    headers = [
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()
    ]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra]
    headers.append((b"content-length", str(len(answer.body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else answer.body})
