"""The operations of a Redis namespace that look at every bucket of an app: counting
sessions, reaping, and evicting at capacity when sessions are spread over several
buckets (see ``_redis_layout``).

Each is written as calls (``_redis_calls``): plain reads of every bucket in one
pipeline (on a cluster, redis-py sends one batch per master), then one script per
bucket that has work, each touching that bucket's slot only.

**Capacity over several buckets.** A script sees one bucket, so the count of an
app's sessions is the sum of every bucket's capacity orders, read after the new
session is stored; when it passes capacity, the oldest sessions of all buckets
(closed ones first, then the least recently used) are read and each is evicted by an
``EVICT`` script in its own bucket, which checks again that it is still there: so a
session is evicted once only, whoever races for it. Reading and evicting are separate
steps, so opens racing at capacity may each count the others' sessions and leave the
app over capacity by at most the number of opens in flight at once; each later open
evicts down to capacity again.

Reading every bucket costs a batch of two reads per bucket, which redis-py takes
milliseconds to make: an open counts only when its own bucket (whose size the
``CREATE`` script returns) holds more than 3/4 of its share of capacity. Session ids
are random, so buckets fill evenly: an app far below capacity never pays for the
count, and one at capacity has most of its buckets above 3/4 of their share, so
nearly every open counts and evicts (with a small capacity, every open counts).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from . import _redis_replies as replies
from ._redis_calls import Ops, Plan, Read, raw
from ._redis_failures import DamagedKey, read_failure
from .base import Ended

if TYPE_CHECKING:
    from ._redis_layout import Bucket
    from ._redis_namespace import RedisNamespace

__all__ = ["BUDGET_MIN", "BUDGET_PER_ENTRY", "count", "evict_over", "may_be_full", "reap"]

#: How many index members one reap script looks at, at most per entry asked for (and
#: at least BUDGET_MIN): a pile of junk is cleared over several short calls, never in
#: one long script that would hold up every other client of the server.
BUDGET_PER_ENTRY = 4
BUDGET_MIN = 2048
#: Rounds of counting and evicting an open makes when other opens took its victims.
_EVICT_ROUNDS = 3
#: Candidates an eviction looks at beyond those it needs, to pass over held ones.
_WINDOW = 32


def _batch(calls: list[tuple[str, tuple[Any, ...]]], client: Any) -> Any:
    """Commands in one round trip (one per master on a cluster); an error in place of
    the reply of one whose key holds another type of value."""
    pipe = client.pipeline(transaction=False)
    for name, args in calls:
        getattr(pipe, name)(*args)
    return pipe.execute(raise_on_error=False)


def _read(ns: RedisNamespace, keys: list[bytes], calls: list[tuple[str, tuple[Any, ...]]]) -> Read:
    """A batch of reads of ``keys``, one call each; a damaged key is named by the
    generator that checks the replies (:func:`_checked`)."""
    store = str(ns.store)
    return Read(
        functools.partial(_batch, calls),
        damaged=functools.partial(DamagedKey, store, replies.text(keys[0]) if keys else ""),
    )


def _checked(ns: RedisNamespace, keys: list[bytes], found: list[Any]) -> list[Any]:
    """The replies of a batch, unless one is an error (a key of another type)."""
    for key, reply in zip(keys, found, strict=True):
        if isinstance(reply, Exception):
            damaged = functools.partial(DamagedKey, str(ns.store), replies.text(key))
            raise read_failure(str(ns.store), reply, damaged) from reply
    return found


def count(ns: RedisNamespace) -> Ops[int]:
    """The sessions of the app, open and closed, in every bucket."""
    keys = [key for bucket in ns.layout.buckets for key in (bucket.lru, bucket.closed)]
    found = yield _read(ns, keys, [("zcard", (key,)) for key in keys])
    return int(sum(_checked(ns, keys, found)))


def reap(ns: RedisNamespace, *, now: float, limit: int) -> Ops[list[Ended]]:
    """Claim up to ``limit`` due entries, earliest first across buckets.

    Two steps: read the due members of every bucket's deadline index, then claim the
    earliest in a script per bucket that declares their keys and checks each again.
    Fewer than limit only when nothing more is due; no script looks at more than
    budget members, so a pile of junk takes several (each read asks for more once junk
    turns up)."""
    budget = max(BUDGET_MIN, limit * BUDGET_PER_ENTRY)
    buckets = ns.layout.buckets
    indexes = [bucket.dl for bucket in buckets]
    until = replies.num(now)
    out: list[Ended] = []
    junk: list[tuple[Bucket, list[Any]]] = []
    size = limit
    try:
        while len(out) < limit:
            want = min(budget, max(size, limit - len(out)))
            calls = [("zrangebyscore", (dl, "-inf", until, 0, want, True)) for dl in indexes]
            found = _checked(ns, indexes, (yield _read(ns, indexes, calls)))
            due = sorted(
                (score, k, i, member)
                for k, rows in enumerate(found)
                for i, (member, score) in enumerate(rows)
            )[:want]
            if not due:
                break
            for k in sorted({k for _, k, _, _ in due}):
                bucket = buckets[k]
                members = [member for _, b, _, member in due if b == k]
                sids = list(dict.fromkeys(s for m in members if (s := _sid_in(m)) is not None))
                keys = [*ns.claiming_keys(bucket), *ns.pairs(bucket, sids)]
                args = [bucket.settings, until, limit - len(out), len(sids), *sids, *members]
                ended, removed = yield Plan("REAP", keys, args, raw)
                out.extend(replies.reaped(item) for item in ended)
                if removed:
                    junk.append((bucket, removed))
                    size = min(budget, 2 * want)
                if len(out) >= limit:
                    break
        if len(buckets) > 1:
            out.sort(key=lambda ended: ended.at)
        return out
    finally:
        for bucket, removed in junk:
            replies.warn_junk(ns.store, bucket.P + "dl", removed)


def _sid_in(member: bytes) -> bytes | None:
    """The session id a deadline-index member names, read as the REAP script reads it
    (None for a member that names none)."""
    if member[:2] == b"s\0":
        return member[2:]
    cut = member.find(b"\0", 2)
    return member[2:cut] if member[:2] == b"v\0" and cut >= 0 else None


def may_be_full(size: int, capacity: int, buckets: int) -> bool:
    """Whether an open whose bucket now holds ``size`` sessions counts every bucket:
    when its bucket holds more than 3/4 of its share of ``capacity`` (see Capacity over
    several buckets above)."""
    return 4 * size * buckets > 3 * capacity


def evict_over(ns: RedisNamespace, *, now: float, capacity: int, sid: str) -> Ops[list[Ended]]:
    """After session ``sid`` was stored: evict the oldest sessions of every bucket
    (closed first, then least recently used; never ``sid``) until the app is back at
    ``capacity`` (see Capacity over several buckets above). Sessions a lease holds are
    passed over, and the next oldest of a window of ``need + 32`` taken instead; when
    the last round finds too few others, it takes held ones: kept leases, then events',
    each oldest first."""
    buckets = ns.layout.buckets
    evicted: list[Ended] = []
    me = sid.encode()
    # Passed over: how firmly held (1 a kept lease, 2 an event's), open?, age, bucket.
    held: dict[bytes, tuple[int, int, float, int]] = {}
    for round_ in range(_EVICT_ROUNDS):
        need = (yield from count(ns)) - capacity
        if need <= 0:
            break
        keys = [key for bucket in buckets for key in (bucket.closed, bucket.lru)]
        reach = need + _WINDOW + len(held)
        calls = [("zrange", (key, 0, reach, False, True)) for key in keys]
        found = _checked(ns, keys, (yield _read(ns, keys, calls)))
        # Closed sessions first (by close time), then open ones (by last use).
        oldest = sorted(
            (j % 2, score, j // 2, member)
            for j, rows in enumerate(found)
            for member, score in rows
            if member != me and member not in held
        )[:reach]
        where = {member: (is_open, score, k) for is_open, score, k, member in oldest}
        took, passed = yield from _evict_runs(ns, oldest, now, "free", need, evicted)
        held.update((member, (level, *where[member])) for level, member in passed)
        # The last round, or none but held ones left: those, for what is still needed.
        if took < need and held and (not oldest or round_ == _EVICT_ROUNDS - 1):
            ranked = [entry[1:] for entry in sorted((*rank, m) for m, rank in held.items())]
            took += (yield from _evict_runs(ns, ranked, now, "any", need - took, evicted))[0]
        if took >= need or not oldest:
            break
    return evicted


def _by_bucket(ranked: list[tuple[int, float, int, bytes]]) -> list[tuple[int, list[bytes]]]:
    """Members ranked oldest first (``(open?, score, bucket, member)``), in runs of one
    bucket each, in that order: each run's script takes the oldest first, and a later
    run is asked only for what the earlier ones did not take."""
    runs: list[tuple[int, list[bytes]]] = []
    for _, _, k, member in ranked:
        if runs and runs[-1][0] == k:
            runs[-1][1].append(member)
        else:
            runs.append((k, [member]))
    return runs


def _evict_runs(
    ns: RedisNamespace,
    ranked: list[tuple[int, float, int, bytes]],
    now: float,
    mode: str,
    need: int,
    evicted: list[Ended],
) -> Ops[tuple[int, list[tuple[int, bytes]]]]:
    """Evict from ``ranked`` (oldest first), run by run of one bucket, until ``need``
    entries are taken (``mode`` as ``EVICT``'s), adding what went to ``evicted``: how
    many entries were taken, and the members passed over, with how firmly a lease
    holds each (1 a kept lease, 2 an event's)."""
    buckets = ns.layout.buckets
    took = 0
    passed: list[tuple[int, bytes]] = []
    for k, victims in _by_bucket(ranked):
        if took >= need:
            break
        bucket = buckets[k]
        keys = [*ns.claiming_keys(bucket), *ns.pairs(bucket, victims)]
        args = [bucket.settings, replies.num(now), mode, need - took, *victims]
        reply = yield Plan("EVICT", keys, args, raw)
        passed += [(level, member) for level in (1, 2) for member in reply[2 + level]]
        gone, junk = replies.created(reply)
        evicted.extend(gone)
        took += len(gone) + len(junk)
        if junk:
            replies.warn_junk(ns.store, bucket.P + "lru", junk)
    return took, passed
