"""The shop (``shop.py``) on Flask, through ``statekit.integrations.flask``.

Run it (``pip install 'statekit[flask,browser]'``)::

    python docs/examples/flask_shop.py --port 8000

or with several workers on Redis (each worker makes its own engine at import; with
``--preload`` the master makes it and the workers inherit it: both work)::

    export STATEKIT_REDIS_URL=redis://127.0.0.1:6379/0
    export STATEKIT_SECRETS=...   # one secret for every worker, 32+ characters
    gunicorn -w 2 --chdir docs/examples flask_shop:app

Each tab of a browser has its own cart (statekit.js opens a session per tab), the visit
counter is shared by everyone, and the username signed in is kept in the browser, for
every tab of it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from flask import Flask, Response, request
from shop import PAGE, Shop

from statekit.integrations.flask import StateKit, visit

app = Flask(__name__)
shop = Shop()
StateKit(app, shop.engine)  # statekit's endpoints, each request's visit, its answers


@app.errorhandler(ValueError)
def bad_value(exc: ValueError) -> tuple[dict[str, str], int]:
    return {"detail": str(exc)}, 400


def field(name: str) -> object:
    """A field of the request's JSON object (None if absent or not an object)."""
    body = request.get_json(silent=True)
    return body.get(name) if isinstance(body, dict) else None


@app.get("/")
def page() -> str:
    return PAGE


@app.post("/api/visit")
def count_visit() -> dict[str, Any]:
    with visit().event() as ev:  # raises first when the tab's session has ended
        visits = shop.visits.increment()
        return {**shop.show(ev), "visits": visits}


@app.post("/api/cart")
def add_to_cart() -> dict[str, Any]:
    with visit().event() as ev:
        return shop.add(ev, field("item"))


@app.post("/api/login")
def login() -> dict[str, Any]:
    with visit().event() as ev:
        return shop.login(ev, field("username"))


@app.after_request
def worker_header(response: Response) -> Response:
    """``X-Worker: <pid>`` when ``STATEKIT_EXAMPLE_PID_HEADER=1`` (for multi-worker tests)."""
    if os.environ.get("STATEKIT_EXAMPLE_PID_HEADER") == "1":
        response.headers["X-Worker"] = str(os.getpid())
    return response


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    app.run(host="127.0.0.1", port=parser.parse_args().port, threaded=True)
