"""The Redis protocol on connections the Redis store drives itself, bypassing the
per-call work of redis-py's ``execute_command``: commands packed in one piece, and
awaited calls that finish what they sent in the awaiting task (see ``_finish``)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._finish import absorb, check_unsent, finish, sent, unsent_mark
from ._redis_failures import after_lost, not_sent

__all__ = ["adirect", "anode", "pack"]

#: The asyncio pools whose connections the store takes without their readiness poll.
_PLAIN_POOLS = (aioredis.ConnectionPool, aioredis.sentinel.SentinelConnectionPool)


def _pack_in_python(conn: Any, command: tuple[Any, ...]) -> bytes:
    """``command`` as the Redis protocol sends it, in one piece: what the connection's
    ``pack_command`` makes of it, at a third of its cost for the bytes, strings and
    whole numbers the store sends (anything else is the connection encoder's)."""
    encoding = conn.encoder.encoding
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        kind = type(arg)
        if kind is bytes:
            data = arg
        elif kind is str:
            data = arg.encode(encoding)
        elif kind is int:
            data = b"%d" % arg
        else:
            data = conn.encoder.encode(arg)
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


_pack_in_c: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _pack_in_c
except ImportError:  # pragma: no cover - hiredis comes with the redis extra
    _pack_in_c = None

_UTF8 = frozenset({"utf-8", "utf8", "UTF-8", "UTF8"})


def pack(conn: Any, command: tuple[Any, ...]) -> bytes:
    """``command`` as the Redis protocol sends it, in one piece, as the connection's
    ``pack_command`` would make it: by hiredis (a third of the time of the same work
    in Python) when the connection encodes text as strict UTF-8, as hiredis does, and
    every argument is text, bytes or a number; else in Python, with the connection's
    encoder for anything but text, bytes and whole numbers."""
    encoder = conn.encoder
    utf8 = encoder.encoding in _UTF8 and encoder.encoding_errors == "strict"
    if utf8 and _pack_in_c is not None:
        try:
            return _pack_in_c(command)
        except TypeError:  # an argument of another type: the encoder's to refuse or read
            pass
    return _pack_in_python(conn, command)


#: The largest command sent without redis-py's send timeout (see :func:`_asend`): half
#: the high-water mark of an asyncio transport's write buffer.
_QUIET_SEND = 32 * 1024


async def _asend(conn: Any, packed: list[bytes]) -> None:
    """Send a packed command on an asyncio connection the store holds alone. With a
    socket timeout, redis-py sends inside ``asyncio.wait_for``, a task of its own
    before Python 3.12: two more turns of the event loop per call. A command smaller
    than the transport's high-water mark, written to a connected socket with nothing
    pending (the previous reply was read), never waits, so no timeout can fire: it is
    sent as redis-py sends without one. Larger ones keep the timeout."""
    timeout = conn.socket_timeout
    if not timeout or not conn.is_connected or sum(map(len, packed)) > _QUIET_SEND:
        await conn.send_packed_command(packed, check_health=False)
        return
    conn.socket_timeout = None
    try:
        await conn.send_packed_command(packed, check_health=False)
    finally:
        conn.socket_timeout = timeout


_READ_TIMED_OUT = "Timeout reading a reply (socket_timeout)"


async def _exchange(conn: Any, packed: list[bytes]) -> Any:
    """Send a packed command of at most ``_QUIET_SEND`` bytes on a connected asyncio
    connection, and read its reply, in the awaiting task. The send does not yield to
    the event loop; a cancellation during the read is absorbed (``_finish``), and the
    read goes on (redis-py's parsers keep what they read) until the reply, a failure,
    the connection's ``socket_timeout`` after the send or a second cancellation."""
    loop = asyncio.get_running_loop()
    timeout = conn.socket_timeout
    deadline = None if timeout is None else loop.time() + timeout
    try:
        await _asend(conn, packed)
    except asyncio.CancelledError as exc:  # a closing connection yields once
        absorb(exc)
    try:
        return await conn.read_response(disconnect_on_error=False)
    except asyncio.CancelledError as exc:
        absorb(exc)
    # Once more, for what is left of the timeout (a second cancellation is raised).
    wait = math.inf if deadline is None else deadline - loop.time()
    if wait <= 0:
        raise RedisTimeoutError(_READ_TIMED_OUT)
    reply = await conn.read_response(disconnect_on_error=False, timeout=wait)
    # With a timeout of its own, a read that times out answers None.
    if reply is None and deadline is not None and loop.time() >= deadline:
        raise RedisTimeoutError(_READ_TIMED_OUT)
    return reply


async def _exchanges(conn: Any, packed: list[bytes], script: Any, failed: Exception | None) -> Any:
    """Send a packed command and read its reply under the connection's retry policy;
    ``failed``: how a first send, already made, failed. A script the server does not
    know is loaded on the same connection, and the command sent again."""

    async def exchange() -> Any:
        nonlocal failed
        if failed is not None:
            exc, failed = failed, None
            raise exc
        await _asend(conn, packed)
        return await conn.read_response()

    # A first send that failed without an error reply may have been applied.
    lost = failed is not None and not isinstance(failed, ResponseError)

    async def drop(error: Exception) -> None:
        nonlocal lost
        # (an error reply retried, a demoted master's READONLY: refused, unsent)
        lost = lost or not isinstance(error, ResponseError)
        await conn.disconnect()

    try:
        try:
            return await conn.retry.call_with_retry(exchange, drop)
        except NoScriptError:  # not run: load it on the same connection, then send
            if script is None:
                raise
            await conn.send_command("SCRIPT", "LOAD", script.text, check_health=False)
            await conn.read_response()
            return await conn.retry.call_with_retry(exchange, drop)
    except ResponseError as exc:
        if lost:
            after_lost(exc)
        raise


def _put_back(pool: Any, conn: Any) -> bool:
    """Give ``conn`` back to a plain pool (see ``_PLAIN_POOLS``) as
    ``get_available_connection`` took it: to
    its free list, without the pool's release event and connection-state metrics
    (none were recorded when it was taken), when nothing else is due (no re-auth
    pending, no reconnect asked, the pool's lock free). False: the pool's own release
    must give it back. Redis-py's pool attributes, read where they are, else False."""
    try:
        if pool._lock.locked() or conn._re_auth_token is not None or conn.should_reconnect():
            return False
        in_use, free = pool._in_use_connections, pool._available_connections
    except AttributeError:  # another redis-py's pool: its release gives it back
        return False
    if conn not in in_use:
        return False
    in_use.remove(conn)
    free.append(conn)
    return True


async def _give_back(pool: Any, conn: Any, quick: bool) -> None:
    """Give ``conn`` back to its pool (``quick``: as it was taken, by
    ``get_available_connection``, when :func:`_put_back` may). The pool's lock may make
    the task wait: if it is cancelled there, the connection is given back by a task of
    its own, and the cancellation absorbed once the call was sent (else raised)."""
    if quick and _put_back(pool, conn):
        return
    try:
        await pool.release(conn)
    except asyncio.CancelledError as exc:
        again = asyncio.ensure_future(_give_back_again(pool, conn))
        _GIVING_BACK.add(again)
        again.add_done_callback(_GIVING_BACK.discard)
        absorb(exc)


#: Connections being given back after a cancellation (a task needs a reference).
_GIVING_BACK: set[asyncio.Future[None]] = set()


async def _give_back_again(pool: Any, conn: Any) -> None:
    with contextlib.suppress(KeyError):  # the first release got past its removal
        await pool.release(conn)


async def _before_send(
    pool: Any, conn: Any, quick: bool, mark: int | None, step: Awaitable[object] | None = None
) -> None:
    """Await ``step`` (connecting ``conn``), then raise a cancellation that redis-py's
    ``asyncio.wait_for`` dropped since ``mark`` (``_finish.check_unsent``). On any
    failure ``conn`` goes back to its pool, and the failure is marked as one that came
    before the send."""
    try:
        if step is not None:
            await finish(step)
        check_unsent(mark)
    except BaseException as exc:
        not_sent(exc)
        await _give_back(pool, conn, quick)
        raise


def forget_demoted(pool: Any, conns: list[Any] | None = None) -> None:
    """After a ``READONLY`` (a master demoted to a replica): the connections the store
    keeps for ``pool`` (``conns``) and the pool's idle ones lead there too. They are
    closed, so that the next calls connect again (to the new master, behind an address
    that follows it) rather than be refused by the demoted one, or read from it. (Not
    a blocking pool's idle ones: it closes them after letting go of its lock, when
    another thread may have taken one. Each of those refuses once, then goes.)"""
    while conns:
        try:
            conn = conns.pop()
        except IndexError:  # (another thread took the last one)
            break
        conn.disconnect()
        pool.release(conn)
    if not isinstance(pool, redis.BlockingConnectionPool):
        with contextlib.suppress(Exception):
            pool.disconnect(inuse_connections=False)  # (under its lock)


async def adirect(client: Any, command: tuple[Any, ...], script: Any) -> Any:
    """``RedisStore._direct`` on an asyncio client of one server (not a single-connection
    client): the command is sent on a connection of the client's pool, given back
    after the reply, without the rest of ``execute_command``'s per-call work
    (events, metrics, the generic reply callbacks) and, from a plain or Sentinel
    pool, without the readiness poll of its ``get_connection`` (a connection that
    went stale is found by the send, and sent again under the pool's retry
    policy, ``conn.retry``). Any failure but an error reply (read whole)
    disconnects the connection. The store keeps no connection between calls.

    A command of at most ``_QUIET_SEND`` bytes on a connected connection is sent
    and its reply read in the awaiting task (:func:`_exchange`); anything more (a
    failure, its retries, a script to load) runs in a task of its own once the
    command may have left (``finish``)."""
    pool = client.connection_pool
    # Quickly, unless the pool's lock is held: redis-py holds it while it talks on the
    # free connections itself (a re-auth of each, a maintenance notification's move).
    quick = type(pool) in _PLAIN_POOLS and not pool._lock.locked()
    if quick:
        try:
            conn = pool.get_available_connection()  # the pool's bound holds
        except RedisError as exc:
            raise not_sent(exc) from None
        if not conn.is_connected:
            await _before_send(pool, conn, quick, unsent_mark(), conn.connect())
    else:  # a blocking pool (or a held lock) waits for a connection in its own way
        mark = unsent_mark()
        conn = await finish(pool.get_connection())
        await _before_send(pool, conn, quick, mark)
    try:
        packed = [pack(conn, command)]
        failed: Exception | None = None
        if conn.is_connected and len(packed[0]) <= _QUIET_SEND and sent():
            try:
                return await _exchange(conn, packed)
            except Exception as exc:  # handled as the retry policy's first failure
                failed = exc
        else:
            sent()
        return await finish(_exchanges(conn, packed, script, failed))
    except ReadOnlyError:  # a demoted master: the next call connects again (see _direct)
        # (This connection only: the asyncio pool closes its idle ones in tasks of their
        # own, after other tasks may have taken them. Each refuses once, then goes.)
        await conn.disconnect(nowait=True)
        raise
    except ResponseError:
        raise  # an error reply, read whole: the connection is fine
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    finally:
        await _give_back(pool, conn, quick)


async def anode(client: Any, command: tuple[Any, ...], script: Any, key: Any) -> Any:
    """:func:`adirect` on a cluster's asyncio client: the command is sent on a
    connection of the master serving ``key``'s slot, as the client knows it (taken
    from that node's free connections and given back after the reply), without the
    cluster client's per-call work (the slot of every key, its Python packing, a task
    for each read). A plain error reply is raised as it is; any other failure (a slot
    that moved, a master that failed, a script the server does not know, a command
    too large to send without the client's send timeout) is raised for the caller to
    send the command through the cluster client, which follows redirections, learns
    the slots again and loads scripts: sending it again is safe, every write being
    idempotent."""
    node = client.get_node_from_key(key)
    conn = node.acquire_connection()
    try:
        if conn.should_reconnect() or not conn.is_connected:
            mark = unsent_mark()
            try:
                if conn.should_reconnect():
                    await finish(conn.disconnect())
                await finish(conn.connect())
                check_unsent(mark)
            except BaseException as exc:
                not_sent(exc)
                raise
        packed = [pack(conn, command)]
    except BaseException:
        await conn.disconnect(nowait=True)
        node.release(conn)
        raise
    if len(packed[0]) > _QUIET_SEND:
        node.release(conn)
        raise not_sent(RedisError("a large command: sent through the cluster client"))
    sent()
    try:
        return await _exchange(conn, packed)
    except ReadOnlyError:  # a demoted master: the next call connects again (see _direct)
        await conn.disconnect(nowait=True)
        raise
    except ResponseError:
        raise  # an error reply, read whole: the connection is fine
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    finally:
        node.release(conn)
