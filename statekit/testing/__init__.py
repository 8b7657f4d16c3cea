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
``statekit.js`` would, tab by tab; :class:`RedisServer` runs a private Redis server,
:class:`RedisCluster` a private Redis Cluster and :class:`RedisSentinel` a private
Sentinel set-up (a master, its replica and three sentinels), each on loopback ports.
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
from statekit.testing.redis_cluster import RedisCluster
from statekit.testing.redis_sentinel import RedisSentinel
from statekit.testing.redis_server import RedisServer

__all__ = [
    "Browser",
    "BrowserError",
    "FakeClock",
    "Headers",
    "RedisCluster",
    "RedisSentinel",
    "RedisServer",
    "Response",
    "Tab",
    "Transport",
    "TransportAnswer",
    "checked_store",
    "transport_for",
]
