"""The shop (``shop.py``) on FastAPI, through ``statekit.integrations.asgi`` and
``statekit.integrations.fastapi``.

Run it (``pip install 'statekit[fastapi,web]'``)::

    python docs/examples/fastapi_shop.py --port 8000

or with several workers on Redis (each worker makes its own engine at import)::

    export STATEKIT_REDIS_URL=redis://127.0.0.1:6379/0
    export STATEKIT_SECRETS=...   # one secret for every worker, 32+ characters
    uvicorn --app-dir docs/examples fastapi_shop:app --workers 2

Each tab of a browser has its own cart (statekit.js opens a session per tab), the visit
counter is shared by everyone, and the username signed in is kept in the browser, for
every tab of it. The handlers are async and use only the engine's async calls, which
never block the event loop, whatever the store.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Body, FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from shop import PAGE, Shop

from statekit.integrations.asgi import install
from statekit.integrations.fastapi import CurrentVisit

#: A field of the request's JSON object (None when absent).
Field = Annotated[Any, Body(embed=True)]


def build_app(shop: Shop | None = None) -> FastAPI:
    """The shop's app, over ``shop`` (a new :class:`shop.Shop` by default)."""
    shop = shop or Shop()
    app = FastAPI(title="statekit shop")
    install(app, shop.engine)  # statekit's middleware and its error answers

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.post("/api/visit")
    async def count_visit(visit: CurrentVisit) -> dict[str, Any]:
        async with visit.aevent() as ev:  # the session is checked first
            visits = await shop.visits.aincrement()
            return {**shop.show(ev), "visits": visits}

    @app.post("/api/cart")
    async def add_to_cart(visit: CurrentVisit, item: Field = None) -> dict[str, Any]:
        async with visit.aevent() as ev:
            return shop.add(ev, item)

    @app.post("/api/login")
    async def login(visit: CurrentVisit, username: Field = None) -> dict[str, Any]:
        async with visit.aevent() as ev:
            return shop.login(ev, username)

    if os.environ.get("STATEKIT_EXAMPLE_PID_HEADER") == "1":  # for multi-worker tests

        @app.middleware("http")
        async def worker_header(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            response = await call_next(request)
            response.headers["X-Worker"] = str(os.getpid())
            return response

    return app


app = build_app()

if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    uvicorn.run(app, host="127.0.0.1", port=parser.parse_args().port)
