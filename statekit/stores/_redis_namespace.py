"""One application's state in a Redis store: the store protocol's operations, each
made of the keys and arguments of scripts (see ``_redis_scripts``) and the reading of
their replies (``_redis_replies``).

Every operation is written once — a *plan* of one script call and how to read its
answer, or a generator of the calls it makes (``_redis_calls``) — and run either
blocking (``load_session``) or awaited (``aload_session``): on the store's asyncio
client when it has one, else blocking in a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from statekit import _fork
from statekit._checks import USER_PREFIX
from statekit._codec import JSONCodec, encode_with
from statekit.exceptions import CodecError, SessionCorrupt, StoreUnavailable

from . import _redis_replies as replies
from . import _redis_spread as spread_ops
from ._finish import IN_THE_TASK, finish, finishing, sent, unsent
from ._redis_calls import Call, Ops, Pause, Plan, Read, raw
from ._redis_claims import CLAIM_TTL, LostClaims
from ._redis_failures import DamagedKey
from ._redis_joint import joint_plan
from ._redis_layout import Bucket, Layout
from ._redis_notices import NoticeFeeds
from ._redis_spread import BUDGET_MIN
from ._redis_staged import load_record, settle, staged_commit
from .base import Busy, CommitPart, Ended, Gone, Keep, Lease, Loaded, Notice

if TYPE_CHECKING:
    from .redis import RedisStore

__all__ = ["BUDGET_MIN", "RedisNamespace"]

#: Seconds an ended session's id is remembered, to answer "expired" not "unknown".
TOMBSTONE_TTL = 86_400
#: Key TTLs run this long past the engine's own deadlines (a backstop only).
BACKSTOP = 86_400.0
#: An open at capacity asks again when too few of its candidates to evict are left
#: (other processes evicted them first); after this many tries it opens over capacity.
_EVICT_TRIES = 6
#: A capacity no store reaches: an open that kept losing its candidates to other
#: processes' opens goes over capacity by one rather than failing.
_NO_LIMIT = 2**62

#: Which scripts apply the caller's own write: an outcome that stays unknown after a
#: lost connection is said for these (StoreUnavailable.outcome_unknown). The others
#: only read, lease, touch or claim: whatever they did, the caller's action had not
#: started.
_APPLIES = frozenset({"CREATE", "COMMIT", "JOINT", "DECIDE", "CLOSE", "GLOBAL_CAS", "GLOBAL_ADD"})
#: Scripts that may remove entries whose callbacks the caller must run.
_CLAIMING = frozenset({"CREATE", "EVICT", "LOAD", "PEEK", "CLOSE", "REAP"})
#: Where the request key and a session's id sit in an app script's KEYS and ARGV.
_REQUEST = 1
_SID = 1

_T = TypeVar("_T")
_P = ParamSpec("_P")


_Operation = Callable[Concatenate["RedisNamespace", _P], "Plan[_T] | Ops[_T]"]


def _blocking(
    operation: _Operation[_P, _T],
) -> Callable[Concatenate[RedisNamespace, _P], _T]:
    """The operation, run on the blocking client (see :meth:`RedisNamespace._drive`)."""

    @functools.wraps(operation)
    def run(self: RedisNamespace, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return self._drive(operation(self, *args, **kwargs))

    return run


def _awaiting(
    operation: _Operation[_P, _T],
) -> Callable[Concatenate[RedisNamespace, _P], Coroutine[Any, Any, _T]]:
    """The operation, awaited (see :meth:`RedisNamespace._adrive`): once it sent a
    call, it finishes even if its task is cancelled meanwhile (see ``_finish``)."""

    @functools.wraps(operation)
    async def run(self: RedisNamespace, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await finishing(self._adrive(operation(self, *args, **kwargs)))

    return run


def _hmget(key: str, fields: tuple[str, ...], client: Any) -> Any:
    return client.hmget(key, *fields)


class RedisNamespace:
    """One application's state in a :class:`RedisStore`. Thread-safe."""

    __slots__ = (
        "P",
        "__weakref__",
        "_candidates",
        "_claims",
        "_feeds",
        "_layout",
        "_request_ms",
        "_store",
        "channel",
        "origin",
    )

    finishes_sent_calls = IN_THE_TASK  #: awaited calls finish what they sent (``_finish``)

    def __init__(self, store: RedisStore, app: str) -> None:
        self._store = store
        self._layout = Layout(store.prefix, app, store.buckets)
        # The first bucket's (with one bucket, the app's) key prefix and channel.
        self.P = self._layout.first.P
        self.channel = self._layout.first.channel
        # The last candidates to evict the server named: at capacity, the next open
        # declares those still unused at once (one script call, not two).
        self._candidates: list[Any] = []
        self._claims = LostClaims(store)
        self._feeds = NoticeFeeds(store, app, self._layout, lambda: self.origin)
        self._draw_origin()
        _fork.after_fork_in_child(self)

    def _draw_origin(self) -> None:
        """Name this handle in the notices it publishes (anew in the child of a fork: a
        child is a handle of its own). The scripts stay the same: the origin is one of
        the settings every app script receives first (see ``_redis_scripts``)."""
        store = self._store
        self.origin = f"redis-{os.urandom(6).hex()}"
        self._request_ms = str(int(store.request_ttl * 1000))
        claim_ms = int(min(CLAIM_TTL, store.request_ttl) * 1000)
        publish = "SPUBLISH" if store.cluster else "PUBLISH"
        head = [self._request_ms, str(claim_ms), str(TOMBSTONE_TTL), self.origin, publish]
        for bucket in self._layout.buckets:
            bucket.settings = " ".join([*head, bucket.channel]).encode()

    def _after_fork(self) -> None:
        self._draw_origin()
        self._claims.forget()

    @property
    def layout(self) -> Layout:
        """Where this app's keys are (see ``_redis_layout``)."""
        return self._layout

    @property
    def store(self) -> RedisStore:
        return self._store

    # -- running scripts ---------------------------------------------------------

    @staticmethod
    def request(prefix: str) -> str:
        """A new request key under ``prefix`` (its bucket's, or its global's), drawn
        once per operation that writes."""
        return prefix + "q:" + os.urandom(8).hex()

    @staticmethod
    def pairs(bucket: Bucket, sids: list[Any]) -> list[Any]:
        """The hash and tombstone keys of each session of ``bucket``, as a script
        declares them."""
        prefix = bucket.P.encode()
        keys: list[Any] = []
        for sid in sids:
            raw = sid if isinstance(sid, bytes) else sid.encode()
            keys += [prefix + b"s:" + raw, prefix + b"gone:" + raw]
        return keys

    def claiming_keys(self, bucket: Bucket) -> list[Any]:
        """The first keys of a script about ``bucket`` that may claim sessions."""
        return [bucket.dl, self.request(bucket.P), bucket.lru, bucket.closed]

    def _session(self, sid: str, *, claims: bool = True) -> tuple[list[Any], bytes]:
        """The keys of an app script about one session (see Layout in the scripts),
        without the capacity orders for one that claims nothing (COMMIT); and its
        bucket's settings, the script's first argument."""
        bucket = self._layout.of(sid)
        P = bucket.P
        keys = self.claiming_keys(bucket) if claims else [bucket.dl, self.request(P)]
        return [*keys, P + "s:" + sid, P + "gone:" + sid], bucket.settings

    def _run(self, name: str, keys: list[Any], args: list[Any]) -> Any:
        reply = self._store.run(
            name, keys, args, applies=name in _APPLIES, lost=self._keeper(name, keys, args)
        )
        return self._checked(reply)

    async def _arun(self, client: Any, name: str, keys: list[Any], args: list[Any]) -> Any:
        """:meth:`_run` on ``client``, an asyncio client."""
        lost = self._keeper(name, keys, args)
        reply = await self._store.arun(client, name, keys, args, name in _APPLIES, lost)
        return self._checked(reply)

    def _drive(self, operation: Plan[_T] | Ops[_T]) -> _T:
        """Run an operation on the blocking client. An exception a call raises is
        thrown into the operation's calls, which may handle it."""
        if isinstance(operation, Plan):
            return operation.answer(self._run(operation.script, operation.keys, operation.args))
        try:
            call = operation.send(None)
            while True:
                try:
                    answer = self._call(call)
                except BaseException as exc:
                    call = operation.throw(exc)
                else:
                    call = operation.send(answer)
        except StopIteration as stop:
            result: _T = stop.value
            return result

    def _call(self, call: Call) -> Any:
        if isinstance(call, Plan):
            return call.answer(self._run(call.script, call.keys, call.args))
        if isinstance(call, Read):
            if call.plain is not None:
                return self._store.read_command(call.plain, damaged=call.damaged)
            command, client = call.command, self._store.client
            return self._store.read(lambda: command(client), damaged=call.damaged)
        time.sleep(call.seconds)
        return None

    async def _adrive(self, operation: Plan[_T] | Ops[_T]) -> _T:
        """:meth:`_drive` on the store's asyncio client, or, without one, the blocking
        client in a worker thread."""
        client = self._store.async_client
        if client is None or self._store.wait_replicas:
            sent()  # a thread is not stopped by a cancellation
            return await finish(asyncio.to_thread(self._drive, operation), stoppable=False)
        if self._store.cluster:
            # An asyncio cluster client that has not yet read the cluster's layout
            # sends a script to any node (redis-py 8 routes keyed commands only once
            # it knows a node), and tasks recovering from the MOVED replies together
            # disconnect connections others are opening. Reading it first, once
            # (a no-op after), routes every call by its keys from the start.
            await unsent(client.initialize())
        if isinstance(operation, Plan):
            reply = await self._arun(client, operation.script, operation.keys, operation.args)
            return operation.answer(reply)
        sent()  # several calls: in a task of its own from the start (see ``_finish``)
        return await finish(self._aops(client, operation))

    async def _aops(self, client: Any, operation: Ops[_T]) -> _T:
        try:
            call = operation.send(None)
            while True:
                try:
                    answer = await self._acall(client, call)
                except BaseException as exc:
                    call = operation.throw(exc)
                else:
                    call = operation.send(answer)
        except StopIteration as stop:
            result: _T = stop.value
            return result

    async def _acall(self, client: Any, call: Call) -> Any:
        if isinstance(call, Plan):
            return call.answer(await self._arun(client, call.script, call.keys, call.args))
        if isinstance(call, Read):
            return await self._store.aread(client, call)
        await asyncio.sleep(call.seconds)
        return None

    def _checked(self, reply: Any) -> Any:
        """The reply, unless it says an index of the app is damaged (checked before
        the script wrote anything)."""
        if type(reply) is list and reply and reply[0] == b"damaged":
            raise DamagedKey(str(self._store), replies.text(reply[1]))
        return reply

    def _keeper(self, name: str, keys: list[Any], args: list[Any]) -> Callable[[], None] | None:
        """For a request that may claim entries (remove sessions or values): what keeps
        it when its answer is lost, so that the next reap reads its reply back and their
        callbacks still run, once."""
        return functools.partial(self._keep, name, keys, args) if name in _CLAIMING else None

    def _keep(self, name: str, keys: list[Any], args: list[Any]) -> None:
        ttl = self._store.request_ttl
        self._claims.add(
            keys[_REQUEST],
            name,
            "" if name in ("REAP", "EVICT") else replies.text(args[_SID]),
            keep=ttl if name in _APPLIES else min(CLAIM_TTL, ttl),
        )

    def backstop_ms(self, now: float, deadline: float) -> int:
        """Milliseconds until the key's TTL: the deadline's distance plus the backstop
        (relative, so the server's clock and the engine's need not agree)."""
        return max(1, int((deadline - now + BACKSTOP) * 1000))

    # -- sessions ---------------------------------------------------------------

    def _create(
        self, sid: str, *, now: float, deadline: float, capacity: int
    ) -> Ops[tuple[Ended, ...]]:
        # At capacity the script names candidates to evict (the oldest sessions, a few
        # more than needed), writing nothing; it is run again with their keys declared,
        # under the same request key, and evicts those still there. Other processes
        # opening at once may take candidates first: a try that finds too few is made
        # again after a short random pause, and after a few the session is opened over
        # capacity (the next opens evict one more each) rather than failing a page load.
        # With several buckets, a script sees one: the session is stored first, then
        # the app is brought back to capacity across buckets (see _redis_spread).
        bucket = self._layout.of(sid)
        spread = len(self._layout.buckets) > 1
        first = self.claiming_keys(bucket)
        tail = [replies.num(now), replies.num(deadline)]
        backstop = self.backstop_ms(now, deadline)
        candidates = [] if spread else self._candidates
        for attempt in range(_EVICT_TRIES + 1):
            room = capacity if attempt < _EVICT_TRIES and not spread else _NO_LIMIT
            mode = "prefer" if attempt else "free"  # then: named by the script just now
            args = [bucket.settings, sid, *tail, room, backstop, mode, *candidates]
            keys = [*first, bucket.P + "s:" + sid, *self.pairs(bucket, candidates)]
            reply = yield Plan("CREATE", keys, args, raw)
            if replies.text(reply[0]) != "full":
                break
            candidates = reply[1]
            if attempt:  # a first refusal only names them; later ones lost a race
                yield Pause(random.uniform(0, 0.001 * 2**attempt))
        evicted, junk = replies.created(reply)
        if spread:
            if not spread_ops.may_be_full(reply[3], capacity, len(self._layout.buckets)):
                return ()
            return tuple(
                (yield from spread_ops.evict_over(self, now=now, capacity=capacity, sid=sid))
            )
        gone = {e.sid.encode() for e in evicted} | set(junk)
        # Kept for the next open while evictions go on; below capacity, nothing is.
        self._candidates = [c for c in candidates if c not in gone] if evicted else []
        if junk:
            replies.warn_junk(self._store, bucket.P + "lru", junk)
        return evicted

    create_session = _blocking(_create)
    acreate_session = _awaiting(_create)

    def _load(
        self, sid: str, *, now: float, touch_until: float | None, lease: Lease | None = None
    ) -> Plan[Loaded | Gone | Busy | None] | Ops[Loaded | Gone | Busy | None]:
        keys, settings = self._session(sid)
        args = [
            settings,
            sid,
            replies.num(now),
            "" if touch_until is None else replies.num(touch_until),
            "" if lease is None else lease.token,
            "" if lease is None else replies.num(lease.until),
            self.backstop_ms(now, now if touch_until is None else touch_until),
        ]
        plan = Plan("LOAD", keys, args, functools.partial(replies.loaded, sid))
        if self._store.cluster and sid.startswith(USER_PREFIX):
            return load_record(self, plan, leased=lease is not None)
        return plan

    load_session = _blocking(_load)
    aload_session = _awaiting(_load)

    def _peek(
        self, sid: str, name: str, *, now: float, touch_until: float | None
    ) -> Ops[Loaded | Gone | None]:
        # Most reads need no script: one HMGET, like a raw GET, shows the session live,
        # the value not due and no touch due (see touch() in the scripts). Any
        # other case (gone, expired, a value past its ttl, a touch due, a field that
        # does not parse) runs the PEEK script, which decides it atomically.
        if self._store.cluster and sid.startswith(USER_PREFIX):
            yield from settle(self, sid, abort=False)  # a decided commit, applied
        key = self._layout.of(sid).P + "s:" + sid
        fields = ("_v", "_c", "_d", "v:" + name, "t:" + name)
        version, closed, deadline, value, value_deadline = yield Read(
            functools.partial(_hmget, key, fields),
            damaged=lambda: SessionCorrupt(sid, "its Redis key holds another type of value"),
            plain=("HMGET", key, *fields),
        )
        try:
            fast = (
                # as the scripts check them: a version of at most 15 digits, finite times
                version is not None
                and len(version) <= 15
                and version.isdigit()
                and deadline is not None
                and now < float(deadline) < math.inf
                and (value_deadline is None or now < float(value_deadline) < math.inf)
                and (
                    replies.text(closed) == "1"
                    or touch_until is None
                    or touch_until - float(deadline) < min(1.0, (touch_until - now) / 10)
                )
            )
            loaded = Loaded(
                sid=sid,
                version=int(version),
                closed=replies.text(closed) == "1",
                values={} if value is None else {name: value},
            )
        except (TypeError, ValueError):  # a damaged field: the script says which
            fast = False
        if fast:
            return loaded
        keys, settings = self._session(sid)
        args = [
            settings,
            sid,
            replies.num(now),
            "" if touch_until is None else replies.num(touch_until),
            name,
            self.backstop_ms(now, now if touch_until is None else touch_until),
        ]
        answer = functools.partial(replies.loaded, sid)
        outcome: Loaded | Gone | Busy | None = yield Plan("PEEK", keys, args, answer)
        assert not isinstance(outcome, Busy)
        return outcome

    peek = _blocking(_peek)
    apeek = _awaiting(_peek)

    def _commit(
        self,
        sid: str,
        *,
        version: int,
        writes: Mapping[str, Any],
        ttl_deadlines: Mapping[str, float],
        now: float,
        lease: str | None = None,
        release: bool = True,
        keep: Keep | None = None,
    ) -> Plan[int]:
        keys, settings = self._session(sid, claims=False)
        mode = "1" if release else "0"
        if keep is not None:
            if lease is None:
                raise ValueError("a commit keeps its lease (keep=) only with a lease")
            mode = " ".join(
                (
                    "k",
                    replies.num(keep.until),
                    replies.num(keep.touch_until),
                    replies.num(now),
                    str(self.backstop_ms(now, keep.touch_until)),
                )
            )
            keys.insert(2, self._layout.of(sid).lru)
        args: list[Any] = [settings, sid, str(version), lease or "", mode]
        for name, value in writes.items():
            deadline = ttl_deadlines.get(name)
            args += [name, value, "" if deadline is None else replies.num(deadline)]
        return Plan(
            "COMMIT",
            keys,
            args,
            functools.partial(replies.committed, sid, version, now),
        )

    commit = _blocking(_commit)
    acommit = _awaiting(_commit)

    def _commit_joint(
        self, parts: Iterable[CommitPart], *, now: float
    ) -> Plan[tuple[int, ...]] | Ops[tuple[int, ...]]:
        if self._store.cluster:  # the parts' keys on two slots: in three steps
            return staged_commit(self, tuple(parts), now)
        return joint_plan(self._layout, self.request, self._store, tuple(parts), now)

    commit_joint = _blocking(_commit_joint)
    acommit_joint = _awaiting(_commit_joint)

    def _release(self, sid: str, *, lease: str) -> Plan[None]:
        return Plan("RELEASE", [self._layout.of(sid).P + "s:" + sid], [lease], lambda reply: None)

    release = _blocking(_release)
    arelease = _awaiting(_release)

    def _renew(self, sid: str, *, lease: str, until: float) -> Plan[bool]:
        return Plan(
            "RENEW", [self._layout.of(sid).P + "s:" + sid], [lease, replies.num(until)], bool
        )

    renew = _blocking(_renew)
    arenew = _awaiting(_renew)

    def _close(self, sid: str, *, now: float, deadline: float) -> Plan[bool | Gone | None]:
        keys, settings = self._session(sid)
        args = [
            settings,
            sid,
            replies.num(now),
            replies.num(deadline),
            self.backstop_ms(now, deadline),
        ]
        return Plan("CLOSE", keys, args, functools.partial(replies.closed, sid))

    close_session = _blocking(_close)
    aclose_session = _awaiting(_close)

    def _count(self) -> Ops[int]:
        return spread_ops.count(self)

    session_count = _blocking(_count)
    asession_count = _awaiting(_count)

    # -- lifetimes ---------------------------------------------------------------

    def _reap(self, *, now: float, limit: int) -> Ops[tuple[Ended, ...]]:
        if self._claims:
            made_good = yield from self._claims.resolve()
            if made_good:  # hand these over first: a failing reap must not lose them
                return tuple(made_good)
        return tuple((yield from spread_ops.reap(self, now=now, limit=limit)))

    reap = _blocking(_reap)
    areap = _awaiting(_reap)

    # -- globals -----------------------------------------------------------------

    def _global_key(self, name: str) -> str:
        return self._layout.global_prefix(name) + "g:" + name

    def _damaged_global(self, name: str, why: str) -> CodecError:
        return CodecError(
            f"global state {name!r} is damaged in {self._store}: its key "
            f"{self._global_key(name)!r} {why}; delete that key to start it again from its "
            "default",
            state=name,
        )

    def _global_get(self, name: str) -> Ops[tuple[Any, int] | None]:
        key = self._global_key(name)
        value, version = yield Read(
            functools.partial(_hmget, key, ("v", "n")),
            damaged=lambda: self._damaged_global(name, "holds another type of value"),
            plain=("HMGET", key, "v", "n"),
        )
        if value is None and version is None:
            return None
        try:
            if value is None or version is None or len(version) > 15:
                raise ValueError
            return value, int(version)
        except (TypeError, ValueError):
            raise self._damaged_global(
                name,
                "is not a hash statekit wrote (a field is missing or its version is not a number)",
            ) from None

    global_get = _blocking(_global_get)
    aglobal_get = _awaiting(_global_get)

    def _global_head(self, name: str) -> str:
        """The first argument of a global's scripts (see ``_redis_global_scripts``)."""
        return f"{self._request_ms} {self.origin} {name} {self._feeds.globals_channel}"

    def _global_cas(self, name: str, *, version: int | None, value: Any) -> Plan[int | None]:
        def answer(reply: Any) -> int | None:
            if isinstance(reply, list):  # {'wrongtype'}
                raise self._damaged_global(name, "holds another type of value")
            return None if reply is None else int(reply)

        return Plan(
            "GLOBAL_CAS",
            [self._global_key(name), self.request(self._layout.global_prefix(name))],
            [self._global_head(name), "" if version is None else str(version), value],
            answer,
        )

    global_cas = _blocking(_global_cas)
    aglobal_cas = _awaiting(_global_cas)

    def _global_add(self, name: str, amount: int | float, *, default: int | float) -> Ops[Any]:
        codec = self._store.codec
        if isinstance(codec, JSONCodec) and type(amount) is int and type(default) is int:
            try:
                args = [self._global_head(name), str(amount), str(default)]
            except ValueError:  # an int too long to write as text: the codec says so below
                args = None
            if args is not None:
                keys = [self._global_key(name), self.request(self._layout.global_prefix(name))]
                added = yield Plan("GLOBAL_ADD", keys, args, raw)
                if isinstance(added, list):  # the key is not a hash statekit wrote
                    yield from self._global_get(name)  # raises, saying what is wrong
                    raise self._damaged_global(name, "is damaged")
                if added is not None:
                    return int(added)
        # Floats, huge integers, other codecs: read, add, compare-and-set.
        while True:
            found = yield from self._global_get(name)
            current = default if found is None else codec.decode(found[0])
            total = current + amount
            value, version = encode_with(codec, total), None if found is None else found[1]
            swapped = yield self._global_cas(name, version=version, value=value)
            if swapped is not None:
                return total

    global_add = _blocking(_global_add)
    aglobal_add = _awaiting(_global_add)

    # -- notices -----------------------------------------------------------------

    @property
    def ignored_notices(self) -> int:
        """How many messages on this app's notice channel were not statekit notices
        (ignored, each counted; the first and every thousandth are logged)."""
        return self._feeds.receiver.ignored

    def subscribe(self, callback: Callable[[Notice], None]) -> Callable[[], None]:
        return self._feeds.notices.subscribe(callback)

    def subscribe_wanted(self, callback: Callable[[Notice], None]) -> Callable[[], None]:
        """Receive the ``"wanted"`` notices of other handles' loads that found a lease
        this handle keeps (``commit(keep=...)``), and ``"resync"`` after a lost
        connection; not the app's other notices. Returns the unsubscribe."""
        return self._feeds.wanted.subscribe(callback)

    def subscribe_globals(self, callback: Callable[[Notice], None]) -> Callable[[], None]:
        """Receive the ``"global"`` notices of other handles' global writes (and
        ``"resync"`` after a lost connection). Returns the unsubscribe."""
        return self._feeds.globals.subscribe(callback)

    def shutdown(self) -> tuple[Ended, ...]:
        """Stop receiving notices; hand over what requests whose reply was lost
        removed, if it can still be read back (its callbacks are due here)."""
        self._feeds.stop()
        return self._drive(self._made_good())

    async def ashutdown(self) -> tuple[Ended, ...]:
        """:meth:`shutdown`, the notice thread stopped in a worker thread (it waits for
        the thread) and the replies read back on the asyncio client."""
        await asyncio.to_thread(self._feeds.stop)
        return await finishing(self._adrive(self._made_good()))

    def _made_good(self) -> Ops[tuple[Ended, ...]]:
        if not self._claims:
            return ()
        try:
            return tuple((yield from self._claims.resolve()))
        except StoreUnavailable:  # pragma: no cover - resolve keeps what it cannot read
            return ()
