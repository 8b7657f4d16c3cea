"""The Redis store: the store contract, the asyncio client, and the scripts as the
server sees them (each cached once, every key they touch declared)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import redis
import redis.asyncio as aioredis

from statekit import SessionState, StateEngine
from statekit.exceptions import CodecError, SessionCorrupt, StoreConflict, StoreUnavailable
from statekit.stores import Loaded, Store, StoreNamespace
from statekit.stores._redis_staged import settle, staged_commit
from statekit.stores.base import CommitPart
from statekit.stores.redis import RedisStore
from statekit.testing import FakeClock, RedisSentinel, RedisServer

from .store_contract import Awaited, SharedStoreContract


class TestRedisStore(SharedStoreContract):
    @pytest.fixture(autouse=True)
    def _server(self, redis_server: RedisServer) -> None:
        self.server = redis_server

    def make_store(self) -> Store:
        return RedisStore(self.server.url, prefix=f"t{uuid.uuid4().hex[:6]}")


class TestRedisStoreAwaited(SharedStoreContract):
    """The store contract through the namespace's async methods, on an asyncio client:
    an open at capacity, a reap, a peek, a float's add, each made of several calls,
    answer as the blocking ones do. Fails without them, or if one differs."""

    @pytest.fixture(autouse=True)
    def _loop(self, redis_server: RedisServer) -> Iterator[None]:
        self.server = redis_server
        self.loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        thread.start()
        self.client = aioredis.Redis.from_url(redis_server.url)
        yield
        asyncio.run_coroutine_threadsafe(self.client.aclose(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        thread.join(10)
        self.loop.close()

    def make_store(self) -> Store:
        return RedisStore(
            self.server.url, async_client=self.client, prefix=f"aw{uuid.uuid4().hex[:6]}"
        )

    def through(self, ns: StoreNamespace) -> StoreNamespace:
        return Awaited(ns, self.loop)


def test_async_events_use_the_asyncio_client_and_never_block_the_loop(
    redis_server: RedisServer,
) -> None:

    async def main() -> tuple[list[int], int, bool]:
        client = aioredis.Redis.from_url(redis_server.url)
        pool: Any = client.connection_pool
        get_available_connection = pool.get_available_connection
        sent = 0
        counting: set[int] = set()

        def counted_connection() -> Any:
            # Count what is sent on the connections of the client's pool.
            conn = get_available_connection()
            if id(conn) not in counting:
                counting.add(id(conn))
                send = conn.send_packed_command

                async def counted(*args: Any, **kwargs: Any) -> Any:
                    nonlocal sent
                    sent += 1
                    return await send(*args, **kwargs)

                conn.send_packed_command = counted
            return conn

        pool.get_available_connection = counted_connection
        store = RedisStore(
            redis_server.url, async_client=client, prefix=f"a{uuid.uuid4().hex[:6]}"
        )
        engine = StateEngine(store, app="shop")
        log: SessionState[list[int]] = engine.session_state("log", [])
        sid = engine.open_session()
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        async def writer(i: int) -> None:
            async with engine.aevent(sid) as ev:
                ev[log].append(i)

        tick_task = asyncio.create_task(ticker())
        await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(30))), 30)
        stop.set()
        await tick_task
        used_async = sent >= 60  # each event's load and commit
        values = log.get(sid)
        engine.shutdown()
        store.close()
        await client.aclose()
        return values, ticks, used_async

    values, ticks, used_async = asyncio.run(main())
    assert sorted(values) == list(range(30))
    assert used_async  # loads and commits went through the asyncio client
    assert ticks > 30  # the loop kept running while events waited on Redis


def test_async_calls_keep_no_connection_of_the_clients_pool(redis_server: RedisServer) -> None:
    """The store sends on connections of the app's asyncio client and gives each back
    after its reply: a burst of events on a client bounded to 4 connections leaves
    them all to the app; stores opened and closed over one client, or given a
    client that is then dropped, leave no connection open; a single-connection
    client keeps its one connection. Fails if the store kept connections between
    calls (they were kept, once, and starved the app's pool)."""
    server = redis.Redis.from_url(redis_server.url)
    prefix = f"keep{uuid.uuid4().hex[:6]}"

    def open_connections(name: str) -> int:
        return sum(1 for c in server.client_list() if c.get("name") == name)

    async def burst() -> None:
        client = aioredis.Redis.from_url(redis_server.url, max_connections=4, client_name="b")
        store = RedisStore(redis_server.url, async_client=client, prefix=prefix)
        engine = StateEngine(store, app="shop")
        count = engine.session_state("count", 0)
        sids = [engine.open_session() for _ in range(4)]

        async def bump(sid: str) -> None:
            async with engine.aevent(sid) as ev:
                ev[count] += 1

        await asyncio.gather(*(bump(sid) for sid in sids))
        assert [count.get(sid) for sid in sids] == [1, 1, 1, 1]
        assert await asyncio.gather(*(client.ping() for _ in range(4))) == [True] * 4
        engine.shutdown()
        store.close()
        await client.aclose()

    async def stores_over_one_client() -> None:
        client = aioredis.Redis.from_url(redis_server.url, client_name="s")
        for _ in range(10):
            store = RedisStore(redis_server.url, async_client=client, prefix=prefix)
            engine = StateEngine(store, app="shop")
            count = engine.session_state("count", 0)
            sid = engine.open_session()
            async with engine.aevent(sid) as ev:
                ev[count] = 1
            engine.shutdown()
            store.close()
        assert open_connections("s") == 1  # one, kept by the client's own pool
        await client.aclose()

    async def single_connection() -> None:
        client = aioredis.Redis.from_url(
            redis_server.url, single_connection_client=True, client_name="one"
        )
        store = RedisStore(redis_server.url, async_client=client, prefix=prefix)
        engine = StateEngine(store, app="shop")
        count = engine.session_state("count", 0)
        sid = engine.open_session()
        for _ in range(3):
            async with engine.aevent(sid) as ev:
                ev[count] += 1
        assert count.get(sid) == 3
        assert open_connections("one") == 1
        engine.shutdown()
        store.close()
        await client.aclose()

    asyncio.run(burst())
    asyncio.run(stores_over_one_client())
    asyncio.run(single_connection())


def test_a_connection_goes_back_through_the_pools_release_when_it_has_work_to_do(
    redis_server: RedisServer,
) -> None:
    """The store gives a connection back straight to the free list of the asyncio
    client's pool (as ``get_available_connection`` took it), unless the pool's release
    has work to do: a re-auth pending (a streaming credential provider's new token), a
    reconnect asked (maintenance notifications), or the pool's lock held (a re-auth of
    every connection, talking on the free ones); nor does it take a connection while
    that lock is held. Fails if the quick way skipped any of them: the token would
    never be sent, the connection never reconnected, or a connection taken (or its
    lists changed) under the task holding the lock."""

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        pool = client.connection_pool
        store = RedisStore(
            redis_server.url, async_client=client, prefix=f"gb{uuid.uuid4().hex[:6]}"
        )
        engine = StateEngine(store, app="shop")
        count = engine.session_state("count", 0)
        sid = engine.open_session()

        async def bump() -> None:
            async with engine.aevent(sid) as ev:
                ev[count] += 1

        await bump()
        conn: Any = pool._available_connections[0]
        assert len(pool._available_connections) == 1
        assert not pool._in_use_connections  # given back, the quick way

        reauthed: list[object] = []

        async def re_auth() -> None:
            reauthed.append(conn._re_auth_token)
            conn._re_auth_token = None

        conn.re_auth = re_auth
        conn._re_auth_token = "token"
        await bump()
        assert reauthed == ["token"]  # once: the load's give-back ran the release

        disconnects = 0
        real_disconnect = conn.disconnect

        async def disconnect(*args: Any, **kwargs: Any) -> None:
            nonlocal disconnects
            disconnects += 1
            await real_disconnect(*args, **kwargs)

        conn.should_reconnect = lambda: True
        conn.disconnect = disconnect
        await bump()
        assert disconnects >= 2  # each give-back, by the release
        del conn.should_reconnect

        await pool._lock.acquire()
        event = asyncio.ensure_future(bump())
        await asyncio.sleep(0.2)
        assert not event.done()  # waits for the lock
        # ... before taking a connection: redis-py talks on the free ones under it
        assert not pool._in_use_connections
        pool._lock.release()
        await event
        assert not pool._in_use_connections
        assert count.get(sid) == 4
        engine.shutdown()
        store.close()
        await client.aclose()

    asyncio.run(scenario())


def test_an_async_write_that_could_not_connect_is_known_not_applied() -> None:
    """A write whose connection could not be made never left: StoreUnavailable says
    so (``outcome_unknown`` false), on the asyncio path as on the blocking one. Fails
    if a failure to connect were taken for a lost reply."""
    server = RedisServer().start()
    try:

        async def main() -> StoreUnavailable:
            client = aioredis.Redis.from_url(server.url)
            store = RedisStore(server.url, async_client=client, prefix="down")
            engine = StateEngine(store, app="shop")
            total = engine.global_state("total", 0)
            await total.aincrement()
            await client.connection_pool.disconnect()
            server.stop()
            try:
                with pytest.raises(StoreUnavailable) as info:
                    await total.aincrement()
                return info.value
            finally:
                engine.shutdown()
                store.close()
                await client.aclose()

        failure = asyncio.run(main())
        assert not failure.outcome_unknown
    finally:
        server.stop()


def test_scripts_the_server_forgot_are_loaded_again_on_both_clients(
    redis_server: RedisServer,
) -> None:
    """A server restarted without its script cache (or ``SCRIPT FLUSH``) answers
    ``NOSCRIPT``: the store loads the script on the same connection and sends it again,
    on the blocking client and on an asyncio one, and a connection the store keeps
    after an error reply stays usable. Fails if either path gave the error to the
    caller, or applied an event twice."""

    async def main() -> list[int]:
        client = aioredis.Redis.from_url(redis_server.url)
        store = RedisStore(
            redis_server.url, async_client=client, prefix=f"nos{uuid.uuid4().hex[:6]}"
        )
        engine = StateEngine(store, app="shop")
        log: SessionState[list[int]] = engine.session_state("log", [])
        sid = engine.open_session()
        for i in range(3):
            redis.Redis.from_url(redis_server.url).script_flush()
            async with engine.aevent(sid) as ev:
                ev[log].append(i)
            redis.Redis.from_url(redis_server.url).script_flush()
            with engine.event(sid) as ev:
                ev[log].append(10 + i)
        values = log.get(sid)
        engine.shutdown()
        store.close()
        await client.aclose()
        return values

    assert asyncio.run(main()) == [0, 10, 1, 11, 2, 12]


# -- the scripts as the server sees them ---------------------------------------------


def exercise(store: RedisStore, clock: FakeClock, app: str = "shop") -> None:
    """Runs every script of the store through most of its branches: opens at capacity
    (a closed session and a junk entry evicted), events, reads, a lease renewed and given back,
    closes, values and sessions past their time, reaping around junk, globals,
    damaged keys, a reply read back, and an event on an asyncio client."""
    engine = StateEngine(store, app=app, clock=clock, idle_ttl=60, closed_ttl=30, capacity=3)
    client = store.client
    keys = store.namespace(app).layout  # where each session's keys are (its bucket's)
    deleted: list[str] = []
    note = engine.session_state("note", "", ttl=10, on_delete=lambda v, _: deleted.append(v))
    first, second = engine.open_session(), engine.open_session()
    with engine.event(first) as ev:
        ev[note] = "one"
    assert note.get(second) == ""
    assert engine.close_session(second) is True
    client.zadd(keys.of("ghost").lru, {"ghost": 0})
    third = engine.open_session()  # evicts the closed session
    fourth = engine.open_session()  # drops the junk entry
    with engine.event(fourth) as ev:
        ev[note] = "four"
        ev.extend()  # the lease renewed
    with pytest.raises(RuntimeError), engine.event(third):
        raise RuntimeError("the lease is given back")
    clock.advance(11)
    assert note.get(first) == ""  # the value's ttl passed
    with engine.event(first) as ev:
        ev[note] = "two"
    client.zadd(keys.first.dl, {"garbage": 0})
    client.zadd(keys.of("nobody").dl, {"s\0nobody": 0, "v\0nobody\0note": 0})
    client.zadd(keys.of(fourth).dl, {f"s\0{fourth}": 0})
    engine.reap()  # around the junk
    clock.advance(61)
    assert engine.reap() == 4  # three sessions and a value
    assert sorted(deleted) == ["four", "one", "two"]
    visitors = engine.global_state("visitors", 0)
    ratio = engine.global_state("ratio", 0.5)
    assert visitors.increment() == 1
    assert ratio.increment(0.25) == 0.75
    visitors.set(5)
    broken = engine.open_session()
    client.delete(keys.of(broken).P + "s:" + broken)
    client.set(keys.of(broken).P + "s:" + broken, "not a hash")
    with pytest.raises(SessionCorrupt), engine.event(broken):
        pass
    with pytest.raises(SessionCorrupt):
        note.get(broken)
    client.set(keys.global_prefix("damaged") + "g:damaged", "not a hash")
    with pytest.raises(CodecError):
        engine.global_state("damaged", 0).increment()
    client.delete(keys.of(first).P + "gone:" + first)
    client.hset(keys.of(first).P + "gone:" + first, "not", "a tombstone")
    assert not engine.exists(first)
    ns: Any = store.namespace(app)
    assert ns._run("REPLAY", [keys.first.P + "q:nothing"], []) == [0]

    async def on_asyncio() -> None:
        store.async_client = aioredis.Redis.from_url(store.url or "")
        async with engine.aevent(third) as ev:
            ev[note] = "async"
        await store.async_client.aclose()
        store.async_client = None

    third = engine.open_session()
    asyncio.run(on_asyncio())
    assert note.get(third) == "async"
    cart: SessionState[list[str]] = engine.user_state("cart", [])
    with engine.event(third, user="alice") as ev:  # a joint commit: the session's and
        ev[note] = "both"  # the user's writes in one script
        ev[cart].append("apple")
    assert (note.get(third), cart.get("alice")) == ("both", ["apple"])
    engine.shutdown()
    # A commit in steps (a cluster's: its slots apart), here on one server: decided,
    # then refused after staging (the session moved on), its staged writes dropped.
    handle: Any = store.namespace(app)
    now = clock()
    for sid in ("staged", "u:staged"):
        handle.create_session(sid, now=now, deadline=now + 60, capacity=100)
    parts = (
        CommitPart(sid="staged", version=0, writes={"note": b'"x"'}, ttl_deadlines={}),
        CommitPart(sid="u:staged", version=0, writes={"cart": b"[]"}, ttl_deadlines={}),
    )
    assert handle._drive(staged_commit(handle, parts, now)) == (1, 1)
    stale = (parts[0], attrs.evolve(parts[1], version=1))
    with pytest.raises(StoreConflict):
        handle._drive(staged_commit(handle, stale, now))
    assert handle._drive(settle(handle, "u:staged", abort=True)) is False  # nothing left


def cached_scripts(client: redis.Redis) -> int:
    return int(client.info("memory")["number_of_cached_scripts"])


def test_the_servers_script_cache_holds_each_script_once() -> None:
    """Scripts used to be written anew for each handle (its origin, channel and key
    prefix in the text): every engine, and every forked worker, added about ten
    scripts to the server's cache, which Redis never empties by itself."""
    server = RedisServer().start()
    try:
        client = redis.Redis.from_url(server.url)
        clock = FakeClock(2_000_000_000.0)
        exercise(RedisStore(server.url, prefix="one"), clock)
        exercise(RedisStore(server.url, prefix="spread", buckets=4), clock)
        after_one = cached_scripts(client)
        store = RedisStore(server.url, prefix="many")
        for i in range(20):
            exercise(store, clock, app=f"app{i}")
            exercise(RedisStore(server.url, prefix=f"many{i}", buckets=i + 2), clock)
        assert cached_scripts(client) == after_one
        handles = list(store._handles)
        origins = {handle.origin for handle in handles}
        for handle in handles:  # as in the child of a fork: a new origin each
            handle._after_fork()
        assert origins.isdisjoint(handle.origin for handle in handles)
        now = clock()
        for handle in handles:  # each handle at work under its new name
            sid = uuid.uuid4().hex
            assert handle.create_session(sid, now=now, deadline=now + 60, capacity=100) == ()
            loaded = handle.load_session(sid, now=now, touch_until=now + 70)
            assert isinstance(loaded, Loaded)
            handle.commit(
                sid, version=loaded.version, writes={"note": b'"x"'}, ttl_deadlines={}, now=now
            )
            assert handle.close_session(sid, now=now, deadline=now + 1) is True
            assert sid in {e.sid for e in handle.reap(now=now + 2, limit=10)}
        assert cached_scripts(client) == after_one
        from statekit.stores.redis import SCRIPTS

        assert after_one == len(SCRIPTS)  # every script ran, each cached once
    finally:
        server.stop()


def _unquoted(line: bytes) -> list[bytes]:
    """The arguments of a MONITOR line (``"arg" "arg"``, escaped as Redis writes them)."""
    escapes = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("a"): 7, ord("b"): 8}
    args: list[bytes] = []
    i = line.index(b'"')
    while i < len(line):
        i += 1
        arg = bytearray()
        while line[i] != ord('"'):
            if line[i] != ord("\\"):
                arg.append(line[i])
                i += 1
            elif line[i + 1] == ord("x"):
                arg.append(int(line[i + 2 : i + 4], 16))
                i += 4
            else:
                arg.append(escapes.get(line[i + 1], line[i + 1]))
                i += 2
        args.append(bytes(arg))
        i += 2  # the closing quote and the space after it
    return args


