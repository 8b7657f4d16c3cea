"""Lost replies on Redis: a write applied by the server whose answer never reaches the
client (a crash after the write, a reset by a proxy or a load balancer).

Every write statekit sends is idempotent: sent again, it returns its first outcome
and is applied once. When no answer can be had, the error says the outcome is unknown.
The servers and the proxy here are private, on loopback.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from statekit import (
    DeleteReason,
    InvalidDeclaration,
    SessionState,
    StateEngine,
    StoreUnavailable,
)
from statekit.stores.redis import RedisStore
from statekit.testing import FakeClock, RedisServer

from ._proxy import ReplyDropper

#: Operations per run: each is an increment and an event (a load and a commit).
OPERATIONS = 60


def twice_in_ten() -> Callable[[bytes], bool]:
    """Drops the replies of two script calls in a row out of every ten: enough for a
    client that does not retry to lose both its request and statekit's resend."""
    calls = itertools.count()
    return lambda request: b"EVALSHA" in request and next(calls) % 10 in (3, 4)


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[ReplyDropper]:
    dropper = ReplyDropper(("127.0.0.1", redis_server.port), twice_in_ten())
    yield dropper
    dropper.close()


CLIENTS: dict[str, Callable[[str], redis.Redis | None]] = {
    # statekit's own client, made from the URL
    "default": lambda url: None,
    # a client of the user's that retries after a lost connection
    "retrying": lambda url: redis.Redis.from_url(
        url, retry=Retry(ExponentialBackoff(cap=0.05, base=0.001), 5)
    ),
    # a client of the user's that never retries: only statekit's one resend is left
    "not retrying": lambda url: redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0)),
}


@pytest.mark.parametrize("client", list(CLIENTS))
def test_lost_replies_never_apply_a_write_twice_and_unknown_outcomes_are_said(
    redis_server: RedisServer, proxy: ReplyDropper, client: str
) -> None:
    prefix = f"lost{uuid.uuid4().hex[:6]}"
    store = RedisStore(proxy.url, client=CLIENTS[client](proxy.url), prefix=prefix)
    engine = StateEngine(store, app="shop", lease_wait=5)
    visitors = engine.global_state("visitors", 0)
    log: SessionState[list[int]] = engine.session_state("log", [])
    sid = engine.open_session()
    acked_adds = unknown_adds = 0
    acked: list[int] = []
    unknown: list[int] = []

    def check_unknown(exc: StoreUnavailable) -> None:
        assert exc.outcome_unknown, exc  # the request left and no answer came back
        assert "may or may not have been applied" in str(exc)

    for i in range(OPERATIONS):
        try:
            visitors.increment()
            acked_adds += 1
        except StoreUnavailable as exc:
            check_unknown(exc)
            unknown_adds += 1
        try:
            with engine.event(sid) as ev:
                ev[log].append(i)
            acked.append(i)
        except StoreUnavailable as exc:
            # A load that got no answer: the event never ran, nothing of it applied.
            if exc.outcome_unknown:
                unknown.append(i)

    # Read what the server holds through a connection of its own, not the proxy.
    direct = RedisStore(redis_server.url, prefix=prefix)
    reader = StateEngine(direct, app="shop")
    stored_log: SessionState[list[int]] = reader.session_state("log", [])
    # Every write the proxy dropped had been applied by the server: the totals are
    # what was acknowledged plus what was reported unknown. A write applied twice (a
    # resend that was not idempotent) would make them larger; a commit applied and
    # then reported as a conflict would make the event raise StoreConflict above.
    assert reader.global_state("visitors", 0).get() == acked_adds + unknown_adds
    assert sorted(stored_log.get(sid)) == sorted(acked + unknown)
    assert proxy.dropped >= OPERATIONS // 2  # the run really lost replies
    if client == "not retrying":
        assert unknown_adds + len(unknown) > 0  # and had to say so
    else:  # retries got an answer every time: the first outcome, once
        assert (unknown_adds, unknown) == (0, [])
        assert acked_adds == OPERATIONS
    for each in (engine, reader):
        each.shutdown()
    store.close()
    direct.close()


