"""statekit in FastAPI: the request's visit as a dependency.

With :class:`~statekit.integrations.asgi.StateKitMiddleware` on the app, a handler
takes a :data:`CurrentVisit` and opens its events on it; the page's browser tokens go
in and out, and an ended session is answered ``409`` as the page expects::

    from fastapi import FastAPI
    from statekit.integrations.asgi import StateKitMiddleware
    from statekit.integrations.fastapi import CurrentVisit

    app = FastAPI()
    app.add_middleware(StateKitMiddleware, engine=engine)

    @app.post("/api/cart")
    async def add(item: Item, visit: CurrentVisit) -> dict[str, Any]:
        async with visit.aevent() as ev:
            ev[cart].append(item.name)
        return {"cart": ...}
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib.util import find_spec
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import Depends, Request
from starlette.types import Message

from statekit import web
from statekit.integrations.asgi import visit_of

__all__ = ["CurrentVisit", "statekit_visit"]

#: The largest urlencoded form read for its session field (a page's forms are small).
_MAX_FORM_BYTES = 1024 * 1024
#: The bodies that may carry the session in a field.
_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")


async def statekit_visit(request: Request) -> web.Visit:
    """The request's :class:`~statekit.web.Visit`, given by
    :class:`~statekit.integrations.asgi.StateKitMiddleware`. For a form post that names
    no session in a header, the session is taken from the form's ``statekit_session``
    field (the hidden field ``statekit.js`` fills), read only when the handler asks for
    the session: a handler that never does keeps the request's body unread, and one
    that does can still read it (``request.body()``, ``request.form()``).

    Args:
        request: the request (FastAPI passes it).

    Returns:
        The request's visit.

    Raises:
        UsageError: the app has no :class:`~statekit.integrations.asgi.StateKitMiddleware`.

    Example::

        @app.post("/api/visit")
        async def count(visit: Annotated[Visit, Depends(statekit_visit)]) -> ...:
            async with visit.aevent() as ev:
                ...
    """
    visit = visit_of(request)
    if visit.wants_form and request.method == "POST" and _form_kind(request) in _FORMS:
        # Only a form may name its session in a field: any other body is never read
        # for it (and a plain ``def`` handler's visit then needs no async read).
        visit.read_form_with(functools.partial(_form, request))
    return visit


def _form_kind(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _form(request: Request) -> Mapping[str, Any] | None:
    """The request's form fields (only its session field, for a multipart form), if it
    is a form of at most 1 MiB by its Content-Length, checked before anything is read.

    The body is read with ``request.body()``, which Starlette keeps, so the handler
    reads it again (``request.body()``, ``request.stream()``, ``request.form()``). An
    urlencoded form is parsed with the standard library; a multipart form, with
    Starlette's parser (python-multipart), over a copy of the request whose files are
    closed at once. A form FastAPI already parsed for the handler's ``Form`` fields is
    used as it is; a body the handler consumed as a stream reads as no form."""
    kind = _form_kind(request)
    if kind not in _FORMS:
        return None
    length = request.headers.get("content-length", "")
    if not length.isdigit() or int(length) > _MAX_FORM_BYTES:
        return None
    multipart = find_spec("python_multipart") is not None
    try:
        body = await request.body()
    except RuntimeError:  # consumed: a form FastAPI parsed (and closes) is kept, or none
        if not multipart:
            return None
        try:
            return await request.form()
        except RuntimeError:
            return None
    if kind == "application/x-www-form-urlencoded":
        return dict(parse_qsl(body[:_MAX_FORM_BYTES].decode("latin-1"), keep_blank_values=True))
    if not multipart:
        return None

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async with Request(request.scope, replay).form() as form:
        value = form.get(web.SESSION_FIELD)
    return {web.SESSION_FIELD: value} if isinstance(value, str) else {}


#: A handler's parameter for the request's visit: ``async def add(visit: CurrentVisit)``.
CurrentVisit = Annotated[web.Visit, Depends(statekit_visit)]
