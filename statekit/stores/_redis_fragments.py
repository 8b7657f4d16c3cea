"""Fragments of Lua the Redis store's scripts share (see ``_redis_scripts`` for the
layout of keys and arguments they assume)."""

from __future__ import annotations

__all__ = ["APP", "INDEXES", "INDEX_CHECK", "PUT_VALUES", "SESSION"]

# The start of the six scripts about an application's sessions (see Layout).
APP = r"""
local DL, REQ = KEYS[1], KEYS[2]
local INDEXES = {DL}
local REQUEST_MS, CLAIM_MS, TOMBSTONE, ORIGIN, PUBLISH, CHANNEL =
  string.match(ARGV[1], '^(%d+) (%d+) (%d+) (%S+) (%S+) (.+)$')

local function notice(kind, sid, reason, names)
  local msg = {k = kind, s = sid, o = ORIGIN}
  if reason then msg.r = reason end
  if names then msg.n = names end
  redis.call(PUBLISH, CHANNEL, cjson.encode(msg))
end

-- Ask the engine keeping a session's lease between events (see COMMIT) to give it up,
-- on the bucket's channel 'wanted' (its notice channel's name, 'notices' replaced).
local function ask_keeper(sid)
  redis.call(PUBLISH, string.sub(CHANNEL, 1, -8) .. 'wanted',
    cjson.encode({k = 'wanted', s = sid, o = ORIGIN}))
end

-- A stored field read as a number: a finite one, or nil (damaged; Lua's tonumber also
-- reads 'nan' and 'inf', which no deadline statekit writes can be).
local function number(text)
  local n = tonumber(text)
  if n and n == n and n > -math.huge and n < math.huge then return n end
  return nil
end

-- Whether text is a version statekit wrote: digits that HINCRBY can still add to.
local function is_version(text)
  return text ~= nil and #text <= 15 and string.find(text, '^%d+$') ~= nil
end

-- The answer for a session without a hash: why it ended, or that it is unknown.
local function missing(gone)
  local kind = redis.call('TYPE', gone).ok
  if kind == 'none' then return {'none'} end
  if kind ~= 'string' then return {'badgone'} end
  return {'gone', redis.call('GET', gone)}
end
"""

# After ONCE: a damaged index is found before anything is written (Redis does not undo
# a failing script). ``damaged_index()`` answers {'damaged', key} for the first of
# INDEXES that holds another type than a sorted set, else nil. INDEX_CHECK defines it;
# INDEXES also runs it at once, for the scripts that write to an index on most calls.
# LOAD and COMMIT run it only before they write to one, which most of their calls do
# not (a type check per index is a server call of its own).
INDEX_CHECK = r"""
local function damaged_index()
  for _, index in ipairs(INDEXES) do
    local kind = redis.call('TYPE', index).ok
    if kind ~= 'zset' and kind ~= 'none' then return {'damaged', index} end
  end
  return nil
end
"""
INDEXES = (
    INDEX_CHECK
    + r"""
local damaged_at_start = damaged_index()
if damaged_at_start then return damaged_at_start end
"""
)

# Then, in the scripts about one session (LOAD, PEEK, COMMIT, CLOSE): its hash and
# tombstone, the last two keys, and its id. Each reads the hash first with
# ``redis.pcall``: a key of another type answers {'wrongtype'}, before anything is
# written (one call, where a TYPE before the read was two).
SESSION = r"""
local KEY, GONE, SID = KEYS[#KEYS - 1], KEYS[#KEYS], ARGV[2]
"""


# Writing values: put_values(key, dl, sid, t, first, last, sets, had) stores the values
# of the (name, value, deadline|'') triples t[first..last] in a session's hash ``key``,
# with the pairs already in ``sets`` (its version, say), in one HSET (in pieces of at
# most 1,000 fields, which Lua's unpack can pass), indexes the values' deadlines in
# ``dl``, and returns the names written. A value written without a deadline loses the
# one it had; ``had`` names the values that had one, when the caller read them (nil:
# each is looked for).
PUT_VALUES = r"""
local function put_values(key, dl, sid, t, first, last, sets, had)
  local names = {}
  for j = first, last, 3 do
    local name = t[j]
    names[#names + 1] = name
    sets[#sets + 1] = 'v:' .. name
    sets[#sets + 1] = t[j + 1]
    local member = 'v\0' .. sid .. '\0' .. name
    if t[j + 2] ~= '' then
      sets[#sets + 1] = 't:' .. name
      sets[#sets + 1] = t[j + 2]
      redis.call('ZADD', dl, t[j + 2], member)
    elseif (had == nil or had[name]) and redis.call('HDEL', key, 't:' .. name) == 1 then
      redis.call('ZREM', dl, member)
    end
  end
  for i = 1, #sets, 1000 do
    redis.call('HSET', key, unpack(sets, i, math.min(i + 999, #sets)))
  end
  return names
end
"""