@pytest.mark.parametrize("buckets", [1, 4])
def test_every_write_sent_twice_is_applied_once(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, buckets: int
) -> None:
    """Each script the store runs is sent twice, as a client does whose first answer was
    lost: the second must return the first outcome. Without request ids, the second
    open would find its session id in use, the second close would answer 'already
    closed' (and hooks would not run), the second commit would conflict, increments
    and reaped callbacks would count twice. With several buckets (as on a cluster),
    the eviction at capacity is a script of its own (EVICT), sent twice too."""
    original = RedisStore.run

    def twice(self: RedisStore, script: Any, keys: list[str], args: list[Any], **kw: Any) -> Any:
        original(self, script, keys, args, **kw)
        return original(self, script, keys, args, **kw)

    monkeypatch.setattr(RedisStore, "run", twice)
    clock = FakeClock(2_000_000_000.0)
    store = RedisStore(redis_server.url, prefix=f"twice{uuid.uuid4().hex[:6]}", buckets=buckets)
    engine = StateEngine(store, app="shop", clock=clock, idle_ttl=60, capacity=2)
    deleted: list[tuple[str, DeleteReason]] = []
    note = engine.session_state("note", "", on_delete=lambda v, r: deleted.append((v, r)))
    visitors = engine.global_state("visitors", 0)
    names = engine.global_state("names", ["a"])
    closed: list[str] = []
    engine.on_close(lambda sid, reason: closed.append(reason.value))

    first = engine.open_session()
    with engine.event(first) as ev:
        ev[note] = "one"
    with engine.event(first) as ev:  # the version moved once per commit
        ev[note] = "two"
    assert note.get(first) == "two"
    assert visitors.increment() == 1
    assert visitors.increment(2) == 3
    assert names.update(lambda v: [*v, "b"]) == ["a", "b"]
    assert names.get() == ["a", "b"]
    assert engine.close_session(first) is True
    assert closed == ["closed"]
    second = engine.open_session()
    with engine.event(second) as ev:
        ev[note] = "kept"
    third = engine.open_session()  # capacity 2: the closed one is evicted, once
    assert deleted == [("two", DeleteReason.EVICTED)]
    clock.advance(61)
    assert engine.reap() == 2  # both open sessions expired: each counted once
    assert deleted[1:] == [("kept", DeleteReason.IDLE)]
    assert sorted(closed) == ["closed", "idle", "idle"]
    assert engine.session_count() == 0
    assert not engine.exists(third)
    engine.shutdown()
    store.close()


def test_a_lease_longer_than_the_store_remembers_replies_is_refused(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url, prefix="ttl", request_ttl=10)
    with pytest.raises(InvalidDeclaration, match=r"lease_ttl \(30s\).*request_ttl \(10s\)"):
        StateEngine(store, lease_ttl=30)
    StateEngine(store, lease_ttl=10).shutdown()
    with pytest.raises(ValueError, match="request_ttl"):
        RedisStore(redis_server.url, request_ttl=0)
    store.close()


@pytest.mark.parametrize("retries", [0, 5])
def test_lost_replies_of_async_events_on_the_asyncio_client(
    redis_server: RedisServer, proxy: ReplyDropper, retries: int
) -> None:
    """The same through ``aevent`` and a ``redis.asyncio`` client: its writes are as
    idempotent, and an outcome it cannot learn is said."""
    import asyncio

    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry as AsyncRetry

    prefix = f"alost{uuid.uuid4().hex[:6]}"

    async def main() -> tuple[list[int], list[int]]:
        client = aioredis.Redis.from_url(
            proxy.url, retry=AsyncRetry(ExponentialBackoff(cap=0.05, base=0.001), retries)
        )
        store = RedisStore(redis_server.url, async_client=client, prefix=prefix)
        engine = StateEngine(store, app="shop", lease_wait=5)
        log: SessionState[list[int]] = engine.session_state("log", [])
        sid = engine.open_session()
        acked: list[int] = []
        unknown: list[int] = []
        said: list[str] = []
        for i in range(OPERATIONS):
            try:
                async with engine.aevent(sid) as ev:
                    ev[log].append(i)
                acked.append(i)
            except StoreUnavailable as exc:
                if exc.outcome_unknown:
                    said.append(str(exc))
                    unknown.append(i)
        assert sorted(log.get(sid)) == sorted(acked + unknown)  # each applied once
        assert all("may or may not have been applied" in text for text in said)
        engine.shutdown()
        store.close()
        await client.aclose()
        return acked, unknown

    acked, unknown = asyncio.run(main())
    assert proxy.dropped >= OPERATIONS // 3
    if retries:
        assert (len(acked), unknown) == (OPERATIONS, [])
    else:
        assert unknown  # the resend was lost too: said, not hidden


