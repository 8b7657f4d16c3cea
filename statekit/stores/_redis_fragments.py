"""Fragments of Lua the Redis store's scripts share (see ``_redis_scripts`` for the
layout of keys and arguments they assume)."""

from __future__ import annotations

__all__ = [
    "APP",
    "CAPACITY",
    "CLAIMS",
    "INDEXES",
    "INDEX_CHECK",
    "LEASE_WRITE",
    "PUT_VALUES",
    "SESSION",
]

# An event's lease lives on the master only (see "What replicas get" in
# ``_redis_scripts``): taking it, renewing it and giving it back go through
# ``lease_write``, which keeps the write out of replication and the AOF. A kept lease,
# and its end, travel in replicated writes.
LEASE_WRITE = r"""
local function lease_write(...)
  redis.set_repl(redis.REPL_NONE)
  redis.call(...)
  redis.set_repl(redis.REPL_ALL)
end
"""

# The start of the scripts about an application's sessions (the seven of _redis_scripts,
# see Layout, and the staged commit's).
APP = r"""
local DL, REQ = KEYS[1], KEYS[2]
local INDEXES = {DL}
local REQUEST_MS, CLAIM_MS, TOMBSTONE, ORIGIN, PUBLISH, CHANNEL =
  string.match(ARGV[1], '^(%d+) (%d+) (%d+) (%S+) (%S+) (.+)$')

-- (Replicated, as any command of a script: a listener still subscribed to a master
-- demoted behind the address it knows hears it all the same.)
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

-- Whether a session's lease fields hold a kept lease: a token in both (a lease given
-- back by a commit leaves them empty).
local function is_kept(lease, kept)
  return kept ~= nil and kept ~= '' and kept == lease
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

# Then, in the six that may claim sessions or values (all but COMMIT): the capacity
# orders and what claims them.
CLAIMS = r"""
local LRU, CLOSED = KEYS[3], KEYS[4]
INDEXES = {DL, LRU, CLOSED}

-- Remove a whole session; return {sid, reason, at, closed, {name, value, ...}}.
local function claim(sid, key, gone, reason, at)
  local h = redis.call('HGETALL', key)
  local closed = '0'
  local vals = {}
  local lease, kept
  for i = 1, #h, 2 do
    local f = h[i]
    local prefix = string.sub(f, 1, 2)
    if f == '_c' then
      closed = h[i + 1]
    elseif f == '_l' then
      lease = h[i + 1]
    elseif f == '_lk' then
      kept = h[i + 1]
    elseif prefix == 'v:' then
      vals[#vals + 1] = string.sub(f, 3)
      vals[#vals + 1] = h[i + 1]
    elseif prefix == 't:' then
      redis.call('ZREM', DL, 'v\0' .. sid .. '\0' .. string.sub(f, 3))
    end
  end
  redis.call('DEL', key)
  redis.call('ZREM', DL, 's\0' .. sid)
  redis.call('ZREM', LRU, sid)
  redis.call('ZREM', CLOSED, sid)
  redis.call('SET', gone, reason .. '\0' .. at, 'EX', TOMBSTONE)
  if is_kept(lease, kept) then ask_keeper(sid) end
  if closed ~= '1' then
    notice('ended', sid, reason, nil)
  end
  return {sid, reason, at, closed, vals}
end

-- Whether a touch slides an open session's deadline to new_deadline ('' = a look, not
-- a use). A touch that would move it by less than a second (or a tenth of the idle
-- ttl, if that is shorter) is skipped: it saves three writes on busy sessions and
-- changes an expiry by little.
local function slides(closed, deadline, now, new_deadline)
  if closed == '1' or new_deadline == '' then
    return false
  end
  local wanted = tonumber(new_deadline)
  return wanted - deadline >= math.min(1, (wanted - tonumber(now)) / 10)
end

-- What a write to the index at key answered, when it refused: {'damaged', key} for a
-- key of another type, else the server's own error (a master demoted to a replica,
-- out of memory, too few replicas), returned as it is for the client to act on.
local function refusal(result, key)
  if type(result) ~= 'table' or result.err == nil then return nil end
  if string.sub(result.err, 1, 9) == 'WRONGTYPE' then return {'damaged', key} end
  return result
end

-- Slide the deadline from old_deadline to new_deadline (and index it); nil, or (with
-- nothing written) what refused it (see refusal): the indexes are written first, and
-- a refusal of the second puts the first back (a type check before each would be a
-- server call of its own on most events). The key's TTL (backstop_ms: the new
-- deadline's distance plus a margin) moves only when less than half the margin is left
-- of it, so that most slides write three times, not four.
local function slide(key, sid, now, new_deadline, backstop_ms, old_deadline)
  local member = 's\0' .. sid
  local added = redis.pcall('ZADD', DL, new_deadline, member)
  local refused = refusal(added, DL)
  if refused then return refused end
  refused = refusal(redis.pcall('ZADD', LRU, now, sid), LRU)
  if refused then
    if added == 1 then  -- it was not indexed: as it was
      redis.call('ZREM', DL, member)
    else
      redis.call('ZADD', DL, old_deadline, member)
    end
    return refused
  end
  redis.call('HSET', key, '_d', new_deadline)
  local ttl = tonumber(backstop_ms)
  local margin = ttl - (tonumber(new_deadline) - tonumber(now)) * 1000
  if redis.call('PTTL', key) < ttl - margin / 2 then
    redis.call('PEXPIRE', key, backstop_ms)
  end
  return nil
