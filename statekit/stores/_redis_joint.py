"""A joint commit in the Redis store: a session's writes and its user's, all-or-nothing,
in one script (``JOINT``).

Redis does not undo a script that fails half-way, so the script checks every part
(the hash is a session statekit wrote, its version and lease still hold, its indexes
are sorted sets) before it writes any. It runs only where every key it declares lives
on one server: a single server or Sentinel. On a cluster, whose sessions and user
records sit on different slots, the commit is made in steps (``_redis_staged``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import _redis_replies as replies
from ._redis_calls import Plan
from ._redis_failures import DamagedKey
from ._redis_fragments import PUT_VALUES
from ._redis_layout import Layout
from ._redis_requests import ONCE
from .base import CommitPart

if TYPE_CHECKING:
    from .redis import RedisStore

__all__ = ["JOINT", "joint_committed", "joint_plan"]

# KEYS: request, then for each part its deadline index, hash and tombstone.
# ARGV: the first part's bucket settings (see ``_redis_scripts``), then for each part:
#       sid, version, lease|'', release '1'|'0', its bucket's notice channel, the
#       number of writes, then name, value, deadline|'' for each write.
# Returns {'ok', version, ...} (each part's new version, in order), or the first
# refusal as COMMIT answers it, with the part's index first: {index, 'conflict', found},
# {index, 'none'}, {index, 'gone', why}, {index, 'corrupt', field}, {index, 'wrongtype'}
# or {index, 'damaged', key}; nothing is written then.
JOINT = (
    r"""
local REQ = KEYS[1]
local REQUEST_MS, _, _, ORIGIN, PUBLISH =
  string.match(ARGV[1], '^(%d+) (%d+) (%d+) (%S+) (%S+) (.+)$')
"""
    + ONCE
    + PUT_VALUES
    + r"""
local parts = {}
local at = 2
local key_at = 2
while at <= #ARGV do
  local part = {
    dl = KEYS[key_at], key = KEYS[key_at + 1], gone = KEYS[key_at + 2],
    sid = ARGV[at], version = ARGV[at + 1], lease = ARGV[at + 2],
    release = ARGV[at + 3], channel = ARGV[at + 4], first = at + 6,
    last = at + 5 + 3 * tonumber(ARGV[at + 5]),
  }
  parts[#parts + 1] = part
  at = part.last + 1
  key_at = key_at + 3
end
-- Every part checked before any is written.
for i, part in ipairs(parts) do
  local kind = redis.call('TYPE', part.dl).ok
  if kind ~= 'zset' and kind ~= 'none' then return {i, 'damaged', part.dl} end
  local meta = redis.pcall('HMGET', part.key, '_v', '_l')
  if meta.err then return {i, 'wrongtype'} end
  if not meta[1] then
    local gone = redis.call('TYPE', part.gone).ok
    if gone == 'none' then return {i, 'none'} end
    if gone ~= 'string' then return {i, 'badgone'} end
    return {i, 'gone', redis.call('GET', part.gone)}
  end
  if #meta[1] > 15 or not string.find(meta[1], '^%d+$') then return {i, 'corrupt', '_v'} end
  if meta[1] ~= part.version or (part.lease ~= '' and meta[2] ~= part.lease) then
    return {i, 'conflict', meta[1]}
  end
end
local reply = {'ok'}
for _, part in ipairs(parts) do
  -- A part with no writes only gives its lease back: its version stays.
  local version = part.version
  local names = {}
  if part.last >= part.first then
    version = string.format('%d', tonumber(part.version) + 1)
    names = put_values(part.key, part.dl, part.sid, ARGV, part.first, part.last,
      {'_v', version})
  end
  if part.lease ~= '' and part.release == '1' then
    redis.call('HDEL', part.key, '_l', '_lu', '_lk')
  end
  if #names > 0 then
    redis.call(PUBLISH, part.channel, cjson.encode({k = 'changed', s = part.sid, o = ORIGIN,
      n = names}))
  end
  reply[#reply + 1] = version
end
return remember(reply)
"""
)


def joint_plan(
    layout: Layout,
    request: Callable[[str], str],
    store: RedisStore,
    parts: tuple[CommitPart, ...],
    now: float,
) -> Plan[tuple[int, ...]]:
    """The JOINT script's call for ``parts`` (on one server: a cluster commits in
    steps, ``_redis_staged``); ``request(prefix)`` draws a request key."""
    first = layout.of(parts[0].sid)
    keys: list[Any] = [request(first.P)]
    args: list[Any] = [first.settings]
    for part in parts:
        bucket = layout.of(part.sid)
        keys += [bucket.dl, bucket.P + "s:" + part.sid, bucket.P + "gone:" + part.sid]
        args += [
            part.sid,
            str(part.version),
            part.lease or "",
            "1" if part.release else "0",
            bucket.channel,
            str(len(part.writes)),
        ]
        for name, value in part.writes.items():
            deadline = part.ttl_deadlines.get(name)
            args += [name, value, "" if deadline is None else replies.num(deadline)]

    def answer(reply: list[Any]) -> tuple[int, ...]:
        if len(reply) > 2 and reply[1] == b"damaged":
            raise DamagedKey(str(store), replies.text(reply[2]))
        return joint_committed(parts, now, reply)

    return Plan("JOINT", keys, args, answer)


def joint_committed(parts: Sequence[CommitPart], now: float, reply: list[Any]) -> tuple[int, ...]:
    """Each part's new version, or the first refusal raised as a commit's would be."""
    if replies.text(reply[0]) == "ok":
        return tuple(int(version) for version in reply[1:])
    part = parts[int(reply[0]) - 1]
    replies.committed(part.sid, part.version, now, reply[1:])  # raises
    raise AssertionError("a refused joint commit raises")  # pragma: no cover
