"""A WSGI app for the gunicorn ``--preload`` test: its engine is made at import, in
gunicorn's master process, before the workers are forked from it.

``GET /open?<sid>`` opens the session's object of the registry in the worker that
serves it and answers that worker's pid. Each cleanup appends ``<pid> <sid>`` to the
file ``STATEKIT_TEST_LOG``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from statekit import StateEngine
from statekit.stores import Store
from statekit.stores.redis import RedisStore
from statekit.stores.sqlite import SQLiteStore

KIND = os.environ["STATEKIT_TEST_KIND"]
WHERE = os.environ["STATEKIT_TEST_WHERE"]
PREFIX = os.environ["STATEKIT_TEST_PREFIX"]
LOG = os.environ["STATEKIT_TEST_LOG"]

store: Store = SQLiteStore(WHERE) if KIND == "sqlite" else RedisStore(WHERE, prefix=PREFIX)
engine = StateEngine(store, app="preload")


def cleanup(sid: str) -> None:
    with open(LOG, "a") as log:  # one short line per write: appends do not interleave
        log.write(f"{os.getpid()} {sid}\n")


objects = engine.registry("conn", lambda sid: sid, cleanup)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    objects.open(environ["QUERY_STRING"])
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
