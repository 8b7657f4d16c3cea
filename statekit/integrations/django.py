"""The Django middleware: statekit's endpoints, each request's
:class:`~statekit.web.Visit`, its response headers and the answers to ended sessions,
from settings alone (no urls to add).

::

    # settings.py
    MIDDLEWARE = [..., "statekit.integrations.django.StateKitMiddleware"]  # last
    STATEKIT_ENGINE = "myshop.state.engine"  # dotted path, or the engine itself

    # views.py
    from statekit.integrations.django import visit_of

    def add(request):
        with visit_of(request).event() as ev:
            ev[cart].append(json.loads(request.body)["item"])
            return JsonResponse({"cart": ev[cart]})

Settings:

- ``STATEKIT_ENGINE`` (required): the app's :class:`~statekit.StateEngine`, the
  dotted path to one (``"myshop.state.engine"``), or a callable returning one (or the
  dotted path to such a callable), called once per process;
- ``STATEKIT_PREFIX`` (default ``"/statekit"``): where statekit's endpoints live;
- ``STATEKIT_COOKIE`` (default True): whether a page load with no session of its own
  may open one kept in a cookie (the fallback for pages without JavaScript: one
  session per *browser*, every tab shares it);
- ``STATEKIT_ALLOWED_ORIGINS`` (default none): origins
  (``"https://app.example.com"``) of pages served elsewhere that may open and close
  sessions and name one in a form; by default only the project's own pages may.

List the middleware **last** in ``MIDDLEWARE``: Django calls ``process_exception``
from the last middleware listed to the first, and a view's exception reaches only that
hook (Django turns it into a response inside ``get_response``), so a middleware listed
after this one that answers every error would answer statekit's first.

What the middleware does:

- answers ``<prefix>/open``, ``<prefix>/close`` and ``<prefix>/statekit.js`` itself,
  wherever it is listed, before URL resolution and before any ``process_view`` (so
  ``CsrfViewMiddleware`` does not see them: a close beacon carries no CSRF token); it
  refuses ``open`` and ``close`` sent by another site's page (``403``) instead;
- sets ``request.statekit`` to the request's :class:`~statekit.web.Visit`
  (:func:`visit_of` reads it, typed): its session comes from the
  ``X-Statekit-Session`` header, else the ``statekit_session`` field of a posted form
  (read from ``request.POST`` only when the session is asked for: a view that reads
  ``request.body`` and never asks keeps it), else (on a page load, when the cookie is
  on) the fallback cookie (``__Host-statekit_session`` over HTTPS);
- adds the visit's headers to the response (new browser tokens; the fallback cookie,
  through ``response.cookies``, with ``Cache-Control: private, no-store``);
- answers :class:`~statekit.SessionNotFound` (and its kinds) about the request's own
  session, raised by a view, with ``409`` and ``X-Statekit-Session-Ended``,
  :class:`~statekit.SessionBusy` and :class:`~statekit.StoreUnavailable` with ``503``
  and ``Retry-After`` (``process_exception``), as :func:`statekit.web.answer_for`
  says;
- shuts each engine down once when the process exits (``atexit``: a WSGI server has no
  shutdown signal for the app). An engine shut down before then is left alone.

The engine's blocking calls are used (the middleware is synchronous; under ASGI Django
runs it in a thread). Thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils.cache import patch_vary_headers
from django.utils.module_loading import import_string

from statekit import StateEngine
from statekit.web import PREFIX, Answer, SessionGate, Visit, shut_down_at_exit, visit_headers

__all__ = ["StateKitMiddleware", "engine_from_settings", "visit_of"]

_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")
#: The most of a close beacon's body read (an id is 32 characters).
_CLOSE_BODY_MAX = 1024


class StateKitMiddleware:
    """statekit on a Django project; list it last in ``MIDDLEWARE``, so that its
    ``process_exception`` is the first Django calls (it calls them from the last
    middleware listed to the first).

    Args:
        get_response: the next middleware or the view (Django passes it).

    Raises:
        ImproperlyConfigured: ``STATEKIT_ENGINE`` is missing or names no engine, or
            ``STATEKIT_PREFIX`` is not a path like ``"/statekit"``, or
            ``STATEKIT_ALLOWED_ORIGINS`` is a string rather than a list.
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        engine = engine_from_settings()
        try:
            self.gate = SessionGate(
                engine,
                prefix=getattr(settings, "STATEKIT_PREFIX", PREFIX),
                cookie=bool(getattr(settings, "STATEKIT_COOKIE", True)),
                allowed_origins=getattr(settings, "STATEKIT_ALLOWED_ORIGINS", ()),
            )
        except ValueError as exc:
            raise ImproperlyConfigured(f"STATEKIT_PREFIX: {exc}") from None
        except TypeError as exc:
            raise ImproperlyConfigured(f"STATEKIT_ALLOWED_ORIGINS: {exc}") from None
        shut_down_at_exit(engine)

    def __repr__(self) -> str:
        return f"StateKitMiddleware({self.gate!r})"

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        method = request.method or "GET"
        endpoint = self.gate.endpoint(request.path_info)
        if endpoint is not None:
            body = request.read(_CLOSE_BODY_MAX) if endpoint == "close" else b""
            answer = self.gate.serve(method, request.path_info, body, request.headers)
            assert answer is not None  # the path is one of the gate's
            return _response(answer)

        def form() -> Mapping[str, Any] | None:  # read when the session is asked for
            return request.POST if method == "POST" and request.content_type in _FORMS else None

        made = self.gate.visit(
            method,
            visit_headers(request.headers, any_case=True),
            cookies=request.COOKIES,  # the gate reads gate.cookie_name_for(secure)
            form=form,
            secure=request.is_secure(),
        )
        request.statekit = made  # type: ignore[attr-defined]
        response = self.get_response(request)
        for name, value in made.response_headers():
            if name.lower() == "set-cookie":
                response.cookies.load(value)  # Django sends response.cookies itself
            elif name.lower() == "vary":
                patch_vary_headers(response, [part.strip() for part in value.split(",")])
            else:  # one value: Cache-Control replaces a view's (a cookie is private)
                response[name] = value
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        """The answer to an error a view raised that statekit answers (this request's
        session ended, a busy session, an unavailable store), or None for Django (and
        the middleware listed before this one) to handle."""
        made = getattr(request, "statekit", None)
        if not isinstance(made, Visit):
            return None
        answer = made.answer(exception)
        return None if answer is None else _response(answer)


