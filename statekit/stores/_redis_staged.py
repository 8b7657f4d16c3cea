"""A joint commit on a Redis Cluster: an event's session and its user's record sit on
different slots, which no script reaches together, so the commit is made in three
steps around one atomic decision.

1. ``STAGE``, on the record's slot: the record's version and lease are checked, and
   the user's writes are kept in the record, not yet its values (``_tx`` names the
   commit, ``_txm`` its decision key, ``_txw`` the writes).
2. ``DECIDE``, on the session's slot: the session's version and lease are checked; the
   decision key ``tx:<id>``, in the session's bucket, is set to ``c`` if it does not
   exist; then the session's writes are made. This is the commit: both parts hold
   from here on, or (the key existed: ``a``) neither.
3. ``APPLY``, on the record's slot: the staged writes become the record's values, its
   version moves on, a ``changed`` notice is published.

A process that dies between two steps leaves the record staged. Whoever touches it
next settles it first (``settle``): a load that leases the record (its stager's lease
lapsed) decides an undecided commit as aborted (``RESOLVE`` sets ``a`` if there is no
decision yet: the stager's ``DECIDE``, should it come, is refused) and discards the
staged writes; a decided one is applied. A look without a lease only applies a decided
commit, and otherwise reads the record's values as they were: an undecided commit has
not happened. While a commit is staged, no other writes reach the record (they need its
lease, whose loads settle it first), so applying staged writes later is exact.

A decision key lives as long as the record could (its deadline, plus the backstop):
past it the record is gone, with whatever was staged in it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import TYPE_CHECKING, Any

from statekit.exceptions import SessionCorrupt, StoreUnavailable

from . import _redis_replies as replies
from ._redis_calls import Ops, Plan, Read, raw
from ._redis_fragments import APP, INDEXES, PUT_VALUES, SESSION
from ._redis_requests import ONCE
from .base import Busy, CommitPart, Gone, Loaded

if TYPE_CHECKING:
    from ._redis_namespace import RedisNamespace

__all__ = [
    "APPLY",
    "DECIDE",
    "DISCARD",
    "RESOLVE",
    "STAGE",
    "load_record",
    "settle",
    "staged_commit",
]

logger = logging.getLogger("statekit")

#: How long an abort stays decided (ms): far longer than any stager could still try.
ABORT_MS = 7 * 86_400_000

# KEYS: the record's hash, its tombstone.
# ARGV: version, lease|'', commit id, decision key, then name, value, deadline|'' for
#       each write.
# Returns {'ok', deadline} (the record's), or as COMMIT refuses: {'conflict', found},
# {'none'}, {'gone', why}, {'corrupt', field}, {'wrongtype'}.
STAGE = r"""
local meta = redis.pcall('HMGET', KEYS[1], '_v', '_l', '_tx', '_d')
if meta.err then return {'wrongtype'} end
if not meta[1] then
  local kind = redis.call('TYPE', KEYS[2]).ok
  if kind == 'none' then return {'none'} end
  if kind ~= 'string' then return {'badgone'} end
  return {'gone', redis.call('GET', KEYS[2])}
end
if #meta[1] > 15 or not string.find(meta[1], '^%d+$') then return {'corrupt', '_v'} end
if meta[1] ~= ARGV[1] or (ARGV[2] ~= '' and meta[2] ~= ARGV[2])
    or (meta[3] and meta[3] ~= ARGV[3]) then
  return {'conflict', meta[1]}
end
local writes = {}
for i = 5, #ARGV do writes[#writes + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], '_tx', ARGV[3], '_txm', ARGV[4], '_txw', cmsgpack.pack(writes))
return {'ok', meta[4]}
"""

# KEYS: dl, request, decision key, session, tombstone (as COMMIT's, the key third).
# ARGV: (1), sid, version, lease|'', release '1'|'0', the decision's lifetime (ms),
#       then name, value, deadline|'' for each write.
# Returns as COMMIT does; {'conflict', found} too when the commit was aborted.
DECIDE = (
    APP
    + ONCE
    + INDEXES
    + SESSION
    + PUT_VALUES
    + r"""
local meta = redis.pcall('HMGET', KEY, '_v', '_l')
if meta.err then return {'wrongtype'} end
if not meta[1] then return missing(GONE) end
if not is_version(meta[1]) then return {'corrupt', '_v'} end
if meta[1] ~= ARGV[3] or (ARGV[4] ~= '' and meta[2] ~= ARGV[4]) then
  return {'conflict', meta[1]}