class KeyWatch:
    """Watches a server's MONITOR stream: every command a script runs must name only
    keys its call declared in KEYS. Redis 7.0 itself refuses only keys of another
    cluster slot, and every key of an app shares one: this is what catches a key a
    script builds from a prefix instead of receiving it. A command's keys are the ones
    the server's own command table says (``COMMAND GETKEYS``)."""

    def __init__(self, server: RedisServer) -> None:
        self._client = redis.Redis.from_url(server.url)
        self._sock = socket.create_connection(("127.0.0.1", server.port))
        self._sock.sendall(b"MONITOR\r\n")
        self._lines = self._sock.makefile("rb")
        assert self._lines.readline() == b"+OK\r\n"
        self._positions: dict[tuple[bytes, int], list[int]] = {}
        self.undeclared: list[str] = []
        self.scripts: set[bytes] = set()
        self._marks: set[bytes] = set()
        self._seen = threading.Condition()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _keys(self, args: list[bytes]) -> list[bytes]:
        shape = (args[0].lower(), len(args))
        if shape in self._positions:  # where this command's keys sit, found before
            return [args[i] for i in self._positions[shape]]
        try:
            found = self._client.command_getkeys(*args)
        except redis.ResponseError:  # a command without keys (PUBLISH)
            found = []
        keys = [key if isinstance(key, bytes) else key.encode() for key in found]
        positions = [i for i, arg in enumerate(args) if i and arg in keys]
        if len(positions) == len(keys):  # unambiguous: remember where they sit
            self._positions[shape] = positions
        return keys

    def _watch(self) -> None:
        declared: set[bytes] | None = None
        for raw in self._lines:
            head, _, rest = raw.rstrip(b"\r\n").partition(b"] ")
            args = _unquoted(rest)
            if not head.endswith(b" lua"):
                name = args[0].lower()
                declared = None
                if name in (b"evalsha", b"eval"):
                    self.scripts.add(args[1])
                    declared = set(args[3 : 3 + int(args[2])])
                elif name == b"echo":
                    with self._seen:
                        self._marks.add(args[1])
                        self._seen.notify_all()
                continue
            keys = self._keys(args)
            missing = [key for key in keys if declared is None or key not in declared]
            if missing:
                with self._seen:
                    self.undeclared.append(f"{args[0].decode()} {missing!r}")

    def undeclared_since(self) -> list[str]:
        """The undeclared keys scripts touched since the last call (each command once,
        in order): waits until every command sent before this call was watched."""
        mark = uuid.uuid4().hex.encode()
        self._client.echo(mark)
        with self._seen:
            assert self._seen.wait_for(lambda: mark in self._marks, timeout=10)
            found, self.undeclared = self.undeclared, []
        return found

    def close(self) -> None:
        """Stop watching: the stream ends, the watching thread reads its end, and the
        socket is closed with the file reading it (a socket closed while a file still
        reads it stays open until both are garbage, which warns)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)
        self._lines.close()
        self._sock.close()
        self._client.close()


@pytest.fixture(scope="module")
def watched() -> Iterator[tuple[RedisServer, KeyWatch]]:
    server = RedisServer().start()
    watch = KeyWatch(server)
    yield server, watch
    watch.close()
    server.stop()


def test_every_script_declares_every_key_it_touches(watched: tuple[RedisServer, KeyWatch]) -> None:
    """Scripts used to reach the app's indexes, tombstones and other sessions by keys
    they built themselves, which Redis forbids and Redis Cluster cannot route."""
    server, watch = watched
    watch.undeclared_since()
    exercise(RedisStore(server.url, prefix=f"k{uuid.uuid4().hex[:6]}"), FakeClock(2e9))
    spread = RedisStore(server.url, prefix=f"k{uuid.uuid4().hex[:6]}", buckets=4)
    exercise(spread, FakeClock(2e9))  # EVICT runs only with several buckets
    assert watch.undeclared_since() == []
    from statekit.stores.redis import SCRIPTS

    assert {script.sha.encode() for script in SCRIPTS.values()} <= watch.scripts


class TestRedisStoreDeclaringEveryKey(SharedStoreContract):
    """The store contract, watched: no script touches a key it did not declare."""

    @pytest.fixture(autouse=True)
    def _server(self, watched: tuple[RedisServer, KeyWatch]) -> Iterator[None]:
        self.server, watch = watched
        watch.undeclared_since()
        yield
        assert watch.undeclared_since() == []

    def make_store(self) -> Store:
        return RedisStore(self.server.url, prefix=f"w{uuid.uuid4().hex[:6]}")


class TestRedisStoreInBuckets(SharedStoreContract):
    """The store contract with an app's sessions in 4 buckets on one server (as on a
    cluster, each bucket with its own indexes and channel), watched: capacity, reaping
    and notices across buckets answer as with one, and no script touches a key it did
    not declare."""

    @pytest.fixture(autouse=True)
    def _server(self, watched: tuple[RedisServer, KeyWatch]) -> Iterator[None]:
        self.server, watch = watched
        watch.undeclared_since()
        yield
        assert watch.undeclared_since() == []

    def make_store(self) -> Store:
        return RedisStore(self.server.url, prefix=f"b{uuid.uuid4().hex[:6]}", buckets=4)


# -- deployments: URLs, Sentinel, the replica wait -------------------------------------


def test_urls_and_settings_of_no_known_form_are_refused_saying_what_to_use() -> None:
    """A URL RedisStore cannot read fails at once, naming the forms it knows (not at
    the first request, as an unreachable server would)."""
    for url in ("http://127.0.0.1:6379", "redis+cluster://nohost", "redis+sentinel://h:1"):
        with pytest.raises(ValueError, match="redis"):
            RedisStore(url)
    with pytest.raises(ValueError, match="buckets"):
        RedisStore(buckets=0)
    with pytest.raises(ValueError, match="wait_replicas"):
        RedisStore(wait_replicas=-1)
    with pytest.raises(ValueError, match="async_client"):
        RedisStore(async_client=aioredis.cluster.RedisCluster(host="127.0.0.1", port=1))
    for timeout in (-1, 0, "5", True, float("nan")):
        with pytest.raises(ValueError, match="socket_timeout"):
            RedisStore(socket_timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="asyncio"):  # a blocking client where async goes
        RedisStore(async_client=redis.Redis())  # type: ignore[arg-type]


def test_a_client_that_decodes_responses_is_refused() -> None:
    """statekit stores bytes: a client that decodes replies into text would read every
    stored value back as damaged, and the state's default would replace it at the next
    commit. Fails if such a client (blocking or asyncio) is accepted."""
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStore(client=redis.Redis(decode_responses=True))
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStore(async_client=aioredis.Redis(decode_responses=True))
    store = RedisStore()
    with pytest.raises(ValueError, match="decode_responses"):
        store.async_client = aioredis.Redis(decode_responses=True)
    assert store.async_client is None
    store.close()


def test_close_gives_back_the_connections_of_the_callers_pool(redis_server: RedisServer) -> None:
    """A store on the app's own client keeps connections of its pool between calls:
    closed, it gives them back, and the app's client (a bounded pool here) goes on.
    Fails if they stay checked out (the third store's open then waits and fails)."""
    pool = redis.BlockingConnectionPool.from_url(redis_server.url, max_connections=2, timeout=2)
    client = redis.Redis(connection_pool=pool)
    try:
        for _ in range(3):
            store = RedisStore(client=client, prefix=f"cl{uuid.uuid4().hex[:6]}")
            engine = StateEngine(store, app="shop")
            count = engine.session_state("count", 0)
            with engine.event(engine.open_session()) as ev:
                ev[count] += 1
            engine.shutdown()
            store.close()
            assert client.ping()  # the app's own client still has its connections
    finally:
        pool.disconnect()


def test_a_write_no_replica_confirms_stands_but_says_it_may_be_lost(
    redis_server: RedisServer,
) -> None:
    """With ``wait_replicas=1`` on a server without replicas, a write is applied on
    the master but raises StoreUnavailable with ``outcome_unknown``: acknowledging it
    would promise what a failover could take back."""
    from statekit import StoreUnavailable

    prefix = f"wait{uuid.uuid4().hex[:6]}"
    waiting = StateEngine(
        RedisStore(redis_server.url, prefix=prefix, wait_replicas=1, wait_timeout=0.05), app="a"
    )
    plain = StateEngine(RedisStore(redis_server.url, prefix=prefix), app="a")
    try:
        with pytest.raises(StoreUnavailable, match="0 of 1 replicas") as raised:
            waiting.global_state("visitors", 0).set(5)
        assert raised.value.outcome_unknown
        assert plain.global_state("visitors", 0).get() == 5
    finally:
        waiting.shutdown()
        plain.shutdown()


def sentinel_url(setup: RedisSentinel) -> str:
    hosts = ",".join(f"{host}:{port}" for host, port in setup.sentinels)
    return f"redis+sentinel://{hosts}/{setup.service_name}"


class TestRedisStoreOnSentinel(SharedStoreContract):
    """The store contract on the master a Sentinel set-up names
    (``redis+sentinel://``)."""

    @pytest.fixture(autouse=True)
    def _setup(self, redis_sentinel: RedisSentinel) -> None:
        self.url = sentinel_url(redis_sentinel)

    def make_store(self) -> Store:
        return RedisStore(self.url, prefix=f"sn{uuid.uuid4().hex[:6]}")


def test_a_sentinel_stores_close_closes_its_connections_to_the_sentinels(
    redis_sentinel: RedisSentinel,
) -> None:
    """A store made from a ``redis+sentinel://`` URL closes all it opened: the master's
    connections and the sentinels' (left open, a sentinel's socket was closed only by
    the garbage collector, with a ResourceWarning, in whatever test ran then)."""
    store = RedisStore(sentinel_url(redis_sentinel), prefix=f"sc{uuid.uuid4().hex[:6]}")
    engine = StateEngine(store, app="shop")
    engine.open_session()  # asks the sentinels for the master, then the master
    manager = store.client.connection_pool.sentinel_manager
    assert any(s.connection_pool._created_connections for s in manager.sentinels), (
        "the store never asked a sentinel: this test would show nothing"
    )
    engine.shutdown()
    store.close()
    for sentinel in manager.sentinels:
        pool = sentinel.connection_pool
        assert all(c._sock is None for c in pool._available_connections), "left open"
        assert not pool._in_use_connections


def test_a_sentinel_failover_raises_store_unavailable_then_the_engine_carries_on(
    redis_sentinel: RedisSentinel,
) -> None:
    """SIGKILL the master: events raise StoreUnavailable; once the sentinels promote
    the replica, the same engine finds it and its events succeed. Fails if the store
    kept talking to the dead master, or another error escaped."""
    import time

    from statekit import StoreUnavailable

    store = RedisStore(sentinel_url(redis_sentinel), prefix=f"sf{uuid.uuid4().hex[:6]}")
    engine = StateEngine(store, app="shop", lease_wait=1)
    n = engine.session_state("n", 0)
    try:
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[n] += 1
        redis_sentinel.kill_master()
        try:
            with pytest.raises(StoreUnavailable), engine.event(sid) as ev:
                ev[n] += 1
            redis_sentinel.wait_for_failover()
            deadline = time.monotonic() + 30
            while True:
                try:
                    with engine.event(sid) as ev:
                        ev[n] += 1
                    break
                except StoreUnavailable:
                    assert time.monotonic() < deadline, "the new master was never used"
                    time.sleep(0.1)
        finally:
            redis_sentinel.restore()
        assert n.get(sid) >= 2
    finally:
        engine.shutdown()
        store.close()


# -- the packing of commands ---------------------------------------------------------


_ARGUMENTS = [
    ("EVALSHA", "ab" * 20, 6, "p:{b}:s:id", b"\x00\xff bytes", "é 雪 text", -3, 2**70, 1.5),
    ("SET", "k", memoryview(b"view"), 1796140638.508412, 0),
]


@pytest.mark.parametrize("command", _ARGUMENTS)
@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_a_command_is_packed_with_the_connections_encoding(
    command: tuple[Any, ...], encoding: str
) -> None:
    """The store packs its commands itself (in C by hiredis where that encodes as the
    connection does, else in Python): each argument as the connection's encoder
    makes it, whatever its type. Fails if a path drops or re-encodes an argument
    (latin-1 text packed as UTF-8, as redis-py's own hiredis packing does)."""
    from statekit.stores._redis_wire import pack

    if encoding == "latin-1":
        command = tuple(a.replace("雪", "") if isinstance(a, str) else a for a in command)
    conn: Any = redis.Connection(encoding=encoding)  # type: ignore[no-untyped-call]
    expected = [b"*%d\r\n" % len(command)]
    for arg in command:
        data = bytes(conn.encoder.encode(arg))
        expected.append(b"$%d\r\n%b\r\n" % (len(data), data))
    assert pack(conn, command) == b"".join(expected)


def test_an_argument_redis_py_refuses_is_refused() -> None:
    """A type neither hiredis nor the encoder packs (a bool) is refused by redis-py's
    encoder, as ``execute_command`` refuses it, never sent as something else."""
    from statekit.stores._redis_wire import pack

    with pytest.raises(redis.DataError):
        pack(redis.Connection(), ("SET", "k", True))  # type: ignore[no-untyped-call]


def test_a_codec_that_answers_a_strided_view_stores_the_views_bytes(
    redis_server: RedisServer,
) -> None:
    """A codec of the app's may answer a ``memoryview``: the store writes the bytes
    the view shows. Fails if a strided view went out as its underlying buffer (the
    C packer reads a view's buffer whole), which stored another value silently."""

    class Strided:
        name = "strided"

        def encode(self, value: Any) -> Any:
            return memoryview(b"".join(bytes([c, 0x21]) for c in json.dumps(value).encode()))[::2]

        def decode(self, data: bytes) -> Any:
            return json.loads(bytes(data))

    store = RedisStore(redis_server.url, prefix=f"v{uuid.uuid4().hex[:6]}", codec=Strided())
    engine = StateEngine(store, app="shop")
    cart = engine.session_state("cart", ["none"])
    total = engine.global_state("total", 0.5)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[cart] = ["milk", "eggs"]
    total.increment(1.25)  # a float: read, add and compare-and-set
    reader = RedisStore(redis_server.url, prefix=store.prefix, codec=Strided())
    other = StateEngine(reader, app="shop")
    assert other.session_state("cart", ["none"]).get(sid) == ["milk", "eggs"]
    assert other.global_state("total", 0.5).get() == 1.75
    engine.shutdown()
    other.shutdown()
    store.close()
    reader.close()


def test_an_error_names_the_server_of_the_callers_own_client() -> None:
    """A store given a client of the caller's names that client's server in its errors
    (never a password). Fails if they name the default URL's server (127.0.0.1:6379),
    sending an operator to the wrong one."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = redis.Redis(host="127.0.0.1", port=port, db=3, password="secret")
    store = RedisStore(client=client, prefix="where")
    assert repr(store) == f"RedisStore('redis://127.0.0.1:{port}/3')"
    engine = StateEngine(store, app="shop")
    try:
        with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}/3") as raised:
            engine.open_session()
        assert "secret" not in str(raised.value)
    finally:
        engine.shutdown()
        store.close()
        client.close()