def visit_of(request: HttpRequest) -> Visit:
    """The request's :class:`~statekit.web.Visit` (``request.statekit``), typed.

    Raises:
        RuntimeError: the request did not pass through :class:`StateKitMiddleware`
            (it is not in ``MIDDLEWARE``, or a middleware listed before it asks in its
            ``__call__`` before calling ``get_response``: ask in ``process_view``,
            which Django calls once every middleware has seen the request).

    Example::

        def count(request):
            with visit_of(request).event() as ev:
                return JsonResponse(shop.show(ev))
    """
    made = getattr(request, "statekit", None)
    if not isinstance(made, Visit):
        raise RuntimeError(
            "this request has no statekit visit: add "
            "'statekit.integrations.django.StateKitMiddleware' to MIDDLEWARE (last; "
            "a middleware asks for the visit in process_view, not before get_response)"
        )
    return made


_made: dict[Callable[[], object], StateEngine] = {}
_made_lock = threading.Lock()


def engine_from_settings() -> StateEngine:
    """The engine ``STATEKIT_ENGINE`` names: the engine itself, a dotted path to it, or
    a callable (or the dotted path to one) returning it, called once per process.

    Raises:
        ImproperlyConfigured: the setting is missing, or names no engine.
    """
    setting = getattr(settings, "STATEKIT_ENGINE", None)
    if setting is None:
        raise ImproperlyConfigured(
            "StateKitMiddleware needs STATEKIT_ENGINE in settings: the app's "
            "StateEngine, or the dotted path to it (like 'myshop.state.engine')"
        )
    found = setting
    if isinstance(found, str):
        try:
            found = import_string(found)
        except ImportError as exc:
            raise ImproperlyConfigured(f"STATEKIT_ENGINE {setting!r}: {exc}") from None
    what = "is"
    if callable(found) and not isinstance(found, StateEngine):
        factory, what = found, "returned"
        with _made_lock:  # once per process, however many times Django loads middleware
            found = _made.get(factory)
            if found is None:
                found = factory()
                if isinstance(found, StateEngine):
                    _made[factory] = found
    if not isinstance(found, StateEngine):
        raise ImproperlyConfigured(
            f"STATEKIT_ENGINE {setting!r} {what} an object of type "
            f"{type(found).__name__}, not a StateEngine (or a callable returning one)"
        )
    return found


def _response(answer: Answer) -> HttpResponse:
    headers = dict(answer.headers)
    cookie = headers.pop("Set-Cookie", None)
    response = HttpResponse(answer.body, status=answer.status, headers=headers)
    if cookie is not None:  # Django sends its cookies from response.cookies
        response.cookies.load(cookie)
    return response
