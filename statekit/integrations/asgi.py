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

The framework-free part is plain ASGI: this module imports no framework.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

from statekit import StateEngine, UsageError, web

__all__ = ["StateKitMiddleware", "visit_of"]

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


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request's headers as one string per name (lower case): repeated headers
    joined as HTTP joins them (``; `` for cookies). Bounded; never raises."""
    out: dict[str, str] = {}
    total = 0
    for pair in raw:
        try:
            name_b, value_b = pair
            total += len(name_b) + len(value_b)
            if total > _MAX_HEADER_BYTES:
                break
            name = bytes(name_b).decode("latin-1").lower()
            value = bytes(value_b).decode("latin-1")
        except (TypeError, ValueError):
            continue
        if name in out:
            out[name] += ("; " if name == "cookie" else ", ") + value
        else:
            out[name] = value
    return out


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
    :class:`~statekit.web.Visit`, kept in ``scope["statekit"]`` and
    ``scope["state"]["statekit"]`` (``request.state.statekit``), whose headers are
    added when the response starts. An exception the app raises that
    :meth:`Visit.answer <statekit.web.Visit.answer>` maps (an ended session: ``409``; a
    busy session or unreachable store: ``503``) is answered, if the response has not
    started; any other, or one raised after the response started, goes on up.

    ``websocket`` requests get a visit too (never a page load, so never a cookie
    session), and pass through untouched.

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
    ) -> None:
        self.app = app
        self.gate = web.SessionGate(engine, prefix=prefix, cookie=cookie)
        self.engine = engine
        self.shutdown = shutdown

    def __repr__(self) -> str:
        return f"StateKitMiddleware(prefix={self.gate.prefix!r}, cookie={self.gate.cookie})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self.app(self._with_visit(scope, "GET"), receive, send)
        elif kind == "lifespan" and self.shutdown:
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # -- http ------------------------------------------------------------------------

    def _with_visit(self, scope: Scope, method: str) -> Scope:
        headers = _headers(scope.get("headers") or ())
        visit = self.gate.visit(
            method,
            headers,
            cookies=_cookies(headers.get("cookie")),
            secure=scope.get("scheme") in ("https", "wss"),
        )
        state = scope.get("state")
        return {
            **scope,
            SCOPE_KEY: visit,
            "state": {**(state if isinstance(state, Mapping) else {}), SCOPE_KEY: visit},
        }

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = str(scope.get("method", "GET"))
        path = str(scope.get("path", ""))
        endpoint = self.gate.endpoint(path)
        if endpoint is not None:
            body = await _read_body(receive) if endpoint == "close" else b""
            answer = await self.gate.aserve(method, path, body)
            assert answer is not None  # the path is one of the gate's
            await _send_answer(send, answer, head=method.upper() == "HEAD")
            return

        scope = self._with_visit(scope, method)
        visit: web.Visit = scope[SCOPE_KEY]
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message.get("type") == "http.response.start" and not started:
                started = True
                extra = visit.response_headers()
                if extra:
                    message = {
                        **message,
                        "headers": [
                            *message.get("headers", ()),
                            *(
                                (k.lower().encode("latin-1"), v.encode("latin-1"))
                                for k, v in extra
                            ),
                        ],
                    }
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            answer = visit.answer(exc)
            if answer is None or started:
                raise
            # The page acts on this answer: it is not the app's failure to log.
            headers = {**answer.headers}
            extra = [(k, v) for k, v in visit.response_headers() if k not in headers]
            await _send_answer(send, answer, extra=extra, head=method.upper() == "HEAD")

    # -- lifespan --------------------------------------------------------------------

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
