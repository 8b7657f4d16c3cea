"""The shop (``shop.py``) on aiohttp, with an adapter written here: statekit ships no
aiohttp integration, and needs none. The adapter uses only statekit's public API
(``statekit.web``): a :class:`~statekit.web.SessionGate` for the app, a
:class:`~statekit.web.Visit` per request, an :class:`~statekit.web.Answer` sent as it
is. The same few lines fit any host (Litestar, Quart, a websocket server).

Run it (``pip install 'aiohttp>=3.14' 'statekit[browser]'``)::

    python docs/examples/aiohttp_shop.py --port 8000
"""

from __future__ import annotations

import argparse

from aiohttp import web as aio
from aiohttp.typedefs import Handler
from shop import PAGE, Shop

from statekit import web

#: Where a request keeps its visit (typed: ``request[VISIT]`` is a ``web.Visit``).
VISIT = aio.RequestKey("statekit", web.Visit)


def add_headers(response: aio.StreamResponse, visit: web.Visit) -> None:
    """Add the visit's headers to a response: new browser tokens, a fallback cookie."""
    for name, value in visit.response_headers():
        response.headers.add(name, value)  # add: a Set-Cookie of the app's is kept


def make_app(shop: Shop) -> aio.Application:
    """The shop's aiohttp app, its requests in statekit's sessions."""
    gate = web.SessionGate(shop.engine)  # one per app: statekit's endpoints, visits

    def reply(answer: web.Answer) -> aio.Response:
        return aio.Response(status=answer.status, headers=answer.headers, body=answer.body)

    @aio.middleware
    async def statekit(request: aio.Request, handler: Handler) -> aio.StreamResponse:
        body = await request.read() if gate.endpoint(request.path) == "close" else b""
        served = await gate.aserve(request.method, request.path, body, request.headers)
        if served is not None:  # statekit's endpoints: open, close, statekit.js
            return reply(served)
        visit = gate.visit(
            request.method, request.headers, cookies=request.cookies, secure=request.secure
        )
        request[VISIT] = visit  # what the handlers open their events on
        try:
            response = await handler(request)
        except aio.HTTPException as exc:  # a redirect or an error page, raised: sent too
            add_headers(exc, visit)
            raise
        except Exception as exc:
            answer = visit.answer(exc)  # an ended session: 409; busy: 503; else None
            if answer is None:
                raise
            return reply(answer)
        add_headers(response, visit)
        return response

    async def shut_down(app: aio.Application) -> None:
        await shop.engine.ashutdown()

    app = aio.Application(middlewares=[statekit, refused])
    app.on_cleanup.append(shut_down)
    app.add_routes(routes(shop))
    return app


@aio.middleware
async def refused(request: aio.Request, handler: Handler) -> aio.StreamResponse:
    """The shop's refusals (a bad item or name, a body that is not JSON): ``400``."""
    try:
        return await handler(request)
    except ValueError as exc:
        return aio.json_response({"detail": str(exc)}, status=400)


async def field(request: aio.Request, name: str) -> object:
    """A field of the request's JSON object (None if absent or not an object)."""
    body = await request.json() if request.can_read_body else None
    return body.get(name) if isinstance(body, dict) else None


def routes(shop: Shop) -> aio.RouteTableDef:
    """The shop's pages and API; each handler opens its event on the request's visit."""
    table = aio.RouteTableDef()

    @table.get("/")
    async def page(request: aio.Request) -> aio.Response:
        return aio.Response(text=PAGE, content_type="text/html")

    @table.post("/api/visit")
    async def count_visit(request: aio.Request) -> aio.Response:
        async with request[VISIT].aevent() as ev:  # the session is checked first
            visits = await shop.visits.aincrement()
            return aio.json_response({**shop.show(ev), "visits": visits})

    @table.post("/api/cart")
    async def add_to_cart(request: aio.Request) -> aio.Response:
        item = await field(request, "item")
        async with request[VISIT].aevent() as ev:
            return aio.json_response(shop.add(ev, item))

    @table.post("/api/login")
    async def login(request: aio.Request) -> aio.Response:
        username = await field(request, "username")
        async with request[VISIT].aevent() as ev:
            return aio.json_response(shop.login(ev, username))

    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    aio.run_app(make_app(Shop()), host="127.0.0.1", port=parser.parse_args().port)
