from __future__ import annotations

import contextlib
import functools
import gc
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from statekit import SessionState, StateEngine
from statekit.stores import MemoryStore, Notice, Store
from statekit.stores.redis import RedisStore
from statekit.stores.sqlite import SQLiteStore
from statekit.testing import FakeClock, RedisCluster, RedisSentinel, RedisServer

settings.register_profile("default", max_examples=300)
settings.register_profile("thorough", max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


#: Fixtures of the set-ups whose masters tests fail over or whose slots they move: a
#: connection a client dropped there is collected right after each test that used one,
#: so that its ResourceWarning (an error here) fails the test that left it, not a
#: later one.
_COLLECT_AFTER = {"redis_cluster", "redis_sentinel"}


@pytest.fixture(autouse=True)
def _collect_dropped_connections(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    # Redis stores a test made and left open are closed after it: the garbage
    # collector would find their sockets open during whichever test runs then (with
    # tests in parallel, any), and fail that one with a ResourceWarning.
    made: list[RedisStore] = []
    init = RedisStore.__init__

    @functools.wraps(init)
    def tracked(self: RedisStore, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(RedisStore, "__init__", tracked)
    yield
    for store in made:
        with contextlib.suppress(Exception):  # a store a test broke on purpose
            store.close()
    if _COLLECT_AFTER.intersection(request.fixturenames):
        gc.collect()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(clock: FakeClock) -> Iterator[StateEngine]:
    eng = StateEngine(clock=clock, idle_ttl=60, closed_ttl=30, capacity=1000)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the whole run (fails, never skips, without one)."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A private Redis Cluster (3 masters, 3 replicas) shared by the whole run (fails,
    never skips, without redis-server and redis-cli). Each test uses keys of its own
    prefix; a test that kills a node calls ``redis_cluster.restore()`` in a finally, so
    that the next test finds every master with its replica."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    """A private Sentinel set-up (master, replica, 3 sentinels) shared by the whole run
    (fails, never skips, without redis-server and redis-sentinel). Each test uses keys
    of its own prefix; a test that kills the master calls ``redis_sentinel.restore()``
    in a finally, so that the next test finds a master with its replica."""
    with RedisSentinel() as setup:
        yield setup


StoreFactory = Callable[[], Store]


class Switchboard(MemoryStore):
    """A memory store whose notices a test controls: ``paused`` stops delivering them
    (as a lost connection would), :meth:`send` delivers one of the test's own (a
    ``resync``, say) to every subscriber, and ``failing`` makes loads fail (a store
    that cannot be reached)."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.failing = False
        self._callbacks: list[Callable[[Notice], None]] = []

    def namespace(self, app: str) -> Any:
        ns = super().namespace(app)
        board = self

        class Handle:
            def __getattr__(self, name: str) -> Any:
                return getattr(ns, name)

            def subscribe(self, callback: Callable[[Notice], None]) -> Callable[[], None]:
                def forward(notice: Notice) -> None:
                    if not board.paused:
                        callback(notice)

                board._callbacks.append(callback)
                return ns.subscribe(forward)

            def load_session(self, *args: Any, **kwargs: Any) -> Any:
                if board.failing:
                    raise ConnectionError("store down")
                return ns.load_session(*args, **kwargs)

        return Handle()

    def send(self, notice: Notice) -> None:
        for callback in list(self._callbacks):
            callback(notice)


def declared(engine: StateEngine, name: str) -> SessionState[Any]:
    """The session state ``name`` declared on ``engine``."""
    state = engine.states[name]
    assert isinstance(state, SessionState)
    return state


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-cluster"])
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> Iterator[StoreFactory]:
    """Makes stores of one kind; stores made for one test share their data. On
    ``redis-cluster`` the engine's sessions spread over the cluster's 48 buckets."""
    made: list[Store] = []
    memory = MemoryStore()
    prefix = f"t{uuid.uuid4().hex[:8]}"

    def make() -> Store:
        store: Store
        if request.param == "memory":
            store = memory
        elif request.param == "sqlite":
            store = SQLiteStore(tmp_path / "state.db")
        elif request.param == "redis":
            store = RedisStore(redis_server.url, prefix=prefix)
        else:
            cluster: RedisCluster = request.getfixturevalue("redis_cluster")
            nodes = ",".join(f"{host}:{port}" for host, port in cluster.startup_nodes)
            store = RedisStore(f"redis+cluster://{nodes}", prefix=prefix)
        made.append(store)
        return store

    yield make
    for store in made:
        close = getattr(store, "close", None)
        if close is not None:
            close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """Keep each phase's report on the test item (browser tests screenshot failures)."""
    report = yield
    setattr(item, "rep_" + report.when, report)  # type: ignore[attr-defined]
    return report
