"""Test helpers shipped with statekit.

:class:`FakeClock` replaces the engine's clock so that lifetimes can be tested
without sleeping, and :func:`checked_store` makes a memory store that refuses what a
shared store would::

    clock = FakeClock()
    engine = StateEngine(checked_store(), clock=clock, idle_ttl=60)
    sid = engine.open_session()
    clock.advance(61)
    engine.reap()  # the session is gone, its callbacks ran

:class:`Browser` drives a web app through its framework's test client as pages using
``statekit.js`` would, tab by tab; :class:`RedisServer` runs a private Redis server.
"""

from __future__ import annotations

from statekit.testing.browser import (
    Browser,
    BrowserError,
    Headers,
    Response,
    Tab,
    Transport,
    TransportAnswer,
    transport_for,
)
from statekit.testing.fakes import FakeClock, checked_store
from statekit.testing.redis_server import RedisServer

__all__ = [
    "Browser",
    "BrowserError",
    "FakeClock",
    "Headers",
    "RedisServer",
    "Response",
    "Tab",
    "Transport",
    "TransportAnswer",
    "checked_store",
    "transport_for",
]
