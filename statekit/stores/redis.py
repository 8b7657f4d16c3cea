"""The Redis store: many processes and hosts (Redis 7+ or Valkey, through redis-py).

Install with ``pip install 'statekit[redis]'``. Every operation is one round trip: a
Lua script runs it atomically on the server, so a commit is all-or-nothing, each
expired session is claimed by exactly one process, and a session's lease is taken
together with its load. All keys of an app share a hash tag (``{app}``), so the scripts
are cluster-safe. Key TTLs are set only as a garbage-collection backstop, well after
the deadlines the engine enforces; no ``CONFIG SET`` and no keyspace notifications are
needed. Notices to other processes go through pub/sub (best effort: after a lost
connection, subscribers get a ``resync`` notice).

Every write carries a request id, and the script remembers its reply under it for
``request_ttl`` seconds: a write sent again after a lost connection (by a retrying
client, or once by the store itself) returns the first outcome and is applied once.
When no answer can be had, :class:`~statekit.StoreUnavailable` says whether the
request may have been applied (``outcome_unknown``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

try:
    import redis
    import redis.asyncio as aioredis
    from redis.backoff import EqualJitterBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisClusterException, RedisError, ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("RedisStore needs the redis package: pip install 'statekit[redis]'") from exc

from statekit import _fork
from statekit._codec import Codec, JSONCodec
from statekit.exceptions import (
    CodecError,
    SessionCorrupt,
    SessionExpired,
    SessionNotFound,
    StateError,
    StoreConflict,
    StoreUnavailable,
    redact,
)

from . import _redis_scripts as scripts
from ._notices import NoticeFeed
from .base import Busy, DeleteReason, Ended, Gone, Lease, Loaded, Notice, SessionIdTaken

__all__ = ["RedisStore"]

logger = logging.getLogger("statekit")

#: Seconds an ended session's id is remembered, to answer "expired" not "unknown".
TOMBSTONE_TTL = 86_400
#: Key TTLs run this long past the engine's own deadlines (a backstop only).
BACKSTOP = 86_400.0

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError, RedisClusterException)
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_REASONS = frozenset(reason.value for reason in DeleteReason)
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
    "REPLAY",
)
#: Seconds the reply of a load or a reap that claimed something is remembered (it
#: holds deleted values): long enough for retries, and for the engine's next look to
#: pick up a reply that was lost (see _RedisNamespace._resolve).
CLAIM_TTL = 10.0
#: How many index members one reap script looks at, at most per entry asked for (and
#: at least BUDGET_MIN): a pile of junk is cleared over several short calls, never in
#: one long script that would hold up every other client of the server.
BUDGET_PER_ENTRY = 4
BUDGET_MIN = 2048


def _before_send(exc: BaseException) -> bool:
    """Whether a connection failure happened while the client was still getting a
    connection for the request, so that nothing of it was sent.

    redis-py's ``Redis`` takes a connection from its pool (connecting it if needed)
    before sending anything and before its own retries begin; a failure there is raised
    from the pool's ``get_connection``. Any other failure may come after the request
    left, or after an earlier attempt of a retrying client did: then the outcome is
    unknown. A cluster client takes connections inside its retry loop, so with one the
    outcome is always unknown. When in doubt, this answers False (unknown).
    """
    tb: TracebackType | None = exc.__traceback__
    found = False
    while tb is not None:
        frame = tb.tb_frame
        if "cluster" in frame.f_code.co_filename.rsplit("/", 1)[-1]:
            return False
        if (
            frame.f_code.co_name == "get_connection"
            and "Pool" in type(frame.f_locals.get("self")).__name__
        ):
            found = True
        tb = tb.tb_next
    return found


def _default_retry() -> Retry:
    """Three quick retries after a lost connection: harmless, every write being
    idempotent, and they carry a request over a server restart or a failover. Not after
    a timeout: a server too slow to answer is not asked again."""
    return Retry(
        EqualJitterBackoff(cap=0.5, base=0.01), 3, supported_errors=(RedisConnectionError,)
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
            event loop never waits either way. It may be set later (the attribute
            ``async_client``), for example in each worker after a fork: a client made
            before a fork is dropped in the child, whose sockets it would share.
        prefix: the first part of every key.
        codec: how values become bytes; :class:`~statekit.JSONCodec` by default.
        socket_timeout: seconds before a silent server counts as unavailable.
        request_ttl: seconds the server remembers the reply of each write, so that a
            write sent again (after a lost connection) returns its first outcome and is
            applied once. Engines refuse a ``lease_ttl`` above it.

    The client made from ``url`` retries a request three times after a lost connection
    (within about a second); a ``client`` of your own keeps its own retry policy. Both
    are safe: every write is idempotent.

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
        request_ttl: float = 60.0,
    ) -> None:
        if client is None and url is None:
            raise ValueError("RedisStore needs a url or a client")
        if isinstance(request_ttl, bool) or not isinstance(request_ttl, (int, float)):
            raise ValueError(f"request_ttl must be a number of seconds, got {request_ttl!r}")
        if not 1 <= request_ttl <= 86_400:
            raise ValueError(f"request_ttl must be between 1 and 86400 seconds, got {request_ttl}")
        self.request_ttl = float(request_ttl)
        self.codec: Codec = JSONCodec() if codec is None else codec
        self.prefix = prefix
        self.url = url
        self._label = f"RedisStore({_safe_url(url)!r})" if url else "RedisStore(<client>)"
        self.client: redis.Redis = (
            client
            if client is not None
            else redis.Redis.from_url(
                url or "",
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=_default_retry(),
            )
        )
        self.async_client = async_client
        _fork.after_fork_in_child(self)
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

    def run(self, script: Any, keys: list[str], args: list[Any], *, applies: bool) -> Any:
        """Run one script, mapping failures to StoreUnavailable.

        Every script that writes is idempotent (its request key is the last of
        ``keys``): after a lost connection it is sent once more, and the answer, if
        one comes, is the first outcome. ``applies``: the script applies the caller's
        write, so that an outcome that stays unknown must be said
        (``outcome_unknown``). Whether the request may have been applied at all is
        kept on the error as ``_sent``, for claims to be made good later.
        """
        sent = False
        for attempt in (1, 2):
            try:
                return script(keys=keys, args=args)
            except _UNAVAILABLE as exc:
                sent = sent or not _before_send(exc)
                if attempt == 2 or not sent or isinstance(exc, RedisTimeoutError):
                    # Sent again only after a lost connection: a server too slow to
                    # answer in time is not asked twice.
                    error = self._unavailable(exc, unknown=applies and sent)
                    error._sent = sent  # type: ignore[attr-defined]
                    raise error from exc
            except RedisError as exc:
                raise self._refused(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def arun(self, script: Any, keys: list[str], args: list[Any], *, applies: bool) -> Any:
        """The async form of :meth:`run`, for a script of the asyncio client."""
        sent = False
        for attempt in (1, 2):
            try:
                return await script(keys=keys, args=args)
            except _UNAVAILABLE as exc:
                sent = sent or not _before_send(exc)
                if attempt == 2 or not sent or isinstance(exc, RedisTimeoutError):
                    error = self._unavailable(exc, unknown=applies and sent)
                    error._sent = sent  # type: ignore[attr-defined]
                    raise error from exc
            except RedisError as exc:
                raise self._refused(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _unavailable(self, exc: BaseException, *, unknown: bool) -> StoreUnavailable:
        error = StoreUnavailable(
            self._label, f"{type(exc).__name__}: {exc}", outcome_unknown=unknown
        )
        error._sent = not _before_send(exc)  # type: ignore[attr-defined]
        return error

    def _refused(self, exc: RedisError) -> StateError:
        """An error reply of the server (not a lost connection)."""
        if isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE"):
            return _WrongType(self._label, "a key statekit uses holds another type of value")
        return StoreUnavailable(self._label, f"{type(exc).__name__}: {exc}")

    def command(self, fn: Callable[[], Any]) -> Any:
        """Run one plain command (a read), mapping failures to StoreUnavailable."""
        try:
            return fn()
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(self._label, f"{type(exc).__name__}: {exc}") from exc
        except RedisError as exc:
            raise self._refused(exc) from exc

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

    def close(self) -> None:
        """Stop notice listeners and close the connection pool."""
        for handle in list(self._handles):
            handle.shutdown()
        self.client.close()


class _WrongType(StoreUnavailable):
    """A key statekit reads holds another type of value (someone else wrote it). The
    namespace turns it into an error naming the session or state concerned; what is
    left (an index) stays this: the app cannot be served until an operator repairs it.
    """

    def __init__(self, store: str, detail: str) -> None:
        self.store = store
        self.outcome_unknown = False
        StateError.__init__(
            self,
            f"{store} holds damaged data ({detail}): nothing was written; an operator "
            "must delete the damaged key for this app to be served again",
        )


def _member_sid(member: bytes | str) -> str:
    """The session id at the start of an index member (or the member itself)."""
    text = _text(member)
    if text[:2] in ("s\0", "v\0"):
        text = text[2:]
    return text.split("\0", 1)[0]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _num(value: float) -> str:
    return repr(float(value))


#: Which scripts apply the caller's own write: an outcome that stays unknown after a
#: lost connection is said for these (StoreUnavailable.outcome_unknown). The others
#: only read, lease, touch or claim: whatever they did, the caller's action had not
#: started.
_APPLIES = frozenset({"CREATE", "COMMIT", "CLOSE", "GLOBAL_CAS", "GLOBAL_ADD"})
#: Scripts without a request key (idempotent by nature, or reading only).
_PLAIN = frozenset({"RELEASE", "REPLAY"})
#: Scripts that may remove entries whose callbacks the caller must run.
_CLAIMING = frozenset({"CREATE", "LOAD", "PEEK", "CLOSE", "REAP"})
#: Scripts about one session (KEYS[1] its hash, ARGV[1] its id), and about one global.
_SESSION_SCRIPTS = frozenset({"LOAD", "PEEK", "COMMIT", "CLOSE"})
_GLOBAL_SCRIPTS = frozenset({"GLOBAL_CAS", "GLOBAL_ADD"})
#: Requests whose lost replies are remembered to read back, at most.
_UNRESOLVED_MAX = 10_000
#: Warn about junk notices at the first and then every this many.
_JUNK_LOG_EVERY = 1000


class _RedisNamespace:
    """One application's state in a :class:`RedisStore`. Thread-safe."""

    __slots__ = (
        "P",
        "__weakref__",
        "_app",
        "_async_for",
        "_async_scripts",
        "_feed",
        "_ignored",
        "_scripts",
        "_store",
        "_texts",
        "_unresolved",
        "_unresolved_lock",
        "channel",
        "origin",
    )

    def __init__(self, store: RedisStore, app: str) -> None:
        self._store = store
        self._app = app
        self.P = f"{store.prefix}:{{{app}}}:"
        self.channel = f"{store.prefix}:{{{app}}}:notices"
        self._feed = NoticeFeed(
            f"statekit-redis-notices-{app}", self._listen, ready_timeout=store._socket_timeout
        )
        self._ignored = 0
        # Requests that may have claimed entries but whose reply was lost: request
        # key -> (script, session id, when to give up, on the monotonic clock).
        self._unresolved: dict[str, tuple[str, str, float]] = {}
        self._unresolved_lock = threading.Lock()
        self._make_scripts()
        _fork.after_fork_in_child(self)

    def _make_scripts(self) -> None:
        """Draw this handle's origin and register its scripts (once, and again in the
        child of a fork: a child is a handle of its own)."""
        store = self._store
        self.origin = f"redis-{uuid.uuid4().hex[:12]}"
        self._texts = {
            name: scripts.render(
                getattr(scripts, name),
                prefix=self.P,
                origin=self.origin,
                channel=self.channel,
                tombstone_ttl=TOMBSTONE_TTL,
                request_ms=int(store.request_ttl * 1000),
                claim_ms=int(min(CLAIM_TTL, store.request_ttl) * 1000),
            )
            for name in _SCRIPTS
        }
        self._scripts = {
            name: store.client.register_script(text) for name, text in self._texts.items()
        }
        self._async_scripts: dict[str, Any] | None = None
        self._async_for: Any = None

    def _after_fork(self) -> None:
        self._make_scripts()
        _fork.free_lock(self._unresolved_lock)
        self._unresolved.clear()  # the parent's to make good

    def _keys(self, name: str, *keys: str) -> list[str]:
        """The script's keys, plus a new request key for a script that writes."""
        if name in _PLAIN:
            return list(keys)
        return [*keys, self.P + "q:" + os.urandom(8).hex()]

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            reply = self._store.run(self._scripts[name], keys, args, applies=name in _APPLIES)
        except StoreUnavailable as exc:
            raise self._failed(name, keys, args, exc) from exc
        return self._checked(reply)

    def _checked(self, reply: Any) -> Any:
        """The reply, unless it says an index of the app is damaged (checked before
        the script wrote anything)."""
        if type(reply) is list and reply and reply[0] == b"damaged":
            raise _WrongType(
                str(self._store),
                f"the key {_text(reply[1])!r} holds another type of value than statekit "
                "writes there",
            )
        return reply

    async def _arun(self, name: str, keys: list[str], args: list[Any]) -> Any:
        client = self._store.async_client
        if client is None:  # no asyncio client: the blocking one, in a worker thread
            return await asyncio.to_thread(self._run, name, keys, args)
        if self._async_scripts is None or self._async_for is not client:
            # Scripts belong to the client that registered them: a client set later
            # (a worker's own, after a fork) registers its own.
            self._async_scripts = {
                key: client.register_script(text) for key, text in self._texts.items()
            }
            self._async_for = client
        try:
            reply = await self._store.arun(
                self._async_scripts[name], keys, args, applies=name in _APPLIES
            )
        except StoreUnavailable as exc:
            raise self._failed(name, keys, args, exc) from exc
        return self._checked(reply)

    def _failed(
        self, name: str, keys: list[str], args: list[Any], exc: StoreUnavailable
    ) -> StateError:
        """The error to raise for a script that failed. A request that may have claimed
        entries (removed sessions or values) but got no answer is remembered, so that
        the next reap reads its reply back and their callbacks still run, once."""
        if isinstance(exc, _WrongType):
            if name in _SESSION_SCRIPTS:
                return SessionCorrupt(args[0], "its Redis key holds another type of value")
            if name in _GLOBAL_SCRIPTS:
                return CodecError(
                    f"global state {keys[0][len(self.P) + 2 :]!r} is damaged in "
                    f"{self._store}: its key {keys[0]!r} holds another type of value; "
                    "delete that key to start it again from its default",
                    state=keys[0][len(self.P) + 2 :],
                )
            return exc
        if name in _CLAIMING and getattr(exc, "_sent", False):
            sid = "" if name == "REAP" else str(args[0])
            give_up = time.monotonic() + (
                self._store.request_ttl
                if name in _APPLIES
                else min(CLAIM_TTL, self._store.request_ttl)
            )
            with self._unresolved_lock:
                dropped = None
                if len(self._unresolved) >= _UNRESOLVED_MAX:
                    dropped = self._unresolved.pop(next(iter(self._unresolved)))
                self._unresolved[keys[-1]] = (name, sid, give_up)
            if dropped is not None:
                self._warn_unresolved(dropped[0])
        return exc

    def _resolve(self) -> list[Ended]:
        """Read back the replies of requests that may have claimed entries but whose
        answer was lost, and return what they claimed. Each request is taken out of the
        table before it is read (so that two threads never both hand its entries over)
        and put back if the read fails; what was read is returned even then, and the
        rest waits for the next call, until too old (then logged)."""
        ended: list[Ended] = []
        now = time.monotonic()
        while True:
            with self._unresolved_lock:
                if not self._unresolved:
                    return ended
                key = next(iter(self._unresolved))
                name, sid, give_up = self._unresolved.pop(key)
            if now > give_up:
                self._warn_unresolved(name)
                continue
            try:
                found = self._run("REPLAY", [key], [])
            except StoreUnavailable:
                with self._unresolved_lock:
                    self._unresolved[key] = (name, sid, give_up)
                return ended
            if found[0] == 1:
                ended.extend(self._claims_in(name, sid, found[1]))

    def _warn_unresolved(self, name: str) -> None:
        logger.warning(
            "the reply of a %s request to %s was lost and could not be read back in "
            "time: callbacks of what it removed, if anything, did not run",
            name,
            self._store,
        )

    def _claims_in(self, name: str, sid: str, reply: list[Any]) -> list[Ended]:
        """The entries a remembered reply of script ``name`` claimed."""
        if name == "REAP":
            return [self._reaped(item) for item in reply[0]]
        if name == "CREATE":
            return [self._ended(item) for item in reply[0]]
        kind = _text(reply[0])
        if kind == "closed":  # a close that took effect: its hooks are still due
            return [Ended(sid=sid, reason=DeleteReason.CLOSED, values={}, at=0.0)]
        if kind == "expired":
            return [self._ended(reply[1])]
        if kind == "ok" and name in ("LOAD", "PEEK"):
            return [self._ended_value(item) for item in reply[4]]
        return []

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

    def _gone(self, sid: str, raw: bytes) -> Gone:
        try:
            reason, at = _text(raw).split("\0")
            return Gone(reason=DeleteReason(reason), at=float(at))
        except ValueError:  # not what a script writes: someone else wrote this key
            raise SessionCorrupt(
                sid, "its record of why it ended is not one statekit wrote"
            ) from None

    def _warn_junk(self, where: str, members: list[Any]) -> None:
        """Log, once per call, the index entries a script removed because they named
        nothing (members hold session ids: only their first characters are shown)."""
        shown = ", ".join(redact(_member_sid(m)) for m in members[:3])
        logger.warning(
            "removed %d damaged %s from %r of %s (%s%s): they name no stored session or value",
            len(members),
            "entry" if len(members) == 1 else "entries",
            self.P + where,
            self._store,
            shown,
            ", ..." if len(members) > 3 else "",
        )

    @staticmethod
    def _corrupt(sid: str, field: Any) -> SessionCorrupt:
        name = _text(field)
        shown = "a value deadline" if name.startswith("t:") else f"field {name!r}"
        return SessionCorrupt(sid, f"{shown} of its Redis hash is not a number")

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
            self._keys("CREATE", self.P + "s:" + sid),
            [sid, _num(now), _num(deadline), capacity, self._backstop(now, deadline)],
        )
        if reply[0] == b"taken":
            raise SessionIdTaken
        evicted, junk = reply
        if junk:
            self._warn_junk("lru", junk)
        return tuple(self._ended(item) for item in evicted)

    def _load_call(
        self, sid: str, now: float, touch_until: float | None, lease: Lease | None
    ) -> tuple[list[str], list[Any]]:
        return (
            self._keys("LOAD", self.P + "s:" + sid),
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
            return self._gone(sid, reply[1])
        if kind == "expired":
            ended = self._ended(reply[1])
            return Gone(reason=ended.reason, at=ended.at, ended=ended)
        if kind == "corrupt":
            raise self._corrupt(sid, reply[1])
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
        # other case (gone, expired, a value past its ttl, a touch due, a field that
        # does not parse) runs the PEEK script, which decides it atomically.
        key = self.P + "s:" + sid
        try:
            version, closed, deadline, value, value_deadline = self._store.command(
                lambda: self._store.client.hmget(key, "_v", "_c", "_d", "v:" + name, "t:" + name)
            )
        except _WrongType as exc:
            raise self._failed("PEEK", [key], [sid], exc) from exc
        try:
            fast = (
                deadline is not None
                and float(deadline) > now
                and (value_deadline is None or float(value_deadline) > now)
                and (
                    _text(closed) == "1"
                    or touch_until is None
                    or touch_until - float(deadline) < min(1.0, (touch_until - now) / 10)
                )
            )
            loaded = Loaded(
                sid=sid,
                version=int(version),
                closed=_text(closed) == "1",
                values={} if value is None else {name: value},
            )
        except (TypeError, ValueError):  # a damaged field: the script says which
            fast = False
        if fast:
            return loaded
        reply = self._run(
            "PEEK",
            self._keys("PEEK", self.P + "s:" + sid),
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
    ) -> tuple[list[str], list[Any]]:
        args: list[Any] = [sid, str(version), lease or "", "1" if release else "0"]
        for name, value in writes.items():
            deadline = ttl_deadlines.get(name)
            args += [name, value, "" if deadline is None else _num(deadline)]
        return self._keys("COMMIT", self.P + "s:" + sid), args

    def _committed(self, sid: str, version: int, now: float, reply: list[Any]) -> int:
        kind = _text(reply[0])
        if kind == "ok":
            return int(reply[1])
        if kind == "conflict":
            raise StoreConflict(sid, version, None if reply[1] is None else int(reply[1]))
        if kind == "gone":
            gone = self._gone(sid, reply[1])
            raise SessionExpired(sid, gone.reason.value, max(0.0, now - gone.at))
        if kind == "corrupt":
            raise self._corrupt(sid, reply[1])
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
        keys, args = self._commit_call(sid, version, writes, ttl_deadlines, lease, release)
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
        keys, args = self._commit_call(sid, version, writes, ttl_deadlines, lease, release)
        return self._committed(sid, version, now, await self._arun("COMMIT", keys, args))

    def release(self, sid: str, *, lease: str) -> None:
        self._run("RELEASE", self._keys("RELEASE", self.P + "s:" + sid), [lease])

    async def arelease(self, sid: str, *, lease: str) -> None:
        await self._arun("RELEASE", self._keys("RELEASE", self.P + "s:" + sid), [lease])

    def close_session(self, sid: str, *, now: float, deadline: float) -> bool | Gone | None:
        reply = self._run(
            "CLOSE",
            self._keys("CLOSE", self.P + "s:" + sid),
            [sid, _num(now), _num(deadline), self._backstop(now, deadline)],
        )
        kind = _text(reply[0])
        if kind == "closed":
            return True
        if kind == "already":
            return False
        if kind == "gone":
            return self._gone(sid, reply[1])
        if kind == "expired":
            ended = self._ended(reply[1])
            return Gone(reason=ended.reason, at=ended.at, ended=ended)
        if kind == "corrupt":
            raise self._corrupt(sid, reply[1])
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
        if self._unresolved:
            made_good = self._resolve()
            if made_good:  # hand these over first: a failing reap must not lose them
                return tuple(made_good)
        budget = max(BUDGET_MIN, limit * BUDGET_PER_ENTRY)
        out: list[Ended] = []
        junk: list[Any] = []
        try:
            # Fewer than limit only when nothing more is due: each call looks at no
            # more than budget members, so a pile of junk takes several calls.
            while True:
                ended, removed, more = self._run(
                    "REAP",
                    self._keys("REAP", self.P + "dl"),
                    [_num(now), limit - len(out), budget],
                )
                out.extend(self._reaped(item) for item in ended)
                junk.extend(removed)
                if not more or len(out) >= limit:
                    return tuple(out)
        finally:
            if junk:
                self._warn_junk("dl", junk)

    # -- globals -----------------------------------------------------------------

    def global_get(self, name: str) -> tuple[Any, int] | None:
        key = self.P + "g:" + name
        try:
            value, version = self._store.command(lambda: self._store.client.hmget(key, "v", "n"))
        except _WrongType as exc:
            raise self._failed("GLOBAL_CAS", [key], [], exc) from exc
        if value is None and version is None:
            return None
        try:
            if value is None or version is None or len(version) > 15:
                raise ValueError
            return value, int(version)
        except (TypeError, ValueError):
            raise CodecError(
                f"global state {name!r} is damaged in {self._store}: its hash "
                f"{key!r} is not one statekit wrote (a field is missing or its version "
                "is not a number); delete that key to start it again from its default",
                state=name,
            ) from None

    def global_cas(self, name: str, *, version: int | None, value: Any) -> int | None:
        reply = self._run(
            "GLOBAL_CAS",
            self._keys("GLOBAL_CAS", self.P + "g:" + name),
            ["" if version is None else str(version), value],
        )
        return None if reply is None else int(reply)

    def global_add(self, name: str, amount: int | float, *, default: int | float) -> Any:
        codec = self._store.codec
        if isinstance(codec, JSONCodec) and type(amount) is int and type(default) is int:
            try:
                args = [str(amount), str(default)]
            except ValueError:  # an int too long to write as text: the codec says so below
                args = None
            if args is not None:
                raw = self._run("GLOBAL_ADD", self._keys("GLOBAL_ADD", self.P + "g:" + name), args)
                if isinstance(raw, list):  # the hash is not one statekit wrote
                    self.global_get(name)  # raises, saying what is wrong
                    raise CodecError(f"global state {name!r} is damaged", state=name)
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

    @property
    def ignored_notices(self) -> int:
        """How many messages on this app's notice channel were not statekit notices
        (ignored, each counted; the first and every thousandth are logged)."""
        return self._ignored

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
            pubsub = self._store.client.pubsub()  # type: ignore[no-untyped-call]
            try:
                self._subscribed(pubsub, stop)
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

    def _subscribed(self, pubsub: Any, stop: threading.Event) -> None:
        """Subscribe to the notice channel and wait until the server confirms it, so
        that every notice published from then on is received.

        Raises:
            StoreUnavailable: no confirmation within the store's socket timeout.
        """
        pubsub.subscribe(self.channel)
        deadline = time.monotonic() + self._store._socket_timeout
        while not stop.is_set() and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
            if message is not None and message.get("type") == "subscribe":
                return
        raise StoreUnavailable(str(self._store), "the notice subscription was not confirmed")

    def _notice(self, data: object) -> Notice | None:
        """The notice in a message of the channel; None for one of this handle's own,
        and for anything that is not a statekit notice (ignored and counted: a
        stray publisher must not cost every subscriber a resync)."""
        try:
            raw = json.loads(data)  # type: ignore[arg-type]
            kind, sid, origin = raw["k"], raw["s"], raw.get("o", "")
            names = raw.get("n") or []
            names = [] if names == {} else names  # Lua's cjson writes an empty list as {}
            reason = raw.get("r")
            if (
                kind not in ("changed", "ended")
                or type(sid) is not str
                or type(origin) is not str
                or type(names) is not list
                or any(type(name) is not str for name in names)
                or (reason is not None and reason not in _REASONS)
                or (kind == "ended" and reason is None)
            ):
                raise ValueError
        except (ValueError, TypeError, KeyError, AttributeError):
            self._ignored += 1
            if self._ignored % _JUNK_LOG_EVERY == 1:
                logger.warning(
                    "ignored a message on %r that is not a statekit notice (%d so far): "
                    "only statekit should publish there",
                    self.channel,
                    self._ignored,
                )
            return None
        if origin == self.origin:
            return None
        return Notice(
            kind=kind,
            sid=sid,
            names=tuple(names),
            reason=None if reason is None else DeleteReason(reason),
            origin=origin,
        )

    def shutdown(self) -> tuple[Ended, ...]:
        """Stop receiving notices; hand over what requests whose reply was lost
        removed, if it can still be read back (its callbacks are due here)."""
        self._feed.stop()
        try:
            return tuple(self._resolve()) if self._unresolved else ()
        except StoreUnavailable:  # pragma: no cover - _resolve keeps what it cannot read
            return ()