@pytest.mark.parametrize("claimed_by", ["reap", "load"])
def test_what_a_request_removed_is_made_good_when_its_reply_was_lost(
    redis_server: RedisServer, claimed_by: str
) -> None:
    """A reap (or an event's load) removes an expired session (or value), and both its
    reply and the store's resend are lost: the removal happened, and nobody received
    the removed values to run their callbacks. The next reap reads the remembered
    reply back and runs them, once."""
    armed = {"drops": 0}

    def drop(request: bytes) -> bool:
        if armed["drops"] and b"EVALSHA" in request:
            armed["drops"] -= 1
            return True
        return False

    dropper = ReplyDropper(("127.0.0.1", redis_server.port), drop)
    client = redis.Redis.from_url(dropper.url, retry=Retry(NoBackoff(), 0))
    store = RedisStore(dropper.url, client=client, prefix=f"mg{uuid.uuid4().hex[:6]}")
    clock = FakeClock(2_000_000_000.0)
    engine = StateEngine(store, app="shop", clock=clock, idle_ttl=60)
    deleted: list[tuple[str, DeleteReason]] = []
    note = engine.session_state("note", "", ttl=10, on_delete=lambda v, r: deleted.append((v, r)))
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[note] = "x"
    clock.advance(61 if claimed_by == "reap" else 11)
    armed["drops"] = 2  # the request and the store's resend
    with pytest.raises(StoreUnavailable) as info:
        if claimed_by == "reap":
            engine.reap()
        else:
            with engine.event(sid):
                pass
    assert not info.value.outcome_unknown  # the caller's own action had not started
    assert deleted == []  # removed on the server, its callback not yet run
    # Two reaps at once (a host's timer and a request's look): the remembered reply
    # is handed to one of them only. The value's own ttl passed first; a reap also
    # ended the idle session.
    counts: list[int] = []
    start = threading.Barrier(2)

    def reap() -> None:
        start.wait()
        counts.append(engine.reap())

    threads = [threading.Thread(target=reap) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(counts) == (2 if claimed_by == "reap" else 1)
    assert deleted == [("x", DeleteReason.TTL)]
    assert engine.reap() == 0
    assert deleted == [("x", DeleteReason.TTL)]  # once
    engine.shutdown()
    store.close()
    dropper.close()


def test_replies_read_back_are_handed_over_even_when_a_later_one_cannot_be_read(
    redis_server: RedisServer,
) -> None:
    """Two reaps lost their replies; reading the second back fails: the first's
    removals are still handed over (not lost with the error), the second's later."""
    drops = {"left": 0, "skip": 0}

    def drop(request: bytes) -> bool:
        if b"EVALSHA" not in request or not drops["left"]:
            return False
        if drops["skip"]:
            drops["skip"] -= 1
            return False
        drops["left"] -= 1
        return True

    # The scripts in the server's cache first: a script the server does not know yet
    # is sent twice (NOSCRIPT, then again after loading it), which would shift the
    # count of replies dropped below (the test run first on a new server failed so).
    from statekit.stores.redis import SCRIPTS

    with redis.Redis.from_url(redis_server.url) as direct:
        for script in SCRIPTS.values():
            direct.script_load(script.text)
    dropper = ReplyDropper(("127.0.0.1", redis_server.port), drop)
    client = redis.Redis.from_url(dropper.url, retry=Retry(NoBackoff(), 0))
    store = RedisStore(dropper.url, client=client, prefix=f"rb{uuid.uuid4().hex[:6]}")
    clock = FakeClock(2_000_000_000.0)
    engine = StateEngine(store, app="shop", clock=clock, idle_ttl=60)
    deleted: list[Any] = []
    note = engine.session_state("note", "", on_delete=lambda v, r: deleted.append(v))
    for text in ("a", "b"):
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[note] = text
        clock.advance(1)
    clock.advance(60)
    # Each reap takes one session, and its reply (and the resend's) is lost; the
    # second reap first tries to read the first's reply back, and loses that too.
    for lost in (2, 4):
        drops["left"] = lost
        with pytest.raises(StoreUnavailable):
            engine.reap(limit=1)
    assert deleted == []
    drops.update(left=2, skip=1)  # the first read-back answers, the next is lost
    engine.reap()
    assert len(deleted) == 1  # handed over, not lost with the failure that followed
    engine.reap()
    assert sorted(deleted) == ["a", "b"]  # each once
    engine.shutdown()
    store.close()
    dropper.close()


def test_a_cancelled_async_event_runs_the_callbacks_of_what_its_load_removed(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async event cancelled (a client that disconnected) while its load is in
    flight waits for the load to finish, then takes the cancellation. The load may
    have removed a value past its ttl: its callback must still run, not be dropped
    with the answer."""
    store = RedisStore(redis_server.url, prefix=f"cx{uuid.uuid4().hex[:6]}")
    clock = FakeClock(2_000_000_000.0)
    engine = StateEngine(store, app="shop", clock=clock, idle_ttl=60)
    deleted: list[Any] = []
    note = engine.session_state("note", "", ttl=10, on_delete=lambda v, r: deleted.append(v))
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[note] = "x"
    clock.advance(11)
    loading, finish = threading.Event(), threading.Event()
    handle: Any = type(store.namespace("shop"))
    original = handle._run

    def slow(self: Any, name: str, keys: list[str], args: list[Any]) -> Any:
        reply = original(self, name, keys, args)
        if name == "LOAD":
            loading.set()
            finish.wait(10)
        return reply

    monkeypatch.setattr(handle, "_run", slow)

    async def main() -> None:
        async def enter() -> None:
            async with engine.aevent(sid):
                pass

        task = asyncio.create_task(enter())
        assert await asyncio.to_thread(loading.wait, 10)
        task.cancel()
        finish.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert deleted == ["x"]
    engine.shutdown()
    store.close()


def test_an_asyncio_client_set_later_is_the_one_used(redis_server: RedisServer) -> None:
    """A worker sets its own asyncio client (say after a fork, or per event loop):
    scripts registered with the first client used to stay bound to it."""
    import redis.asyncio as aioredis

    store = RedisStore(redis_server.url, prefix=f"ac{uuid.uuid4().hex[:6]}")
    engine = StateEngine(store, app="shop")
    note = engine.session_state("note", "")
    sid = engine.open_session()

    async def write_with_a_new_client(text: str) -> int:
        client = aioredis.Redis.from_url(redis_server.url)
        calls = 0
        pool: Any = client.connection_pool
        get_available_connection = pool.get_available_connection

        def counted() -> Any:
            nonlocal calls
            calls += 1
            return get_available_connection()

        pool.get_available_connection = counted
        store.async_client = client
        async with engine.aevent(sid) as ev:
            ev[note] = text
        await client.aclose()
        return calls

    for text in ("first loop", "second loop"):  # each loop ends with its client
        # The load and commit went out on this client's connections (the first loop's
        # client is closed by then: a call on it would reconnect outside this pool).
        assert asyncio.run(write_with_a_new_client(text)) >= 2  # its load and commit
        assert note.get(sid) == text
    engine.shutdown()
    store.close()


def _commit_sent(seen: threading.Event) -> Callable[[bytes], bool]:
    """A ReplyDropper's ``drop`` that drops nothing and sets ``seen`` once a commit
    script is sent."""
    from statekit.stores.redis import SCRIPTS

    sha = SCRIPTS["COMMIT"].sha.encode()

    def look(request: bytes) -> bool:
        if sha in request:
            seen.set()
        return False

    return look


def _slow_replies(
    redis_server: RedisServer, delay: float
) -> tuple[threading.Event, ReplyDropper, RedisStore, StateEngine, SessionState[int], str]:
    """A session of an engine whose store's replies come through a proxy that holds
    each one ``delay`` seconds (for the asyncio client the test sets), with the scripts
    already in the server's cache (no NOSCRIPT round trips), and an event that tells
    when a commit is sent."""
    from statekit.stores.redis import SCRIPTS

    with redis.Redis.from_url(redis_server.url) as direct:
        for script in SCRIPTS.values():
            direct.script_load(script.text)
    sent = threading.Event()
    proxy = ReplyDropper(("127.0.0.1", redis_server.port), _commit_sent(sent), delay=delay)
    store = RedisStore(redis_server.url, prefix=f"sr{uuid.uuid4().hex[:6]}")
    engine = StateEngine(store, app="shop", lease_ttl=30, lease_wait=5)
    x = engine.session_state("x", 0)
    return sent, proxy, store, engine, x, engine.open_session()


def test_an_async_event_cancelled_while_its_commit_is_read_waits_for_it(
    redis_server: RedisServer,
) -> None:
    """A client that goes away while its event's commit is on its way over the asyncio
    client (the reply in flight): the task goes on waiting for the reply, holding the
    session, and takes the cancellation once the commit is known; the next event finds
    the session free. Fails if the cancellation cuts the call short (the task ends
    while its commit may still land after the next event took the session), or is
    swallowed (the task ends normally)."""
    import redis.asyncio as aioredis

    sent, proxy, store, engine, x, sid = _slow_replies(redis_server, 0.6)

    async def main() -> None:
        client = store.async_client = aioredis.Redis.from_url(proxy.url)

        async def event() -> None:
            async with engine.aevent(sid) as ev:
                ev[x] = 1

        task = asyncio.create_task(event())
        assert await asyncio.to_thread(sent.wait, 10)
        task.cancel()
        await asyncio.sleep(0.2)
        assert not task.done()  # still waiting for the commit's reply
        with pytest.raises(asyncio.CancelledError):
            await task
        store.async_client = None
        await client.aclose()

    asyncio.run(main())
    assert x.get(sid) == 1
    with engine.event(sid) as ev:  # not held: no wait for a lease to lapse
        ev[x] += 1
    assert x.get(sid) == 2
    engine.shutdown()
    store.close()
    proxy.close()


def test_a_timeout_around_an_awaited_event_is_still_a_timeout(redis_server: RedisServer) -> None:
    """A timeout around an event that expires while its commit is on its way: the
    commit finishes (the task waits for it), and the timeout then raises TimeoutError,
    as it would around any call; the session is not left held. Fails if the
    cancellation comes out as another exception (a timeout's own cancellation must
    reach it as it was), or the commit is abandoned half way."""
    import redis.asyncio as aioredis

    sent, proxy, store, engine, x, sid = _slow_replies(redis_server, 0.5)

    async def main() -> None:
        client = store.async_client = aioredis.Redis.from_url(proxy.url)
        await client.ping()  # a connection in the pool: the event's calls time alone

        async def event() -> None:
            async with engine.aevent(sid) as ev:
                ev[x] = 1

        async def bounded() -> None:  # the load takes 0.5 s, the commit too
            timeout = getattr(asyncio, "timeout", None)  # Python 3.11+
            if timeout is None:
                await asyncio.wait_for(event(), 0.75)
                return
            async with timeout(0.75):  # converts only the task's own CancelledError
                await event()

        with pytest.raises(asyncio.TimeoutError):
            await bounded()
        assert sent.is_set()
        store.async_client = None
        await client.aclose()

    asyncio.run(main())
    assert x.get(sid) == 1  # the commit, sent before the timeout, landed once
    with engine.event(sid) as ev:  # and the session is free
        ev[x] += 1
    assert x.get(sid) == 2
    engine.shutdown()
    store.close()
    proxy.close()


_BUSY = b"-BUSY Redis is busy running a script. You can only call SCRIPT KILL\r\n"


@pytest.mark.parametrize(
    ("path", "retries"),
    [("blocking", 3), ("blocking", 0), ("awaited", 3), ("awaited", 0)],
)
def test_an_error_reply_to_a_resent_commit_says_its_outcome_is_unknown(
    redis_server: RedisServer, path: str, retries: int
) -> None:
    """A commit is applied but its reply lost with the connection; the resend (by the
    client's retry policy, or statekit's own when the client does not retry) is
    answered with an error reply (BUSY here: another client's long script; READONLY
    or CLUSTERDOWN in a failover). The error says nothing of the first send, which was
    applied: the event must raise StoreUnavailable with ``outcome_unknown``. Fails if
    it says nothing was written (the app would write again, or tell its user the cart
    did not change when it did)."""
    arm = {"drop": 0, "busy": 0}

    def drop(request: bytes) -> bool:
        if arm["drop"] and b"EVALSHA" in request:
            arm["drop"] -= 1
            return True
        return False

    def answer(request: bytes) -> bytes | None:
        if arm["busy"] and not arm["drop"] and b"EVALSHA" in request:
            arm["busy"] -= 1
            return _BUSY
        return None

    proxy = ReplyDropper(("127.0.0.1", redis_server.port), drop, answer=answer)
    prefix = f"busy{uuid.uuid4().hex[:6]}"
    try:
        if path == "blocking":
            client = redis.Redis.from_url(proxy.url, retry=Retry(NoBackoff(), retries))
            store = RedisStore(proxy.url, client=client, prefix=prefix)
        else:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry as AsyncRetry

            aclient = aioredis.Redis.from_url(proxy.url, retry=AsyncRetry(NoBackoff(), retries))
            store = RedisStore(proxy.url, async_client=aclient, prefix=prefix)
        engine = StateEngine(store, app="shop")
        count: SessionState[int] = engine.session_state("count", 0)
        sid = engine.open_session()

        def event(armed: bool) -> None:
            with engine.event(sid) as ev:
                ev[count] += 1
                if armed:
                    arm.update(drop=1, busy=1)

        async def awaited(armed: bool) -> None:
            async with engine.aevent(sid) as ev:
                ev[count] += 1
                if armed:
                    arm.update(drop=1, busy=1)

        async def both() -> StoreUnavailable:
            await awaited(False)
            with pytest.raises(StoreUnavailable) as raised:
                await awaited(True)
            await aclient.aclose()
            return raised.value

        if path == "blocking":
            event(False)  # the server knows the scripts: the dropped commit is applied
            with pytest.raises(StoreUnavailable) as raised:
                event(True)
            error = raised.value
        else:
            error = asyncio.run(both())
        assert error.outcome_unknown, error
        assert proxy.dropped == 1
        assert arm == {"drop": 0, "busy": 0}  # the resend met the error reply
        reader = StateEngine(RedisStore(redis_server.url, prefix=prefix), app="shop")
        assert reader.session_state("count", 0).get(sid) == 2  # it was applied
        for each in (reader, engine):
            each.shutdown()
            each.store.close()  # type: ignore[attr-defined]
        if path == "blocking":
            client.close()
    finally:
        proxy.close()


@pytest.mark.parametrize("path", ["blocking", "awaited"])
def test_an_error_reply_to_the_first_send_says_nothing_was_written(
    redis_server: RedisServer, path: str
) -> None:
    """The commit's only send is refused with an error reply (BUSY): nothing was
    applied, and the event says so (``outcome_unknown`` false). Fails if a refusal
    were taken for a lost send (the app would be told to check state that never
    changed, and a claim made up for at the next reap)."""
    arm = {"busy": 0}

    def answer(request: bytes) -> bytes | None:
        if arm["busy"] and b"EVALSHA" in request:
            arm["busy"] -= 1
            return _BUSY
        return None

    proxy = ReplyDropper(("127.0.0.1", redis_server.port), answer=answer)
    prefix = f"first{uuid.uuid4().hex[:6]}"
    try:
        import redis.asyncio as aioredis

        aclient = aioredis.Redis.from_url(proxy.url) if path == "awaited" else None
        store = RedisStore(proxy.url, async_client=aclient, prefix=prefix)
        engine = StateEngine(store, app="shop")
        count: SessionState[int] = engine.session_state("count", 0)
        sid = engine.open_session()

        async def awaited(armed: bool) -> None:
            async with engine.aevent(sid) as ev:
                ev[count] += 1
                if armed:
                    arm["busy"] = 1

        async def both() -> StoreUnavailable:
            await awaited(False)
            with pytest.raises(StoreUnavailable) as raised:
                await awaited(True)
            assert aclient is not None
            await aclient.aclose()
            return raised.value

        if path == "blocking":
            with engine.event(sid) as ev:
                ev[count] += 1
            with pytest.raises(StoreUnavailable) as raised, engine.event(sid) as ev:
                ev[count] += 1
                arm["busy"] = 1
            error = raised.value
        else:
            error = asyncio.run(both())
        assert not error.outcome_unknown, error
        assert arm == {"busy": 0}
        assert count.get(sid) == 1  # refused: only the first event's write
        engine.shutdown()
        store.close()
    finally:
        proxy.close()
