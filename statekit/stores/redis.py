"""The Redis store: many processes and hosts (Redis 7+ or Valkey, through redis-py).

Install with ``pip install 'statekit[redis]'``. Every operation is one round trip (a
reap, and an open that must evict, take two: keys found first, then the script): a Lua
script runs it atomically on the server, so a commit is all-or-nothing, each expired
session is claimed by exactly one process, and a session's lease is taken together
with its load. The scripts are constants, loaded once per server, and declare every
key they touch, all on one cluster slot: a session's keys share its bucket's hash tag
(``_redis_layout``), so that on a Redis Cluster sessions spread over the masters. Key
TTLs are set only as a garbage-collection backstop, well after the deadlines the
engine enforces; no ``CONFIG SET`` and no keyspace notifications are needed. Notices
to other processes go through pub/sub (best effort: after a lost connection,
subscribers get a ``resync`` notice).

Every write carries a request id, and the script remembers its reply under it for
``request_ttl`` seconds: a write sent again after a lost connection (by a retrying
client, or once by the store itself) returns the first outcome and is applied once.
When no answer can be had, :class:`~statekit.StoreUnavailable` says whether the
request may have been applied (``outcome_unknown``).

The parts: ``_redis_scripts`` (the Lua), ``_redis_layout`` (the keys and buckets),
``_redis_clients`` (the client for a URL), ``_redis_namespace`` (an app's operations),
``_redis_spread`` (operations over every bucket),
``_redis_replies`` (reading script replies), ``_redis_failures`` (what a failure
means), ``_redis_claims`` (removals whose reply was lost), ``_redis_notices``
(pub/sub), ``_redis_wire`` (the protocol on the connections it drives; awaited calls
that finish what they sent, with ``_finish``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

try:
    import redis
    import redis.asyncio as aioredis
    import redis.asyncio.cluster as aiocluster
    import redis.asyncio.sentinel
    from redis.exceptions import (
        NoScriptError,
        ReadOnlyError,
        RedisClusterException,
        RedisError,
        ResponseError,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("RedisStore needs the redis package: pip install 'statekit[redis]'") from exc

from statekit import _fork
from statekit._codec import Codec, JSONCodec
from statekit.exceptions import StoreUnavailable

from ._finish import finish, sent
from ._redis_calls import Read
from ._redis_clients import address_of, is_cluster, make_client
from ._redis_failures import (
    UNAVAILABLE,
    Attempts,
    after_lost,
    maybe_applied,
    read_failure,
    safe_url,
)
from ._redis_layout import MAX_BUCKETS
from ._redis_namespace import RedisNamespace
from ._redis_scripts import TEXTS
from ._redis_wire import adirect, anode, forget_demoted, pack

__all__ = ["RedisStore"]

logger = logging.getLogger("statekit")

_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
#: What a script call that gets no answer calls when its request may have been applied.
Lost = Callable[[], object] | None


def _decodes(client: Any) -> bool:
    """Whether a redis-py client (blocking or asyncio, one server's or a cluster's)
    decodes responses into text."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if kwargs is None:  # a cluster client: its nodes' settings
        kwargs = getattr(getattr(client, "nodes_manager", None), "connection_kwargs", None)
    if isinstance(kwargs, dict) and kwargs.get("decode_responses"):
        return True
    encoder = getattr(client, "get_encoder", None)
    try:
        return bool(encoder is not None and encoder().decode_responses)
    except Exception:
        return False


