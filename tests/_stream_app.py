"""An ASGI app for the change stream's shutdown test: a memory engine behind
``StateKitMiddleware``, whose session-end hook appends ``<reason>`` to the file
``STATEKIT_TEST_LOG``."""

from __future__ import annotations

import os

from starlette.applications import Starlette

from statekit import DeleteReason, StateEngine
from statekit.integrations.asgi import StateKitMiddleware

LOG = os.environ["STATEKIT_TEST_LOG"]

engine = StateEngine()


@engine.on_close
def ended(sid: str, reason: DeleteReason) -> None:
    with open(LOG, "a") as log:
        log.write(reason.value + "\n")


app = Starlette()
app.add_middleware(StateKitMiddleware, engine=engine)
