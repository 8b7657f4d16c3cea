"""The Redis store: many processes and hosts (Redis 7+ or Valkey, through redis-py).

Install with ``pip install 'statekit[redis]'``. Every operation is one round trip: a
Lua script runs it atomically on the server, so a commit is all-or-nothing, each
expired session is claimed by exactly one process, and a session's lease is taken
together with its load. All keys of an app share a hash tag (``{app}``), so the scripts
are cluster-safe. Key TTLs are set only as a garbage-collection backstop, well after
the deadlines the engine enforces; no ``CONFIG SET`` and no keyspace notifications are
needed. Notices to other processes go through pub/sub (best effort: after a lost
connection, subscribers get a ``resync`` notice).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import uuid
import weakref
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

try:
    import redis
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("RedisStore needs the redis package: pip install 'statekit[redis]'") from exc

from statekit._codec import Codec, JSONCodec
from statekit.exceptions import (
    SessionExpired,
    SessionNotFound,
    StateError,
    StoreConflict,
    StoreUnavailable,
)

from . import _redis_scripts as scripts
from ._notices import NoticeFeed
from .base import Busy, DeleteReason, Ended, Gone, Lease, Loaded, Notice

__all__ = ["RedisStore"]

logger = logging.getLogger("statekit")

#: Seconds an ended session's id is remembered, to answer "expired" not "unknown".
TOMBSTONE_TTL = 86_400
#: Key TTLs run this long past the engine's own deadlines (a backstop only).
BACKSTOP = 86_400.0

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_SCRIPTS = (
    "CREATE",
    "LOAD",
    "PEEK",
    "COMMIT",
    "RELEASE",
    "CLOSE",
    "REAP",
    "GLOBAL_CAS",
    "GLOBAL_ADD",
)


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


class RedisStore:
    """Keeps state in Redis, shared by every process and host that uses the server.

    Args:
        url: the server, e.g. ``redis://127.0.0.1:6379/0`` (``rediss://`` for TLS).
        client: a ``redis.Redis`` to use instead of one made from ``url``; it must not
            decode responses.
        async_client: a ``redis.asyncio.Redis`` that async events (``engine.aevent``) use
            for their loads and commits. An asyncio client belongs to one event loop:
            pass the one your server's loop uses, and close it when the server stops.
            Without it, async events run the blocking client in a worker thread, so the
            event loop never waits either way.
        prefix: the first part of every key.
        codec: how values become bytes; :class:`~statekit.JSONCodec` by default.
        socket_timeout: seconds before a silent server counts as unavailable.

    Thread-safe. Raises :class:`~statekit.StoreUnavailable` when the server cannot be
    reached; it reconnects by itself once the server is back.
    """

    shared = True

    def __init__(
        self,
        url: str | None = "redis://127.0.0.1:6379/0",
        *,
        client: redis.Redis | None = None,
        async_client: aioredis.Redis | None = None,
        prefix: str = "statekit",
        codec: Codec | None = None,
        socket_timeout: float = 5.0,
    ) -> None:
        if client is None and url is None:
            raise ValueError("RedisStore needs a url or a client")
        self.codec: Codec = JSONCodec() if codec is None else codec
        self.prefix = prefix
        self.url = url
        self._label = f"RedisStore({_safe_url(url)!r})" if url else "RedisStore(<client>)"
        self.client: redis.Redis = (
            client
            if client is not None
            else redis.Redis.from_url(
                url or "", socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
            )
        )
        self._async_client = async_client
        self._socket_timeout = socket_timeout
        self._handles: weakref.WeakSet[_RedisNamespace] = weakref.WeakSet()
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(
                f"Redis key prefix {prefix!r} is not valid: use 1 to 64 characters among "
                "letters, digits and _ . : -"
            )

    def __repr__(self) -> str:
        return self._label

    def namespace(self, app: str) -> _RedisNamespace:
        """A handle on application ``app`` on this server."""
        handle = _RedisNamespace(self, app)
        self._handles.add(handle)
        return handle

    def run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run one script, mapping connection failures to StoreUnavailable (with
        ``outcome_unknown`` when the request went out and no answer came back)."""
        try:
            return script(keys=keys, args=args)
        except RedisTimeoutError as exc:
            raise StoreUnavailable(
                self._label, f"{type(exc).__name__}: {exc}", outcome_unknown=True
            ) from exc
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(self._label, f"{type(exc).__name__}: {exc}") from exc
        except RedisError as exc:
            if "already in use" in str(exc):
                raise StateError("session id already in use") from exc
            raise StoreUnavailable(self._label, f"{type(exc).__name__}: {exc}") from exc

    async def arun(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """The async form of :meth:`run`, for a script of the asyncio client."""
        try:
            return await script(keys=keys, args=args)
        except RedisTimeoutError as exc:
            raise StoreUnavailable(
                self._label, f"{type(exc).__name__}: {exc}", outcome_unknown=True
            ) from exc
        except (*_UNAVAILABLE, RedisError) as exc:
            raise StoreUnavailable(self._label, f"{type(exc).__name__}: {exc}") from exc

    def command(self, fn: Callable[[], Any]) -> Any:
        """Run one plain command, mapping connection failures to StoreUnavailable."""
        try:
            return fn()
        except (*_UNAVAILABLE, RedisError) as exc:
            raise StoreUnavailable(self._label, f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """Stop notice listeners and close the connection pool."""
        for handle in list(self._handles):
            handle.shutdown()
        self.client.close()


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _num(value: float) -> str:
    return repr(float(value))


class _RedisNamespace:
    """One application's state in a :class:`RedisStore`. Thread-safe."""

    __slots__ = (
        "P",
        "__weakref__",
        "_app",
        "_async_scripts",
        "_feed",
        "_scripts",
        "_store",
        "_texts",
        "channel",
        "origin",
    )

    def __init__(self, store: RedisStore, app: str) -> None:
        self._store = store
        self._app = app
        self.P = f"{store.prefix}:{{{app}}}:"
        self.channel = f"{store.prefix}:{{{app}}}:notices"
        self.origin = f"redis-{uuid.uuid4().hex[:12]}"
        self._feed = NoticeFeed(
            f"statekit-redis-notices-{app}", self._listen, ready_timeout=store._socket_timeout
        )
        self._texts = {
            name: scripts.render(
                getattr(scripts, name),
                prefix=self.P,
                origin=self.origin,
                channel=self.channel,
                tombstone_ttl=TOMBSTONE_TTL,
            )
            for name in _SCRIPTS
        }
        self._scripts = {
            name: store.client.register_script(text) for name, text in self._texts.items()
        }
        self._async_scripts: dict[str, Any] | None = None

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._store.run(self._scripts[name], keys, args)

    async def _arun(self, name: str, keys: list[str], args: list[Any]) -> Any:
        client = self._store._async_client
        if client is None:  # no asyncio client: the blocking one, in a worker thread
            return await asyncio.to_thread(self._run, name, keys, args)
        if self._async_scripts is None:
            self._async_scripts = {
                key: client.register_script(text) for key, text in self._texts.items()
            }
        return await self._store.arun(self._async_scripts[name], keys, args)

    # -- decoding script replies --------------------------------------------------

    def _ended(self, reply: list[Any]) -> Ended:
        sid, reason, at, closed, flat = reply
        values = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
        return Ended(
            sid=_text(sid),
            reason=DeleteReason(_text(reason)),
            values=values,
            was_closed=_text(closed) == "1",
            at=float(at),
        )

    @staticmethod
    def _ended_value(reply: list[Any]) -> Ended:
        sid, _ttl, at, name, value = reply
        return Ended(
            sid=_text(sid),
            reason=DeleteReason.TTL,
            values={_text(name): value},
            state=_text(name),
            at=float(at),
        )

    def _reaped(self, reply: list[Any]) -> Ended:
        return self._ended_value(reply) if _text(reply[1]) == "ttl" else self._ended(reply)

    @staticmethod
    def _gone(raw: bytes) -> Gone:
        reason, at = _text(raw).split("\0")
        return Gone(reason=DeleteReason(reason), at=float(at))

    @staticmethod
    def _backstop(now: float, deadline: float) -> int:
        """Milliseconds until the key's TTL: the deadline's distance plus the backstop
        (relative, so the server's clock and the engine's need not agree)."""
        return max(1, int((deadline - now + BACKSTOP) * 1000))

    # -- sessions ---------------------------------------------------------------

    def create_session(
        self, sid: str, *, now: float, deadline: float, capacity: int
    ) -> tuple[Ended, ...]:
        reply = self._run(
            "CREATE",
            [self.P + "s:" + sid],
            [sid, _num(now), _num(deadline), capacity, self._backstop(now, deadline)],
        )
        return tuple(self._ended(item) for item in reply)

    def _load_call(
        self, sid: str, now: float, touch_until: float | None, lease: Lease | None
    ) -> tuple[list[str], list[Any]]:
        return (
            [self.P + "s:" + sid],
            [
                sid,
                _num(now),
                "" if touch_until is None else _num(touch_until),
                "" if lease is None else lease.token,
                "" if lease is None else _num(lease.until),
                self._backstop(now, now if touch_until is None else touch_until),
            ],
        )

    def _loaded(self, sid: str, reply: list[Any]) -> Loaded | Gone | Busy | None:
        kind = _text(reply[0])
        if kind == "ok":
            _, version, closed, flat, expired = reply
            return Loaded(
                sid=sid,
                version=int(version),
                closed=_text(closed) == "1",
                values={_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)},
                expired=tuple(self._ended_value(item) for item in expired),
            )
        if kind == "busy":
            return Busy(until=float(reply[1]))
        if kind == "gone":
            return self._gone(reply[1])
        if kind == "expired":
            ended = self._ended(reply[1])
            return Gone(reason=ended.reason, at=ended.at, ended=ended)
        return None

    def load_session(
        self, sid: str, *, now: float, touch_until: float | None, lease: Lease | None = None
    ) -> Loaded | Gone | Busy | None:
        keys, args = self._load_call(sid, now, touch_until, lease)
        return self._loaded(sid, self._run("LOAD", keys, args))

    def peek(
        self, sid: str, name: str, *, now: float, touch_until: float | None
    ) -> Loaded | Gone | None:
        # Most reads need no script: one HMGET, like a raw GET, shows the session live,
        # the value not due and no touch due (see touch() in the scripts). Any
        # other case (gone, expired, a value past its ttl, a touch due) runs the PEEK
        # script, which decides it atomically.
        key = self.P + "s:" + sid
        version, closed, deadline, value, value_deadline = self._store.command(
            lambda: self._store.client.hmget(key, "_v", "_c", "_d", "v:" + name, "t:" + name)
        )
        if (
            deadline is not None
            and float(deadline) > now
            and (value_deadline is None or float(value_deadline) > now)
            and (
                _text(closed) == "1"
                or touch_until is None
                or touch_until - float(deadline) < min(1.0, (touch_until - now) / 10)
            )
        ):
            return Loaded(
                sid=sid,
                version=int(version),
                closed=_text(closed) == "1",
                values={} if value is None else {name: value},
            )
        reply = self._run(
            "PEEK",
            [self.P + "s:" + sid],
            [
                sid,
                _num(now),
                "" if touch_until is None else _num(touch_until),
                name,
                self._backstop(now, now if touch_until is None else touch_until),
            ],
        )
        outcome = self._loaded(sid, reply)
        assert not isinstance(outcome, Busy)
        return outcome

    async def aload_session(
        self, sid: str, *, now: float, touch_until: float | None, lease: Lease | None = None
    ) -> Loaded | Gone | Busy | None:
        keys, args = self._load_call(sid, now, touch_until, lease)
        return self._loaded(sid, await self._arun("LOAD", keys, args))

    def _commit_call(
        self,
        sid: str,
        version: int,
        writes: Mapping[str, Any],
        ttl_deadlines: Mapping[str, float],
        lease: str | None,
        release: bool,
        now: float,
    ) -> tuple[list[str], list[Any]]:
        args: list[Any] = [sid, str(version), lease or "", "1" if release else "0"]
        for name, value in writes.items():
            deadline = ttl_deadlines.get(name)
            args += [name, value, "" if deadline is None else _num(deadline)]
        return [self.P + "s:" + sid], args

    def _committed(self, sid: str, version: int, now: float, reply: list[Any]) -> int:
        kind = _text(reply[0])
        if kind == "ok":
            return int(reply[1])
        if kind == "conflict":
            raise StoreConflict(sid, version, None if reply[1] is None else int(reply[1]))
        if kind == "gone":
            gone = self._gone(reply[1])
            raise SessionExpired(sid, gone.reason.value, max(0.0, now - gone.at))
        raise SessionNotFound(sid)

    def commit(
        self,
        sid: str,
        *,
        version: int,
        writes: Mapping[str, Any],
        ttl_deadlines: Mapping[str, float],
        now: float,
        lease: str | None = None,
        release: bool = True,
    ) -> int:
        keys, args = self._commit_call(sid, version, writes, ttl_deadlines, lease, release, now)
        return self._committed(sid, version, now, self._run("COMMIT", keys, args))

    async def acommit(
        self,
        sid: str,
        *,
        version: int,
        writes: Mapping[str, Any],
        ttl_deadlines: Mapping[str, float],
        now: float,
        lease: str | None = None,
        release: bool = True,
    ) -> int:
        keys, args = self._commit_call(sid, version, writes, ttl_deadlines, lease, release, now)
        return self._committed(sid, version, now, await self._arun("COMMIT", keys, args))

    def release(self, sid: str, *, lease: str) -> None:
        self._run("RELEASE", [self.P + "s:" + sid], [lease])

    async def arelease(self, sid: str, *, lease: str) -> None:
        await self._arun("RELEASE", [self.P + "s:" + sid], [lease])

    def close_session(self, sid: str, *, now: float, deadline: float) -> bool | Gone | None:
        reply = self._run(
            "CLOSE",
            [self.P + "s:" + sid],
            [sid, _num(now), _num(deadline), self._backstop(now, deadline)],
        )
        kind = _text(reply[0])
        if kind == "closed":
            return True
        if kind == "already":
            return False
        if kind == "gone":
            return self._gone(reply[1])
        if kind == "expired":
            ended = self._ended(reply[1])
            return Gone(reason=ended.reason, at=ended.at, ended=ended)
        return None

    def session_count(self) -> int:
        P = self.P
        client = self._store.client

        def count() -> int:
            pipe = client.pipeline(transaction=False)
            pipe.zcard(P + "lru")
            pipe.zcard(P + "closed")
            return int(sum(pipe.execute()))

        return int(self._store.command(count))

    # -- lifetimes ---------------------------------------------------------------

    def reap(self, *, now: float, limit: int) -> tuple[Ended, ...]:
        P = self.P
        reply = self._run("REAP", [P + "dl"], [_num(now), limit])
        return tuple(self._reaped(item) for item in reply)

    # -- globals -----------------------------------------------------------------

    def global_get(self, name: str) -> tuple[Any, int] | None:
        key = self.P + "g:" + name
        found = self._store.command(lambda: self._store.client.hmget(key, "v", "n"))
        value, version = found
        return None if value is None else (value, int(version))

    def global_cas(self, name: str, *, version: int | None, value: Any) -> int | None:
        reply = self._run(
            "GLOBAL_CAS", [self.P + "g:" + name], ["" if version is None else str(version), value]
        )
        return None if reply is None else int(reply)

    def global_add(self, name: str, amount: int | float, *, default: int | float) -> Any:
        codec = self._store.codec
        if isinstance(codec, JSONCodec) and type(amount) is int and type(default) is int:
            raw = self._run("GLOBAL_ADD", [self.P + "g:" + name], [str(amount), str(default)])
            if raw is not None:
                return int(raw)
        # Floats, huge integers, other codecs: read, add, compare-and-set.
        while True:
            found = self.global_get(name)
            current = default if found is None else codec.decode(found[0])
            value = current + amount
            version = None if found is None else found[1]
            if self.global_cas(name, version=version, value=codec.encode(value)) is not None:
                return value

    # -- notices -----------------------------------------------------------------

    def subscribe(self, callback: Callable[[Notice], None]) -> Callable[[], None]:
        return self._feed.subscribe(callback)

    def _listen(
        self,
        stop: threading.Event,
        ready: threading.Event,
        deliver: Callable[[Notice], None],
    ) -> None:
        """Receive notices; after a lost connection, reconnect and send ``resync``."""
        lost = False
        delay = 0.05
        while not stop.is_set():
            pubsub = self._store.client.pubsub(  # type: ignore[no-untyped-call]
                ignore_subscribe_messages=True
            )
            try:
                pubsub.subscribe(self.channel)
                ready.set()
                if lost:
                    deliver(Notice(kind="resync", sid="", origin="redis"))
                    lost = False
                delay = 0.05
                while not stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message is None or message.get("type") != "message":
                        continue
                    notice = self._notice(message["data"])
                    if notice is not None:
                        deliver(notice)
            except Exception:  # a lost connection, or the store being closed
                if stop.is_set():
                    break
                lost = True
                stop.wait(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def _notice(self, data: bytes) -> Notice | None:
        try:
            raw = json.loads(data)
        except ValueError:
            return None
        if raw.get("o") == self.origin:
            return None
        names = raw.get("n") or []
        return Notice(
            kind=raw["k"],
            sid=raw["s"],
            names=tuple(names) if isinstance(names, list) else (),
            reason=DeleteReason(raw["r"]) if raw.get("r") else None,
            origin=raw.get("o", ""),
        )

    def shutdown(self) -> tuple[Ended, ...]:
        self._feed.stop()
        return ()