class Script:
    """One script: its constant text and digest, run on any client (blocking or
    asyncio) with ``EVALSHA``, and loaded into a server's script cache the first time
    that server does not know it. Immutable; shared by every store and thread."""

    __slots__ = ("name", "sha", "text")

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text.encode()
        self.sha = hashlib.sha1(self.text).hexdigest()

    def __repr__(self) -> str:
        return f"<Redis script {self.name} {self.sha[:8]}>"

    def __call__(self, client: Any, keys: list[Any], args: list[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a server that has not seen it yet (or was restarted)
            client.script_load(self.text)
            return client.evalsha(self.sha, len(keys), *keys, *args)

    async def on_asyncio(self, client: Any, keys: list[Any], args: list[Any]) -> Any:
        """The same, on a ``redis.asyncio`` client."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.text)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


#: The store's scripts, by name: one object each per process, whatever the stores,
#: apps and clients (see ``_redis_scripts``).
SCRIPTS = {name: Script(name, text) for name, text in TEXTS.items()}


class RedisStore:
    """Keeps state in Redis, shared by every process and host that uses the server: one
    server, a Redis Cluster, or the master Sentinel names.

    Args:
        url: the server, e.g. ``redis://127.0.0.1:6379/0`` (``rediss://`` for TLS); a
            cluster, ``redis+cluster://host:port,host:port`` (any of its nodes); the
            master of a Sentinel set-up, ``redis+sentinel://host:port,host:port/service``
            (the sentinels, and the service they watch).
        client: a ``redis.Redis`` (a Sentinel master's too) or a
            ``redis.cluster.RedisCluster`` to use instead of one made from ``url``; it
            must not decode responses.
        async_client: a ``redis.asyncio.Redis`` (``redis.asyncio.cluster.RedisCluster``
            with a cluster) that async events (``engine.aevent``) use
            for their loads and commits. An asyncio client belongs to one event loop:
            pass the one your server's loop uses, and close it when the server stops.
            Without it, async events run the blocking client in a worker thread, so the
            event loop never waits either way. It may be set later (the attribute
            ``async_client``), for example in each worker after a fork: a client made
            before a fork is dropped in the child, whose sockets it would share.
        prefix: the first part of every key.
        codec: how values become bytes; :class:`~statekit.JSONCodec` by default.
        socket_timeout: seconds before a silent server counts as unavailable.
        request_ttl: seconds the server remembers the reply of each write, so that a
            write sent again (after a lost connection) returns its first outcome and is
            applied once. Engines refuse a ``lease_ttl`` above it.
        buckets: how many buckets an app's sessions are spread over (1 to 256; see
            ``docs/stores.md``): by default 48 on a cluster and 1 elsewhere. Part of the
            key layout: every process of an app must use the same number.
        wait_replicas: acknowledge a write (an open, a commit, a close, a global's
            write) only once this many replicas of its master have it (``WAIT``): a
            failover then loses no acknowledged write. 0 (the default): replication is
            asynchronous, and a master that fails right after a write may take it with
            it. When fewer replicas confirm within ``wait_timeout``, the write stands on
            the master but StoreUnavailable (``outcome_unknown``) says it may be lost.
            Async calls then run in a worker thread.
        wait_timeout: seconds a write waits for its replicas.

    Raises:
        ValueError: a URL of no known form, a bad setting, or a client and an
            asyncio client of different kinds (one a cluster's, one not).

    The client made from ``url`` retries a request three times after a lost connection
    (within about a second); a ``client`` of your own keeps its own retry policy. Both
    are safe: every write is idempotent.

    Thread-safe. Raises :class:`~statekit.StoreUnavailable` when the server cannot be
    reached; it reconnects by itself once the server is back.
    """

    shared = True
    #: Commits may keep their lease for the next event (``StateEngine(lease_keep=)``).
    keeps_leases = True

    #: A session's writes and its user's commit together: in one script (``JOINT``) on
    #: a single server or Sentinel, in three steps around one atomic decision on a
    #: cluster, whose slots no script reaches together (``_redis_staged``).
    joint_commits = True

    @property
    def joint_round_trips(self) -> int:
        """One script on a single server or Sentinel; three steps on a cluster."""
        return 3 if self.cluster else 1

    def __init__(
        self,
        url: str | None = "redis://127.0.0.1:6379/0",
        *,
        client: redis.Redis | redis.cluster.RedisCluster | None = None,
        async_client: aioredis.Redis | aioredis.cluster.RedisCluster | None = None,
        prefix: str = "statekit",
        codec: Codec | None = None,
        socket_timeout: float = 5.0,
        request_ttl: float = 60.0,
        buckets: int | None = None,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> None:
        if client is None and url is None:
            raise ValueError("RedisStore needs a url or a client")
        if client is not None and not isinstance(client, redis.Redis) and not is_cluster(client):
            raise ValueError(
                f"RedisStore's client must be a redis.Redis or a redis.cluster.RedisCluster, "
                f"got {type(client).__name__}"
            )
        if client is not None and _decodes(client):
            raise ValueError(
                "RedisStore's client decodes responses (decode_responses=True): statekit "
                "stores bytes, which it would read back as text and lose; give it a client "
                "made without decode_responses"
            )
        if (
            isinstance(socket_timeout, bool)
            or not isinstance(socket_timeout, (int, float))
            or not 0 < socket_timeout <= 3600
        ):
            raise ValueError(
                f"socket_timeout must be a number of seconds above 0 and at most 3600, got "
                f"{socket_timeout!r}"
            )
        if isinstance(request_ttl, bool) or not isinstance(request_ttl, (int, float)):
            raise ValueError(f"request_ttl must be a number of seconds, got {request_ttl!r}")
        if not 1 <= request_ttl <= 86_400:
            raise ValueError(f"request_ttl must be between 1 and 86400 seconds, got {request_ttl}")
        self.request_ttl = float(request_ttl)
        self.codec: Codec = JSONCodec() if codec is None else codec
        self.prefix = prefix
        self.url = url
        shown = safe_url(url or "") if client is None else address_of(client)
        self._label = f"RedisStore({shown!r})"
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(
                f"Redis key prefix {prefix!r} is not valid: use 1 to 64 characters among "
                "letters, digits and _ . : -"
            )
        #: Whether the store made its client (from ``url``): it then closes all of it,
        #: a Sentinel set-up's connections to its sentinels included.
        self._own_client = client is None
        self.client: Any = (
            client
            if client is not None
            else make_client(url or "", socket_timeout=socket_timeout, shown=shown)
        )
        #: Whether the store talks to a Redis Cluster (notices are then sharded).
        self.cluster = is_cluster(self.client)
        self._async_client: Any = None
        self.async_client = async_client  # checked by the property
        if buckets is None:
            buckets = 48 if self.cluster else 1
        if isinstance(buckets, bool) or not isinstance(buckets, int):
            raise ValueError(f"buckets must be a whole number, got {buckets!r}")
        if not 1 <= buckets <= MAX_BUCKETS:
            raise ValueError(f"buckets must be between 1 and {MAX_BUCKETS}, got {buckets}")
        self.buckets = buckets
        if isinstance(wait_replicas, bool) or not isinstance(wait_replicas, int):
            raise ValueError(f"wait_replicas must be a whole number, got {wait_replicas!r}")
        if wait_replicas < 0:
            raise ValueError(f"wait_replicas must be 0 or more, got {wait_replicas}")
        if isinstance(wait_timeout, bool) or not isinstance(wait_timeout, (int, float)):
            raise ValueError(f"wait_timeout must be a number of seconds, got {wait_timeout!r}")
        if not 0 < wait_timeout <= 60:
            raise ValueError(f"wait_timeout must be above 0 and at most 60 s, got {wait_timeout}")
        self.wait_replicas = wait_replicas
        self.wait_timeout = float(wait_timeout)
        #: Connections the store keeps for its own sends, by connection pool (see
        #: _direct): the client's pool, or on a cluster each master's; None: the
        #: client's own path (a client of one connection, or with a client cache).
        plain: Any = self.client
        self._stacks: dict[Any, list[Any]] | None = (
            {}
            if self.cluster
            or (plain.connection is None and getattr(plain.connection_pool, "cache", None) is None)
            else None
        )
        _fork.after_fork_in_child(self)
        self.socket_timeout = socket_timeout
        self._handles: weakref.WeakSet[RedisNamespace] = weakref.WeakSet()

    def __repr__(self) -> str:
        return self._label

    def namespace(self, app: str) -> RedisNamespace:
        """A handle on application ``app`` on this server."""
        handle = RedisNamespace(self, app)
        self._handles.add(handle)
        return handle

    def run(
        self, script: str, keys: list[Any], args: list[Any], *, applies: bool, lost: Lost = None
    ) -> Any:
        """Run the script named ``script`` on the blocking client, mapping failures to
        StoreUnavailable.

        Every script that writes is idempotent (it carries a request key): after a lost
        connection it is sent once more, and the answer, if one comes, is the first
        outcome. ``applies``: the script applies the caller's write, so that an
        outcome that stays unknown must be said (``outcome_unknown``). ``lost()`` is
        called when no answer came to a request that may have been applied. See
        ``Attempts`` in ``_redis_failures``.
        """
        if not (applies and self.wait_replicas):
            for attempt in Attempts(self._label, applies=applies, lost=lost):
                with attempt:
                    if self._stacks is not None:
                        return self._evalsha(SCRIPTS[script], keys, args)
                    return SCRIPTS[script](self.client, keys, args)
            raise AssertionError("unreachable")  # pragma: no cover
        for attempt in Attempts(self._label, applies=applies, lost=lost):
            with attempt:
                reply, acked = self._waited(SCRIPTS[script], keys, args)
                break
        if acked < self.wait_replicas:
            if lost is not None:
                lost()
            raise StoreUnavailable(
                self._label,
                f"{script} was applied on the master, but {acked} of {self.wait_replicas} "
                f"replicas confirmed it within {self.wait_timeout:g} s: a failover now could "
                "lose it",
                outcome_unknown=True,
            )
        return reply

    def _direct(self, command: tuple[Any, ...], script: Script | None, key: Any) -> Any:
        """Send one command on a connection the store keeps, and read its reply: what
        ``client.execute_command`` does, without its per-call costs (the pool's lock
        and readiness poll, events and metrics), which are most of a call's time on a
        near server. The connection comes from the pool of the server holding ``key``
        (see :meth:`_pool`), with its retry policy (``conn.retry``), and goes back to
        the store's own stack after an answer (an error reply included: it was read
        whole); after any other failure it is disconnected and given back to its
        pool, so that the next call takes a connection from the pool (connecting it
        there: a failure to connect is then known to come before anything was sent).
        ``script``: the command is its ``EVALSHA``, and it is loaded on the same
        connection if the server does not know it."""
        stacks = self._stacks
        assert stacks is not None
        pool = self._pool(key)
        conns = stacks.get(pool)
        if conns is None:
            conns = stacks.setdefault(pool, [])
        try:
            conn = conns.pop()
        except IndexError:
            conn = pool.get_connection()
        try:
            packed = [pack(conn, command)]

            def exchange() -> Any:
                conn.send_packed_command(packed)
                return conn.read_response()

            lost = False  # a send that may have been applied, its reply lost

            def drop(error: Exception) -> None:
                nonlocal lost
                # (an error reply retried, a demoted master's READONLY: refused, unsent)
                lost = lost or not isinstance(error, ResponseError)
                conn.disconnect()
                if isinstance(error, ReadOnlyError):
                    forget_demoted(pool, conns)

            try:
                reply = conn.retry.call_with_retry(exchange, drop)
            except NoScriptError:
                if script is None:
                    raise
                conn.send_command("SCRIPT", "LOAD", script.text)
                conn.read_response()
                reply = conn.retry.call_with_retry(exchange, drop)
        except RedisError as exc:
            if isinstance(exc, ResponseError) and lost:
                after_lost(exc)
            if not isinstance(exc, ResponseError) or isinstance(exc, ReadOnlyError):
                if isinstance(exc, ReadOnlyError):  # whatever the client's retry policy
                    forget_demoted(pool, conns)
                conn.disconnect()
                pool.release(conn)
            else:
                conns.append(conn)
            raise
        except BaseException:
            conn.disconnect()
            pool.release(conn)
            raise
        conns.append(conn)
        return reply

    def _pool(self, key: Any) -> Any:
        """The connection pool of the server holding ``key``: the client's, or on a
        cluster the one of the master serving its slot, as the client knows it."""
        if not self.cluster:
            return self.client.connection_pool
        client = self.client
        return client.get_redis_connection(client.get_node_from_key(key)).connection_pool

    def _evalsha(self, script: Script, keys: list[Any], args: list[Any]) -> Any:
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        if not self.cluster:
            return self._direct(command, script, None)
        try:
            return self._direct(command, script, keys[0])
        except (RedisError, RedisClusterException, OSError) as exc:
            if type(exc) is ResponseError:
                raise
            applied = maybe_applied(exc)
        # A slot that moved, a master that failed or cannot be reached: the cluster
        # client's own path follows redirections and learns the slots again (sending
        # again is safe: every write is idempotent).
        try:
            return script(self.client, keys, args)
        except ResponseError as exc:
            if applied:
                after_lost(exc)
            raise

    def _plain(self, command: tuple[Any, ...]) -> Any:
        if not self.cluster:
            return self._direct(command, None, None)
        try:
            return self._direct(command, None, command[1])
        except (RedisError, RedisClusterException, OSError) as exc:
            if type(exc) is ResponseError:
                raise
        return self.client.execute_command(*command)  # as in _evalsha

    def _waited(self, script: Script, keys: list[Any], args: list[Any]) -> tuple[Any, int]:
        """The script's reply, and how many replicas have its write: the script and
        ``WAIT`` on one connection (``WAIT`` counts the replicas that have that
        connection's writes), in one round trip. On a cluster, the connection is to
        the master of the keys' slot; after a failure there, the client learns the
        cluster's slots again."""
        client = self.client
        if self.cluster:
            client = client.get_redis_connection(client.get_node_from_key(keys[0]))
        try:
            for _ in range(2):
                pipe = client.pipeline(transaction=False)
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.execute_command("WAIT", self.wait_replicas, int(self.wait_timeout * 1000))
                reply, acked = pipe.execute(raise_on_error=False)
                if not isinstance(reply, NoScriptError):
                    break
                client.script_load(script.text)
            # A demoted master (its WAIT refused; the script too, or it found no lease
            # there): nothing written, and the next call connects again.
            if isinstance(reply, ReadOnlyError) or "replica" in str(acked):
                pool = client.connection_pool
                forget_demoted(pool, (self._stacks or {}).get(pool))
            if isinstance(reply, Exception):
                raise reply
            if isinstance(acked, Exception):
                raise acked
        except RedisError:
            if self.cluster:
                with contextlib.suppress(RedisError, OSError):
                    self.client.nodes_manager.initialize()
            raise
        return reply, int(acked)

    async def arun(
        self, client: Any, script: str, keys: list[Any], args: list[Any], applies: bool, lost: Lost
    ) -> Any:
        """:meth:`run` on ``client``, an asyncio client. Inside a store operation (see
        ``_finish``), a call that was sent finishes even if the task is cancelled
        meanwhile."""
        code = SCRIPTS[script]
        direct = not self.cluster and not getattr(client, "single_connection_client", False)
        for attempt in Attempts(self._label, applies=applies, lost=lost):
            with attempt:
                command = ("EVALSHA", code.sha, len(keys), *keys, *args)
                if direct:
                    return await adirect(client, command, code)
                if self.cluster:
                    return await self._on_cluster(
                        client, command, code, keys[0], lambda: code.on_asyncio(client, keys, args)
                    )
                sent()
                return await finish(code.on_asyncio(client, keys, args))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _on_cluster(
        self,
        client: Any,
        command: tuple[Any, ...],
        script: Script | None,
        key: Any,
        fallback: Callable[[], Awaitable[Any]],
    ) -> Any:
        """``command`` straight to the master of ``key``'s slot (``anode``); after a
        redirection or any failure but a plain error reply, through the cluster client
        (``fallback()``), which follows redirections and learns the slots again, as on
        the blocking path (:meth:`_evalsha`; sending again is safe: every write is
        idempotent). An error reply there, after a direct send that may have been
        applied, is marked so (``after_lost``)."""
        try:
            return await anode(client, command, script, key)
        except (RedisError, RedisClusterException, OSError) as exc:
            if type(exc) is ResponseError:
                raise
            applied = maybe_applied(exc)
        sent()
        try:
            return await finish(fallback())
        except ResponseError as exc:
            if applied:
                after_lost(exc)
            raise

    def read(self, fn: Callable[[], Any], *, damaged: Callable[[], Exception]) -> Any:
        """Run plain commands (reads), mapping failures to StoreUnavailable, and an
        error reply, which means a key read holds another type, to ``damaged()``."""
        try:
            return fn()
        except (*UNAVAILABLE, RedisError) as exc:
            raise read_failure(self._label, exc, damaged) from exc

    def read_command(self, command: tuple[Any, ...], *, damaged: Callable[[], Exception]) -> Any:
        """:meth:`read` of one plain command (its name and arguments), sent on a
        connection the store keeps when it can (see :meth:`_direct`)."""
        if self._stacks is None:
            return self.read(lambda: self.client.execute_command(*command), damaged=damaged)
        try:
            return self._plain(command)
        except (*UNAVAILABLE, RedisError) as exc:
            raise read_failure(self._label, exc, damaged) from exc

    async def aread(self, client: Any, call: Read) -> Any:
        """:meth:`read` on ``client``, an asyncio client. A read of one command (a peek's
        ``HMGET``) is sent as scripts are (see :meth:`arun`), through the client's own
        path only where that is needed; others, by ``call.command(client)``."""
        try:
            plain = call.plain
            if plain is None:
                return await call.command(client)
            if self.cluster:
                return await self._on_cluster(
                    client, plain, None, plain[1], lambda: client.execute_command(*plain)
                )
            if not getattr(client, "single_connection_client", False):
                return await adirect(client, plain, None)
            return await client.execute_command(*plain)
        except (*UNAVAILABLE, RedisError) as exc:
            raise read_failure(self._label, exc, call.damaged) from exc

    @property
    def async_client(self) -> Any:
        """The ``redis.asyncio`` client async calls are sent on, or ``None`` (worker
        threads run the blocking client). Settable, e.g. in each worker after a fork.

        Raises:
            ValueError: when set to a client of another kind of deployment than the
                store's (a cluster client for one server, or the reverse): its calls
                would reach keys the store does not keep there.
        """
        return self._async_client

    @async_client.setter
    def async_client(self, client: Any) -> None:
        asyncio_clients = (aioredis.Redis, aiocluster.RedisCluster)
        if client is not None and not isinstance(client, asyncio_clients):
            raise ValueError(
                "RedisStore's async_client must be a redis.asyncio.Redis or a "
                f"redis.asyncio.cluster.RedisCluster, got {type(client).__name__} (a blocking "
                "client goes in client=)"
            )
        if client is not None and _decodes(client):
            raise ValueError(
                "RedisStore's async_client decodes responses (decode_responses=True): give "
                "it a client made without decode_responses"
            )
        if client is not None and is_cluster(client) != self.cluster:
            want = (
                "a redis.asyncio.cluster.RedisCluster"
                if self.cluster
                else "a redis.asyncio.Redis (not a cluster client)"
            )
            raise ValueError(
                f"RedisStore's async_client must reach the same kind of deployment as its "
                f"client: this store is on {'a cluster' if self.cluster else 'one server'}, "
                f"so give it {want}"
            )
        self._async_client = client

    def _after_fork(self) -> None:
        """In the child of a fork: an asyncio client's pool (unlike the blocking
        client's) does not notice the fork, so its connections would be shared with
        the parent. The child lets it go; its async events run the blocking client in
        worker threads until it is given a client of its own (``async_client``)."""
        if self.async_client is not None:
            logger.warning(
                "%s: the asyncio client was made before this process forked; async events "
                "in the child use worker threads until it sets store.async_client to a "
                "client of its own",
                self,
            )
        self.async_client = None
        if self._stacks is not None:  # the parent's sockets: the pools make new ones
            self._stacks = {}
        # redis-py's pools reset themselves at their next use under their own locks,
        # which a thread of the parent may have held at the fork (taking or giving
        # back a connection): the child's first call would wait for it forever.
        # (A cluster client's, and its map of the nodes', too.)
        client = self.client
        if self.cluster:
            nodes = client.get_nodes()
            manager = client.nodes_manager
            held = [client, manager, getattr(manager, "read_load_balancer", None)]
            held += [n.redis_connection.connection_pool for n in nodes if n.redis_connection]
        else:
            held = [client.connection_pool]
        for owner in held:
            for name in ("_lock", "_fork_lock", "_initialization_lock"):  # redis-py's
                lock = getattr(owner, name, None)
                if lock is not None:
                    _fork.free_lock(lock)

    def close(self) -> None:
        """Stop notice listeners, give back the connections the store kept to their
        pools (a client of the caller's stays usable, with all of its connections),
        and close the client the store made."""
        for handle in list(self._handles):
            handle.shutdown()
        stacks, self._stacks = self._stacks, ({} if self._stacks is not None else None)
        for pool, conns in (stacks or {}).items():
            while conns:  # (emptied: a call in flight must not give them back again)
                with contextlib.suppress(Exception):
                    pool.release(conns.pop())
        self.client.close()
        pool = getattr(self.client, "connection_pool", None)  # a cluster client has none
        manager = getattr(pool, "sentinel_manager", None)
        if self._own_client and manager is not None:
            for sentinel in manager.sentinels:  # what found the master: left open, they
                sentinel.close()  # would be closed only by the garbage collector