end

-- Slide the deadline, if the touch slides it (after the indexes were checked); nil,
-- or the server's refusal (see slide).
local function touch(key, sid, closed, deadline, now, new_deadline, backstop_ms)
  if slides(closed, deadline, now, new_deadline) then
    return slide(key, sid, now, new_deadline, backstop_ms, deadline)
  end
  return nil
end

-- Remove one value past its ttl; return {sid, 'ttl', at, name, value}, or nil when the
-- value is no longer there (its session was claimed first).
local function claim_value(key, sid, name, at)
  local value = redis.call('HGET', key, 'v:' .. name)
  redis.call('ZREM', DL, 'v\0' .. sid .. '\0' .. name)
  redis.call('HDEL', key, 'v:' .. name, 't:' .. name)
  if not value then
    return nil
  end
  return {sid, 'ttl', at, name, value}
end

-- The first damaged field of a session's version and deadline, or nil.
local function damaged(version, deadline)
  if not is_version(version) then return '_v' end
  if not number(deadline) then return '_d' end
  return nil
end

-- A reply that only carries what a load or a reap claimed (not the caller's own
-- write) is kept for a shorter while: it holds deleted values.
local function remember_claims(reply)
  redis.call('SET', REQ, cmsgpack.pack(reply), 'PX', CLAIM_MS)
  return reply
end

-- Claim a session a load or a peek found past its deadline (meta: _v, _c, _d).
local function expired(sid, key, gone, meta)
  local reason = 'idle'
  if meta[2] == '1' then reason = 'closed' end
  return remember_claims({'expired', claim(sid, key, gone, reason, meta[3])})
end
"""

# Then, in the scripts that evict or reap (CREATE, EVICT, REAP): what finds and claims
# sessions of keys found on the way (see "Keys found on the way" in the scripts).
CAPACITY = r"""
-- Whether key holds a hash (a session statekit wrote), not another type.
local function is_hash(key)
  return redis.call('TYPE', key).ok == 'hash'
end

-- Where the keys of the sessions named by ARGV[first..last] are declared: the index
-- in KEYS of each one's hash (its tombstone follows), from KEYS[at] on.
local function declared(at, first, last)
  local slots = {}
  for i = first, last do
    slots[ARGV[i]] = at + 2 * (i - first)
  end
  return slots
end

-- How firmly a lease holds the session at key at now: 0 not at all (none, lapsed, or
-- a key of another type), 1 a lease kept between events (an event of its engine may
-- run on it without a load, unseen here), 2 an event's lease.
local function hold(key, now)
  local m = redis.pcall('HMGET', key, '_l', '_lu', '_lk')
  if m.err or not m[1] or m[1] == '' then return 0 end
  local until_ = number(m[2])
  if until_ == nil or until_ <= tonumber(now) then return 0 end
  if m[3] == m[1] then return 1 end
  return 2
end

-- The candidates ARGV[first..] (ids, their keys declared from slots) still in a
-- capacity order: at most most victims, in order, and (when free, passing them over)
-- those a lease holds, by how firmly ({kept leases, events'}; see hold).
local function pick(first, slots, most, now, free)
  local victims, held = {}, {{}, {}}
  for i = first, #ARGV do
    if #victims >= most then break end
    if redis.call('ZSCORE', CLOSED, ARGV[i]) or redis.call('ZSCORE', LRU, ARGV[i]) then
      local level = 0
      if free then level = hold(KEYS[slots[ARGV[i]]], now) end
      if level > 0 then
        held[level][#held[level] + 1] = ARGV[i]
      else
        victims[#victims + 1] = ARGV[i]
      end
    end
  end
  return victims, held
end

-- Claim each of victims (ids, their keys declared from slots) still in a capacity
-- order, as evicted (or as idle or closed when its own deadline is past at now);
-- drop an entry that names no session. Returns {evicted, junk}.
local function evict(victims, slots, now)
  local evicted = {}
  local junk = {}
  for _, victim in ipairs(victims) do
    local key = KEYS[slots[victim]]
    local meta = {}
    if is_hash(key) then
      meta = redis.call('HMGET', key, '_c', '_d')
    end
    if not meta[2] then
      -- No session behind this entry: drop it, it holds no place.
      redis.call('ZREM', LRU, victim)
      redis.call('ZREM', CLOSED, victim)
      junk[#junk + 1] = victim
    else
      local reason = 'evicted'
      local at = now
      local deadline = number(meta[2])
      if deadline and deadline <= tonumber(now) then
        at = meta[2]
        if meta[1] == '1' then reason = 'closed' else reason = 'idle' end
      end
      evicted[#evicted + 1] = claim(victim, key, KEYS[slots[victim] + 1], reason, at)
    end
  end
  return evicted, junk
end
"""


# After ONCE: a damaged index is found before anything is written (Redis does not undo
# a failing script). ``damaged_index()`` answers {'damaged', key} for the first of
# INDEXES that holds another type than a sorted set, else nil. INDEX_CHECK defines it;
# INDEXES also runs it at once, for the scripts that write to an index on most calls.
# LOAD and COMMIT run it only before they write to one, which most of their calls do
# not (a type check per index is a server call of its own); a load that only slides
# its session's deadline checks none: ``slide`` finds a damaged index by its refusal.
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
