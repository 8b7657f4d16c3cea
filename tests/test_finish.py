"""Awaited store calls that finish what they sent, whatever cancels their task: the
rules of ``stores._finish`` on their own, and the Redis store's calls that follow
them in the awaiting task, without a task of their own."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser

from statekit import SessionBusy, StateEngine
from statekit.stores._finish import absorb, answer_of, finish, finishing, sent
from statekit.stores.redis import RedisStore
from statekit.testing import RedisServer

# -- the rules ------------------------------------------------------------------------


async def _sent_call(reply: asyncio.Future[str], reads: list[str]) -> str:
    """A call that sends, then waits for its reply, absorbing a cancellation once (as
    the Redis store's read does) and reading again."""
    sent()
    try:
        reads.append("read")
        return await asyncio.shield(reply)
    except asyncio.CancelledError as exc:
        absorb(exc)
    reads.append("read again")
    return await asyncio.shield(reply)


def test_a_cancellation_absorbed_after_the_send_comes_after_the_answer() -> None:
    """The task cancelled while a sent call waits for its reply goes on reading it,
    then raises a plain CancelledError (with the canceller's message) that carries the
    answer. Fails if the cancellation cuts the read short, is lost, or comes without
    the answer."""

    async def main() -> None:
        reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        reads: list[str] = []
        task = asyncio.create_task(finishing(_sent_call(reply, reads)))
        await asyncio.sleep(0)
        task.cancel("client gone")
        for _ in range(3):
            await asyncio.sleep(0)
        assert not task.done()
        assert reads == ["read", "read again"]
        reply.set_result("committed")
        with pytest.raises(asyncio.CancelledError) as raised:
            await task
        assert type(raised.value) is asyncio.CancelledError
        assert raised.value.args == ("client gone",)
        assert answer_of(raised.value) == (True, "committed")
        assert answer_of(raised.value) == (False, None)  # handed over once

    asyncio.run(main())


def test_a_second_cancellation_interrupts_the_call() -> None:
    """A task cancelled again while it finishes (a server stopping after its grace
    period) stops waiting. Fails if the second cancellation is absorbed too."""

    async def main() -> None:
        reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        reads: list[str] = []
        task = asyncio.create_task(finishing(_sent_call(reply, reads)))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as raised:
            await task
        assert answer_of(raised.value) == (False, None)
        assert reads == ["read", "read again"]

    asyncio.run(main())


def test_nothing_is_absorbed_before_the_send_or_outside_an_operation() -> None:
    """A cancellation before the operation sent anything, or in a call made outside
    any operation, is raised at once. Fails if either waits for a reply."""

    async def unsent(reply: asyncio.Future[str]) -> str:
        try:
            return await asyncio.shield(reply)
        except asyncio.CancelledError as exc:
            absorb(exc)
            raise AssertionError("absorbed") from None

    async def main() -> None:
        for outside in (False, True):
            reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            call = _sent_call(reply, []) if outside else finishing(unsent(reply))
            task = asyncio.create_task(call)
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


def test_a_timeout_around_a_finishing_call_is_a_timeout() -> None:
    """``asyncio.timeout`` takes the cancellation raised after the answer for its own
    and raises TimeoutError. Fails if that cancellation is of another class (the
    timeout would let it through as a CancelledError)."""

    async def main() -> None:
        reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, reply.set_result, "done")
        with pytest.raises(TimeoutError):
            timeout = getattr(asyncio, "timeout", None)  # Python 3.11+
            if timeout is None:
                await asyncio.wait_for(finishing(_sent_call(reply, [])), 0.01)
                return
            async with timeout(0.01):
                await finishing(_sent_call(reply, []))

    asyncio.run(main())