end
-- The decision: the user's part staged for this commit holds from now on, unless a
-- process that took the user's record (its stager had lost it) aborted it first.
if not redis.call('SET', KEYS[3], 'c', 'NX', 'PX', ARGV[6]) then
  return {'conflict', meta[1]}
end
local version = string.format('%d', tonumber(meta[1]) + 1)
local names = put_values(KEY, DL, SID, ARGV, 7, #ARGV, {'_v', version})
if ARGV[4] ~= '' and ARGV[5] == '1' then
  redis.call('HDEL', KEY, '_l', '_lu', '_lk')
end
notice('changed', SID, nil, names)
return remember({'ok', version})
"""
)

# KEYS: the record's hash, its bucket's deadline index.
# ARGV: commit id, record id, lease|'' (given back if it still holds), origin, publish
#       command, notice channel.
# Returns {'ok', version}, or {'done', version} when the commit was applied (by a look
# that settled it) or discarded already; the lease is given back either way.
APPLY = (
    PUT_VALUES
    + r"""
local h = redis.pcall('HMGET', KEYS[1], '_tx', '_txw', '_v', '_l')
if h.err then return {'wrongtype'} end
if ARGV[3] ~= '' and h[4] == ARGV[3] then
  redis.call('HDEL', KEYS[1], '_l', '_lu', '_lk')
end
if h[1] ~= ARGV[1] then return {'done', h[3]} end
local kind = redis.call('TYPE', KEYS[2]).ok
if kind ~= 'zset' and kind ~= 'none' then return {'damaged', KEYS[2]} end
local version = string.format('%d', tonumber(h[3]) + 1)
local writes = cmsgpack.unpack(h[2])
local names = put_values(KEYS[1], KEYS[2], ARGV[2], writes, 1, #writes, {'_v', version})
redis.call('HDEL', KEYS[1], '_tx', '_txm', '_txw')
if #names > 0 then
  redis.call(ARGV[5], ARGV[6], cjson.encode({k = 'changed', s = ARGV[2], o = ARGV[4],
    n = names}))
end
return {'ok', version}
"""
)

# KEYS: the record's hash.  ARGV: commit id.  Drops the commit's staged writes.
DISCARD = r"""
local staged = redis.pcall('HGET', KEYS[1], '_tx')
if staged == ARGV[1] then redis.call('HDEL', KEYS[1], '_tx', '_txm', '_txw') end
return 1
"""

# KEYS: the decision key.  ARGV: '1' to decide an undecided commit as aborted (the
# caller leased the record: its stager lost it), '0' only to read; the abort's
# lifetime (ms).  Returns 'c', 'a', or '' (undecided).
RESOLVE = r"""
local decided = redis.call('GET', KEYS[1])
if decided then return decided end
if ARGV[1] == '1' then
  redis.call('SET', KEYS[1], 'a', 'PX', ARGV[2])
  return 'a'
end
return ''
"""


def staged_commit(
    ns: RedisNamespace, parts: tuple[CommitPart, ...], now: float
) -> Ops[tuple[int, ...]]:
    """A session's commit and its user's, on a cluster: stage, decide, apply."""
    own, user = parts
    layout = ns.layout
    session, record = layout.of(own.sid), layout.of(user.sid)
    tx = os.urandom(8).hex()
    marker = session.P + "tx:" + tx
    args: list[Any] = [str(user.version), user.lease or "", tx, marker]
    for name, value in user.writes.items():
        deadline = user.ttl_deadlines.get(name)
        args += [name, value, "" if deadline is None else replies.num(deadline)]
    record_key = record.P + "s:" + user.sid
    until = yield Plan(
        "STAGE",
        [record_key, record.P + "gone:" + user.sid],
        args,
        functools.partial(_staged, user.sid, user.version, now),
    )
    decide: list[Any] = [
        session.settings,
        own.sid,
        str(own.version),
        own.lease or "",
        "1" if own.release else "0",
        str(ns.backstop_ms(now, until)),
    ]
    for name, value in own.writes.items():
        deadline = own.ttl_deadlines.get(name)
        decide += [name, value, "" if deadline is None else replies.num(deadline)]
    try:
        version = yield Plan(
            "DECIDE",
            [
                session.dl,
                ns.request(session.P),
                marker,
                session.P + "s:" + own.sid,
                session.P + "gone:" + own.sid,
            ],
            decide,
            functools.partial(replies.committed, own.sid, own.version, now),
        )
    except Exception:
        # Refused, or its outcome unknown (a lost connection): decided now, as aborted
        # unless it was decided already, so that no late DECIDE can land.
        try:
            decided = yield Plan("RESOLVE", [marker], ["1", str(ABORT_MS)], replies.text)
        except Exception:  # the record's next load settles it
            logger.warning("could not settle a refused commit's staged writes")
            raise
        if decided != "c":
            try:
                yield Plan("DISCARD", [record_key], [tx], lambda reply: None)
            except Exception:
                logger.warning("could not drop a refused commit's staged writes")
            raise
        version = own.version + 1  # it had landed: its answer was lost
    try:
        applied = yield _apply(ns, user.sid, tx, user.lease if user.release else None)
    except StoreUnavailable:  # decided: the record's next load or look applies it
        logger.warning("a committed user's writes are staged; the next load applies them")
        if user.release and user.lease:  # else the user's next event waits for it
            with contextlib.suppress(StoreUnavailable):
                yield Plan("RELEASE", [record_key], [user.lease], lambda reply: None)
        return version, user.version + 1
    yield from _forget(marker)
    return version, applied


def _staged(sid: str, version: int, now: float, reply: list[Any]) -> float:
    """The record's deadline from STAGE's answer, or its refusal raised."""
    if replies.text(reply[0]) == "ok":
        return float(reply[1])
    replies.committed(sid, version, now, reply)  # raises
    raise AssertionError("a refused stage raises")  # pragma: no cover


def _apply(ns: RedisNamespace, sid: str, tx: str, lease: str | None) -> Plan[int | None]:
    bucket = ns.layout.of(sid)
    publish = "SPUBLISH" if ns.store.cluster else "PUBLISH"
    return Plan(
        "APPLY",
        [bucket.P + "s:" + sid, bucket.dl],
        [tx, sid, lease or "", ns.origin, publish, bucket.channel],
        _applied,
    )


def _applied(reply: list[Any]) -> int | None:
    """The record's version after APPLY (None if it has none: it ended)."""
    if replies.text(reply[0]) == "wrongtype" or len(reply) < 2 or reply[1] is None:
        return None
    return int(reply[1])


def settle(ns: RedisNamespace, sid: str, *, abort: bool) -> Ops[bool]:
    """Settle a commit staged in user record ``sid``, if any (see the module's
    docstring): whether the record changed. ``abort``: the caller leased the record,
    so an undecided commit is decided as aborted."""
    key = ns.layout.of(sid).P + "s:" + sid
    tx, marker = yield Read(
        functools.partial(_staging, key),
        damaged=lambda: SessionCorrupt(sid, "its Redis key holds another type of value"),
        plain=("HMGET", key, "_tx", "_txm"),
    )
    if tx is None or marker is None:
        return False
    tx, marker = replies.text(tx), replies.text(marker)
    decided = yield Plan("RESOLVE", [marker], ["1" if abort else "0", str(ABORT_MS)], replies.text)
    if decided == "c":
        yield _apply(ns, sid, tx, None)
        yield from _forget(marker)
        return True
    if decided == "a":
        yield Plan("DISCARD", [key], [tx], lambda reply: None)
        return True
    return False  # undecided: the record's values are as before the commit


def load_record(
    ns: RedisNamespace, plan: Plan[Loaded | Gone | Busy | None], *, leased: bool
) -> Ops[Loaded | Gone | Busy | None]:
    """``plan``, the load of a user's record: a commit left staged in it is settled
    first (``leased``: the load leases it), then the record is loaded again."""
    sid = replies.text(plan.args[1])
    reply = yield Plan(plan.script, plan.keys, plan.args, raw)
    if type(reply) is not list or len(reply) <= 5:  # nothing staged
        return plan.answer(reply)
    first = plan.answer(reply)  # what it claimed stays claimed
    if not (yield from settle(ns, sid, abort=leased)):
        return first
    keys = list(plan.keys)
    keys[1] = ns.request(ns.layout.of(sid).P)  # the request key: a new request
    loaded = plan.answer((yield Plan(plan.script, keys, plan.args, raw)))
    if isinstance(first, Loaded) and isinstance(loaded, Loaded) and first.expired:
        loaded.expired = (*first.expired, *loaded.expired)
    return loaded


def _forget(marker: str) -> Ops[None]:
    """Delete a commit's decision once it is applied: nothing reads it any more (an
    abort is kept: a late decision must still find it). Best effort: a key left
    behind lapses with its lifetime."""
    try:
        yield Read(
            functools.partial(_delete, marker),
            damaged=lambda: StoreUnavailable(marker, "it holds another type of value"),
            plain=("DEL", marker),
        )
    except StoreUnavailable:
        logger.warning("could not delete an applied commit's decision key; it lapses")


def _delete(key: str, client: Any) -> Any:
    return client.delete(key)


def _staging(key: str, client: Any) -> Any:
    return client.hmget(key, "_tx", "_txm")
