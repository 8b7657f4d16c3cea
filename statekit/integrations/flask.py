"""The Flask extension: statekit's endpoints, each request's :class:`~statekit.web.Visit`,
its response headers and the answers to ended sessions, in one line of glue.

::

    from flask import Flask
    from statekit.integrations.flask import StateKit, visit

    app = Flask(__name__)
    StateKit(app, engine)

    @app.post("/api/cart")
    def add():
        with visit().event() as ev:
            ev[cart].append(request.json["item"])
            return {"cart": ev[cart]}

What the extension does:

- serves ``<prefix>/open``, ``<prefix>/close`` and ``<prefix>/statekit.js`` from a
  blueprint named ``statekit``;
- refuses ``open`` and ``close`` sent by another site's page (``403``; a front end
  served from another origin is let in with ``allowed_origins``);
- :func:`visit` gives the request's :class:`~statekit.web.Visit` (made on first use and
  kept in ``flask.g``): its session comes from the ``X-Statekit-Session`` header, else
  the ``statekit_session`` field of a posted form (read only when the session is asked
  for: a view that reads the raw body keeps it), else (on a page load, when ``cookie``
  is on) the fallback cookie, one session per *browser* (``__Host-statekit_session``
  over HTTPS);
- after each request, adds the visit's headers (new browser tokens, the fallback
  cookie with ``Cache-Control: private, no-store``) to the response;
- answers :class:`~statekit.SessionNotFound` (and its kinds) about the request's own
  session, and :class:`~statekit.SessionNotInitialized` in a session that was closed,
  with ``409`` and ``X-Statekit-Session-Ended``, :class:`~statekit.SessionBusy` and
  :class:`~statekit.StoreUnavailable` with ``503`` and ``Retry-After``, as
  :func:`statekit.web.answer_for` says, before the app's and its blueprints' own error
  handlers (which Flask would otherwise try first for a blueprint's views); an error
  about another session a view looked up goes to those handlers;
- shuts the engine down once when the process exits (``atexit``; Flask has no
  shutdown of its own). An engine shut down before then is left alone, and the
  extension holds it weakly for this: an app thrown away is not kept alive.

The engine's blocking calls are used: a Flask view runs in a thread of its own.
Thread-safe: one extension serves every thread of the app.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from flask import Blueprint, Flask, Response, current_app, g, has_request_context, request

from statekit import StateEngine
from statekit.exceptions import (
    SessionBusy,
    SessionNotFound,
    SessionNotInitialized,
    StoreUnavailable,
)
from statekit.web import PREFIX, Answer, SessionGate, Visit, shut_down_at_exit, visit_headers

__all__ = ["StateKit", "visit"]

#: The key of the app's gate in ``app.extensions``.
EXTENSION = "statekit"
_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")
#: The most of a close beacon's body read (an id is 32 characters).
_CLOSE_BODY_MAX = 1024
#: The errors answered for the page when they are about the request's own session.
_ANSWERED = (SessionNotFound, SessionNotInitialized, SessionBusy, StoreUnavailable)


class StateKit:
    """statekit on a Flask app.

    Args:
        app: the app, or None to call :meth:`init_app` later (app factories).
        engine: the app's engine (or pass it to :meth:`init_app`).
        prefix: where statekit's endpoints live.
        cookie: whether a page load with no session of its own may open one kept in a
            cookie (the fallback for pages without JavaScript: one session per
            *browser*, every tab shares it).
        shutdown: whether to shut the engine down when the process exits.
        allowed_origins: origins (``"https://app.example.com"``) of pages served
            elsewhere that may open and close sessions and name one in a form; by
            default only the app's own pages may.

    Raises:
        TypeError: ``engine`` is not a :class:`~statekit.StateEngine`, or
            ``allowed_origins`` is a string rather than a list.
        ValueError: ``prefix`` is not a path like ``"/statekit"``.

    Example, with an app factory::

        kit = StateKit(engine=engine)

        def create_app():
            app = Flask(__name__)
            kit.init_app(app)
            return app
    """

    def __init__(
        self,
        app: Flask | None = None,
        engine: StateEngine | None = None,
        *,
        prefix: str = PREFIX,
        cookie: bool = True,
        shutdown: bool = True,
        allowed_origins: Iterable[str] = (),
    ) -> None:
        self.engine = engine
        self.prefix = prefix
        self.cookie = cookie
        self.shutdown = shutdown
        self.allowed_origins = allowed_origins
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return f"StateKit(prefix={self.prefix!r}, cookie={self.cookie})"

    def init_app(self, app: Flask, engine: StateEngine | None = None) -> SessionGate:
        """Put statekit on ``app``: its endpoints, its error answers, its response
        headers, and the engine's shutdown at exit.

        Args:
            app: the Flask app.
            engine: the engine for this app (the extension's, if omitted).

        Returns:
            The app's :class:`~statekit.web.SessionGate` (also in
            ``app.extensions["statekit"]``).

        Raises:
            TypeError: there is no engine, or it is not a StateEngine.
            RuntimeError: the app has statekit already.
        """
        engine = engine if engine is not None else self.engine
        if engine is None:
            raise TypeError(
                "StateKit needs the app's engine: StateKit(app, engine) or init_app(app, engine)"
            )
        if EXTENSION in app.extensions:
            raise RuntimeError("this Flask app has statekit already: call init_app once")
        gate = SessionGate(
            engine, prefix=self.prefix, cookie=self.cookie, allowed_origins=self.allowed_origins
        )
        app.extensions[EXTENSION] = gate
        app.register_blueprint(_blueprint(gate))
        app.after_request(_add_headers)
        _answer_own_errors_first(app)
        if self.shutdown:
            shut_down_at_exit(engine)
        return gate


def visit() -> Visit:
    """The current request's :class:`~statekit.web.Visit` (made on first use, then the
    same one for the whole request).

    A posted form (``application/x-www-form-urlencoded`` or ``multipart/form-data``)
    is read for the ``statekit_session`` field only when the session is asked for
    (``session()``, ``event()``) and no header named it: a view that reads
    ``request.get_data()`` first keeps the raw body.

    Raises:
        RuntimeError: called outside a request, or on an app without
            :class:`StateKit`.

    Example::

        @app.post("/api/visit")
        def count():
            with visit().event() as ev:
                return shop.show(ev)
    """
    if not has_request_context():
        raise RuntimeError(
            "statekit.integrations.flask.visit() works only while Flask handles a "
            "request (in a view, a before/after_request function or an error handler)"
        )
    made: Visit | None = g.get("statekit_visit")
    if made is not None:
        return made
    gate = current_app.extensions.get(EXTENSION)
    if not isinstance(gate, SessionGate):
        raise RuntimeError(
            f"the Flask app {current_app.name!r} has no statekit: call "
            "StateKit(app, engine) or StateKit(engine=engine).init_app(app) first"
        )
    made = gate.visit(
        request.method,
        # Werkzeug's Headers: a Mapping's get and items, a name found in any case
        visit_headers(cast("Mapping[str, str]", request.headers), any_case=True),
        cookies=request.cookies,  # the gate reads gate.cookie_name_for(secure)
        form=_form,
        secure=request.is_secure,
    )
    g.statekit_visit = made
    return made


def _form() -> Mapping[str, Any] | None:
    """The request's form, when it is one (read when the visit's session is asked for)."""
    return request.form if request.mimetype in _FORMS else None


def _blueprint(gate: SessionGate) -> Blueprint:
    blueprint = Blueprint("statekit", __name__, url_prefix=gate.prefix)
    for name in ("open", "close", "statekit.js"):
        path = f"{gate.prefix}/{name}"
        # Every method reaches the gate, which answers a wrong one with 405 and Allow.
        blueprint.add_url_rule(
            f"/{name}",
            endpoint=name.replace(".", "_"),
            view_func=_serve(gate, path),
            methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            provide_automatic_options=False,  # OPTIONS too: 405, with the gate's Allow
        )
    return blueprint


def _serve(gate: SessionGate, path: str) -> Callable[[], Response]:
    def serve() -> Response:
        body = request.stream.read(_CLOSE_BODY_MAX) if gate.endpoint(path) == "close" else b""
        answer = gate.serve(request.method, path, body, dict(request.headers))
        assert answer is not None  # the path is one of the gate's
        return _response(answer)

    return serve


def _response(answer: Answer) -> Response:
    return Response(answer.body, status=answer.status, headers=dict(answer.headers))


def _add_headers(response: Response) -> Response:
    made: Visit | None = g.get("statekit_visit")
    if made is not None:
        for name, value in made.response_headers():
            if name.lower() == "set-cookie":
                response.headers.add(name, value)  # next to the app's own cookies
            elif name.lower() == "vary":
                response.vary.update(part.strip() for part in value.split(","))
            else:  # one value: Cache-Control replaces a view's (a cookie is private)
                response.headers[name] = value
    return response


def _answer_own_errors_first(app: Flask) -> None:
    """Answer statekit's errors about the request's own session (and a busy or
    unreachable store) before Flask looks for the app's handlers: Flask tries a
    blueprint's handlers, for any of an error's classes, before the app's, so a
    blueprint's ``errorhandler(Exception)`` (or ``KeyError``, which
    :class:`~statekit.SessionNotFound` is) would otherwise answer an ended session
    itself and the page would never be told. Any other error, and one about another
    session a view looked up, goes on to Flask's own handling."""
    handle = app.handle_user_exception

    def handle_user_exception(error: Exception) -> Any:
        if isinstance(error, _ANSWERED):
            answer = visit().answer(error)
            if answer is not None:
                return _response(answer)
        return handle(error)

    app.handle_user_exception = handle_user_exception  # type: ignore[method-assign,assignment]