def test_what_waits_after_the_send_runs_in_a_task_the_cancellation_does_not_reach() -> None:
    """``finish`` runs what waits after a send (a retry, a reconnection) in a task of
    its own, to its end, and the operation raises the cancellation after. Fails if
    the cancellation reaches that work."""

    async def main() -> None:
        steps: list[int] = []

        async def retry() -> str:
            for n in range(5):
                steps.append(n)
                await asyncio.sleep(0)
            return "sent again"

        async def operation() -> str:
            sent()
            return await finish(retry())

        task = asyncio.create_task(finishing(operation()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as raised:
            await task
        assert steps == [0, 1, 2, 3, 4]
        assert answer_of(raised.value) == (True, "sent again")

    asyncio.run(main())


# -- the Redis store ------------------------------------------------------------------


class Counted:
    """A Redis store, an engine on it (leases of 30 s, waits of 2 s), a session, and
    awaited events that add 1 to its count or read it."""

    def __init__(self, url: str) -> None:
        self.store = RedisStore(url, prefix=f"fn{uuid.uuid4().hex[:6]}")
        self.engine = StateEngine(self.store, app="shop", lease_ttl=30, lease_wait=2)
        self.count = self.engine.session_state("count", 0)
        self.sid = self.engine.open_session()

    async def event(self) -> None:
        async with self.engine.aevent(self.sid) as ev:
            ev[self.count] += 1

    async def read(self) -> int:
        async with self.engine.aevent(self.sid) as ev:
            return ev[self.count]


@pytest.fixture
def counted(redis_server: RedisServer) -> Iterator[Counted]:
    made = Counted(redis_server.url)
    yield made
    made.engine.shutdown()
    made.store.close()


def test_an_awaited_event_on_redis_starts_no_task_per_store_call(
    redis_server: RedisServer,
) -> None:
    """An awaited event's load and commit run in the event's own task: a task per call
    costs two more turns of the event loop, a large share of a call to a near server.
    Fails if either runs in a task of its own."""
    store = RedisStore(redis_server.url, prefix=f"nt{uuid.uuid4().hex[:6]}")
    engine = StateEngine(store, app="shop")
    count = engine.session_state("count", 0)
    made: list[str] = []

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        made.append(getattr(coro, "__qualname__", repr(coro)))
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def main() -> int:
        client = store.async_client = aioredis.Redis.from_url(redis_server.url)
        sid = await engine.aopen_session()
        async with engine.aevent(sid) as ev:
            ev[count] += 1
        asyncio.get_running_loop().set_task_factory(counting)
        async with engine.aevent(sid) as ev:
            ev[count] += 1
        asyncio.get_running_loop().set_task_factory(None)
        async with engine.aevent(sid) as ev:
            value = ev[count]
        store.async_client = None
        await client.aclose()
        return value

    assert asyncio.run(main()) == 2
    assert made == []
    engine.shutdown()
    store.close()


@pytest.mark.parametrize("parser", [_AsyncHiredisParser, _AsyncRESP2Parser])
def test_an_awaited_event_cancelled_at_any_turn_leaves_its_session_and_client_sound(
    redis_server: RedisServer, counted: Counted, parser: Any
) -> None:
    """An awaited event cancelled at each turn of the loop in turn (before, during
    and after its load and its commit) ends in CancelledError; its increment lands
    once or not at all; its lease is given back, so the next event takes the
    session at once; every connection is back in the pool, and the next call reads
    its own reply, with either of redis-py's reply parsers (each must take up a read
    cut short by the cancellation where it stopped). Fails if a cancellation is lost,
    an increment lands twice, a lease is left held, a connection leaks, or a reply is
    read by the wrong call."""
    store, event, read = counted.store, counted.event, counted.read

    async def main() -> list[str]:
        client = store.async_client = aioredis.Redis.from_url(
            redis_server.url, parser_class=parser
        )
        pool = client.connection_pool
        faults: list[str] = []
        value = 0
        for turns in range(30):
            task = asyncio.create_task(event())
            for _ in range(turns):
                await asyncio.sleep(0)
            cancelled = not task.done() and task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if not cancelled:
                    faults.append(f"turn {turns}: cancelled though not asked")
            else:
                if cancelled:
                    faults.append(f"turn {turns}: the cancellation was lost")
            now = await asyncio.wait_for(read(), 1.5)
            if now - value not in (0, 1):
                faults.append(f"turn {turns}: the count went from {value} to {now}")
            value = now
            if pool._in_use_connections:
                faults.append(f"turn {turns}: {len(pool._in_use_connections)} connections out")
            if await client.echo(f"turn {turns}") != f"turn {turns}".encode():
                faults.append(f"turn {turns}: a reply read by the wrong call")
        store.async_client = None
        await client.aclose()
        return faults

    assert asyncio.run(main()) == []


async def _finished_after_send(reply: asyncio.Future[str]) -> str:
    """An operation that sends, then waits for ``reply`` in ``finish``'s task."""

    async def call() -> str:
        return await reply

    sent()
    return await finish(call())


def test_a_call_that_ends_as_its_task_is_cancelled_still_hands_over_its_answer() -> None:
    """``finish``'s task may end just before the awaiting task is cancelled (before it
    resumes): the answer is still handed over with the cancellation. Fails if a task
    done is taken for one cancelled and the answer dropped (a commit's callbacks
    would be lost)."""

    async def main() -> list[tuple[bool, Any]]:
        answers = []
        for turns in range(3):
            reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(finishing(_finished_after_send(reply)))
            for _ in range(3):
                await asyncio.sleep(0)
            reply.set_result("committed")
            for _ in range(turns):
                await asyncio.sleep(0)
            assert task.cancel()
            with pytest.raises(asyncio.CancelledError) as raised:
                await task
            answers.append(answer_of(raised.value))
        return answers

    assert asyncio.run(main()) == [(True, "committed")] * 3


@pytest.mark.skipif(sys.version_info < (3, 11), reason="before 3.11 each call has a task")
def test_an_event_cancelled_while_its_connection_connects_is_cancelled(
    redis_server: RedisServer, counted: Counted
) -> None:
    """An awaited event cancelled while the client connects a connection for its load
    (the client's HELLO and CLIENT SETINFO go through ``asyncio.wait_for`` when it has
    a ``socket_timeout``, which before Python 3.12 drops a cancellation arriving as it
    completes) ends in CancelledError and commits nothing. Fails if the cancellation
    is lost there and the event runs on and commits."""
    store, engine, count, sid = counted.store, counted.engine, counted.count, counted.sid
    event = counted.event

    async def main() -> tuple[list[int], int, int, int]:
        client = store.async_client = aioredis.Redis.from_url(redis_server.url, socket_timeout=5)
        lost, done, cancelled = [], 0, 0
        for turns in range(30):
            await client.connection_pool.disconnect()
            task = asyncio.create_task(event())
            for _ in range(turns):
                await asyncio.sleep(0)
            if task.done():
                done += 1
                continue
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                cancelled += 1
            else:
                lost.append(turns)
        async with engine.aevent(sid) as ev:
            value = ev[count]
        store.async_client = None
        await client.aclose()
        return lost, done, cancelled, value

    lost, done, cancelled, value = asyncio.run(main())
    assert lost == []
    assert cancelled >= 10  # the connection's handshake takes several turns
    # Each event done landed; a cancelled one whose commit was sent may have landed.
    assert done <= value <= done + cancelled


def test_a_connection_given_back_as_a_second_cancellation_comes_is_not_lost(
    redis_server: RedisServer, counted: Counted
) -> None:
    """A cancelled event gives its connection back while another task holds the
    pool's lock, and is cancelled again: the connection still goes back to the pool.
    Fails if it stays counted as in use for good (a bounded pool would run out)."""
    store, engine, count, sid = counted.store, counted.engine, counted.count, counted.sid
    event = counted.event

    async def main() -> tuple[int, int, int]:
        client = store.async_client = aioredis.Redis.from_url(redis_server.url)
        pool = client.connection_pool
        await event()  # a connection in the pool
        await pool._lock.acquire()  # another task holds the pool's lock
        task = asyncio.create_task(event())
        await asyncio.sleep(0.1)  # the load answered; giving its connection back waits
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pool._lock.release()
        await asyncio.sleep(0.1)
        in_use = len(pool._in_use_connections)
        async with engine.aevent(sid) as ev:
            value = ev[count]
        after = len(pool._in_use_connections)
        store.async_client = None
        await client.aclose()
        return in_use, after, value

    in_use, after, value = asyncio.run(main())
    assert (in_use, after) == (0, 0)
    assert value in (1, 2)


def _cancel_at(task: asyncio.Task[Any], turns: int, then: int | None = None) -> None:
    """Cancel ``task`` after exactly ``turns`` turns of the loop, and again ``then``
    turns later."""
    loop = asyncio.get_running_loop()

    def hop(left: int, again: int | None) -> None:
        if task.done():
            return
        if left:
            loop.call_soon(hop, left - 1, again)
            return
        task.cancel()
        if again is not None:
            loop.call_soon(hop, again, None)

    loop.call_soon(hop, turns, then)


def test_a_call_done_as_a_second_cancellation_comes_still_hands_over_its_answer() -> None:
    """The second cancellation reaches the awaiting task after the call's own task
    ended: its answer is handed over with the cancellation. Fails if the answer is
    dropped (the sessions an open evicted would never get their callbacks)."""

    async def main() -> tuple[bool, Any]:
        reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(finishing(_finished_after_send(reply)))
        for _ in range(3):
            await asyncio.sleep(0)
        task.cancel()
        for _ in range(3):
            await asyncio.sleep(0)
        reply.set_result("evicted: s1, s2")
        await asyncio.sleep(0)  # the call's task ends; the awaiting one has not resumed
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as raised:
            await task
        return answer_of(raised.value)

    assert asyncio.run(main()) == (True, "evicted: s1, s2")


def test_opens_at_capacity_cancelled_twice_still_run_every_eviction_callback(
    redis_server: RedisServer,
) -> None:
    """Opens at capacity cancelled twice at each turn of the loop in turn: a second
    cancellation interrupts an eviction that may have been applied, and the next reap
    reads its reply back, so that every evicted session's close hooks run once. Fails
    if an interrupted eviction is forgotten (its sessions gone without their hooks)."""
    store = RedisStore(redis_server.url, prefix=f"ev{uuid.uuid4().hex[:6]}")
    engine = StateEngine(store, app="shop", capacity=3)
    closed: list[str] = []
    engine.on_close(lambda sid, reason: closed.append(sid))

    async def main() -> list[str]:
        client = store.async_client = aioredis.Redis.from_url(redis_server.url)
        opened: list[str] = []
        for turns in range(40):
            sids = {sid.decode() for sid in await _sessions(client, store.prefix)}
            task = asyncio.create_task(engine.aopen_session())
            _cancel_at(task, turns, 1)
            with contextlib.suppress(asyncio.CancelledError):
                opened.append(await task)
            opened.extend(sids - set(opened))
        await engine.areap()
        live = {sid.decode() for sid in await _sessions(client, store.prefix)}
        store.async_client = None
        await client.aclose()
        return [sid for sid in set(opened) - live if closed.count(sid) != 1]

    assert asyncio.run(main()) == []
    engine.shutdown()
    store.close()


async def _sessions(client: Any, prefix: str) -> list[bytes]:
    """The ids of the sessions stored under ``prefix``."""
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*:s:*")]
    return [key.rsplit(b":s:", 1)[1] for key in keys]


def test_an_event_in_a_worker_thread_cancelled_twice_leaves_no_lease_behind(
    redis_server: RedisServer,
) -> None:
    """Without an asyncio client the store's calls run in a worker thread, which a
    cancellation cannot stop: an event cancelled twice as it loads waits for the
    thread before giving the lease back, so another process gets the session at once.
    Fails if the lease is given back first and the late load takes it again (the
    session then stays held for the whole lease_ttl)."""
    prefix = f"wt{uuid.uuid4().hex[:6]}"
    store, other = (
        RedisStore(redis_server.url, prefix=prefix),
        RedisStore(redis_server.url, prefix=prefix),
    )
    first = StateEngine(store, app="shop", lease_ttl=30, lease_wait=1)
    second = StateEngine(other, app="shop", lease_ttl=30, lease_wait=1)
    count = first.session_state("count", 0)
    second.session_state("count", 0)
    sid = first.open_session()

    async def event() -> None:
        async with first.aevent(sid) as ev:
            ev[count] += 1

    async def main() -> None:
        for turns in range(4):
            task = asyncio.create_task(event())
            _cancel_at(task, turns, 0)
            with contextlib.suppress(asyncio.CancelledError):
                await task

    busy = []
    for _ in range(5):
        asyncio.run(main())
        try:
            with second.event(sid):
                pass
        except SessionBusy:
            busy.append(True)
    assert busy == []
    first.shutdown()
    second.shutdown()
    store.close()
    other.close()


def test_a_connection_given_back_before_the_send_as_a_second_cancellation_comes_is_not_lost(
    redis_server: RedisServer, counted: Counted
) -> None:
    """An event cancelled while its connection connects gives the connection back;
    cancelled again while the pool's lock is busy, the connection still goes back.
    Fails if it stays counted as in use for good."""
    store, event = counted.store, counted.event

    async def main() -> list[int]:
        client = store.async_client = aioredis.Redis.from_url(redis_server.url)
        pool = client.connection_pool
        leaked = []
        for turns in range(8):
            await pool.disconnect()  # the next call connects
            task = asyncio.create_task(event())
            _cancel_at(task, turns)
            await asyncio.sleep(0)
            await pool._lock.acquire()  # another task holds the pool's lock
            await asyncio.sleep(0.05)
            task.cancel()
            pool._lock.release()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.05)
            if pool._in_use_connections:
                leaked.append(turns)
                pool._in_use_connections.clear()
        store.async_client = None
        await client.aclose()
        return leaked

    assert asyncio.run(main()) == []


def test_a_call_in_a_thread_cancelled_twice_still_hands_over_its_answer() -> None:
    """Where the engine runs each awaited call in a task of its own (Python 3.10), a
    call in a worker thread cancelled twice is waited for, and its answer (a lease
    granted, values claimed) still reaches ``salvage``. Fails if the answer, which the
    operation raises attached to the cancellation, is dropped."""
    from statekit._steps import _to_the_end

    async def main() -> list[Any]:
        got: list[Any] = []

        def load() -> str:  # the blocking call, in a worker thread
            time.sleep(0.2)
            return "leased"

        async def operation() -> str:
            sent()
            return await finish(asyncio.to_thread(load), stoppable=False)

        step: Any = "load"
        task = asyncio.create_task(
            _to_the_end(finishing(operation()), step, lambda s, a: got.append((s, a)))
        )
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return got

    assert asyncio.run(main()) == [("load", "leased")]
