"""The Lua scripts of the Redis store: each store operation is one atomic script.

Keys: every key of an application starts with ``<prefix>:{<app>}:`` so that the hash
tag puts them in one cluster slot. ``s:<sid>`` is a session hash (``_v`` version,
``_c`` closed, ``_d`` deadline, ``_l``/``_lu`` lease and its end, ``v:<name>`` values,
``t:<name>`` value deadlines); ``dl`` is the deadline index (a sorted set of
``s\\0<sid>`` and ``v\\0<sid>\\0<name>``); ``lru`` and ``closed`` order open sessions by
last use and closed ones by close time; ``gone:<sid>`` remembers why a session ended;
``g:<name>`` is a global (``v`` value, ``n`` version); ``q:<request id>`` remembers the
reply of a write for a while. Times travel as the strings Python wrote, so Lua never
rounds them. The per-application constants are written into each script's text
(``@P@`` the key prefix, ``@ORIGIN@`` the handle, ``@CHANNEL@`` the notice channel,
``@TOMBSTONE@`` the seconds an ended id is remembered, ``@REQUEST_MS@`` and
``@CLAIM_MS@`` the milliseconds a write's reply is remembered, and a reply that only
carries claims), so that a call sends only what changes.

**Idempotent writes.** Every script that writes takes, as its last key, a key made of
a request id that the caller draws once per operation. Before doing anything, the
script looks for a reply remembered under that key and, if there is one, returns it
unchanged: a request sent again (by a client that retries after a lost connection, or
by the store itself) is answered with the first outcome and applied once. A script
remembers its reply when running it again would not give the same answer: a commit,
an open, a close, a global write, and any load, peek or reap that claimed something.
``REPLAY`` reads a remembered reply back, for a request whose answer never came.

**Damaged data.** Fields the scripts read as numbers, and the types of keys they
claim, are checked before anything is written; a session with a damaged field is
answered ``{'corrupt', field}`` and left in place; a member of an index that names
nothing (or is not one statekit writes) is removed and reported, so that one bad entry
never stops reaping or opening sessions.
"""

from __future__ import annotations

# Shared helpers, prepended to the scripts that need them.
_CLAIM = r"""
local P = [==[@P@]==]
local function notice(kind, sid, reason, names)
  local msg = {k = kind, s = sid, o = [==[@ORIGIN@]==]}
  if reason then msg.r = reason end
  if names then msg.n = names end
  redis.call('PUBLISH', [==[@CHANNEL@]==], cjson.encode(msg))
end

-- Remove a whole session; return {sid, reason, at, closed, {name, value, ...}}.
local function claim(sid, reason, at)
  local key = P .. 's:' .. sid
  local h = redis.call('HGETALL', key)
  local closed = '0'
  local vals = {}
  for i = 1, #h, 2 do
    local f = h[i]
    local prefix = string.sub(f, 1, 2)
    if f == '_c' then
      closed = h[i + 1]
    elseif prefix == 'v:' then
      vals[#vals + 1] = string.sub(f, 3)
      vals[#vals + 1] = h[i + 1]
    elseif prefix == 't:' then
      redis.call('ZREM', P .. 'dl', 'v\0' .. sid .. '\0' .. string.sub(f, 3))
    end
  end
  redis.call('DEL', key)
  redis.call('ZREM', P .. 'dl', 's\0' .. sid)
  redis.call('ZREM', P .. 'lru', sid)
  redis.call('ZREM', P .. 'closed', sid)
  redis.call('SET', P .. 'gone:' .. sid, reason .. '\0' .. at, 'EX', @TOMBSTONE@)
  if closed ~= '1' then
    notice('ended', sid, reason, nil)
  end
  return {sid, reason, at, closed, vals}
end

-- Slide an open session's deadline to new_deadline ('' = a look, not a use). A touch that
-- would move it by less than a second (or a tenth of the idle ttl, if that is shorter)
-- is skipped: it saves four writes on busy sessions and changes an expiry by little.
local function touch(key, sid, closed, deadline, now, new_deadline, backstop_ms)
  if closed == '1' or new_deadline == '' then
    return
  end
  local slide = tonumber(new_deadline) - deadline
  if slide < math.min(1, (tonumber(new_deadline) - tonumber(now)) / 10) then
    return
  end
  redis.call('HSET', key, '_d', new_deadline)
  redis.call('PEXPIRE', key, backstop_ms)
  redis.call('ZADD', P .. 'dl', new_deadline, 's\0' .. sid)
  redis.call('ZADD', P .. 'lru', now, sid)
end

-- Remove one value past its ttl; return {sid, 'ttl', at, name, value}, or nil when the
-- value is no longer there (its session was claimed first).
local function claim_value(sid, name, at)
  local key = P .. 's:' .. sid
  local value = redis.call('HGET', key, 'v:' .. name)
  redis.call('ZREM', P .. 'dl', 'v\0' .. sid .. '\0' .. name)
  redis.call('HDEL', key, 'v:' .. name, 't:' .. name)
  if not value then
    return nil
  end
  return {sid, 'ttl', at, name, value}
end

-- Whether key holds a hash (a session statekit wrote), not another type.
local function is_hash(key)
  return redis.call('TYPE', key).ok == 'hash'
end

-- Whether text is a version statekit wrote: digits that HINCRBY can still add to.
local function is_version(text)
  return text ~= nil and #text <= 15 and string.find(text, '^%d+$') ~= nil
end

-- The first damaged field of a session's version and deadline, or nil.
local function damaged(version, deadline)
  if not is_version(version) then return '_v' end
  if not tonumber(deadline) then return '_d' end
  return nil
end
"""

# After _CLAIM and _ONCE in every script that writes to the app's indexes: a damaged
# index is found before anything is written (Redis does not undo a failing script).
_INDEXES = r"""
for _, name in ipairs({'dl', 'lru', 'closed'}) do
  local kind = redis.call('TYPE', P .. name).ok
  if kind ~= 'zset' and kind ~= 'none' then return {'damaged', P .. name} end
end
"""

# Prepended to every script that writes: KEYS[#KEYS] is the request's key.
_ONCE = r"""
local REQ = KEYS[#KEYS]
local seen = redis.call('GET', REQ)
if seen then return cmsgpack.unpack(seen) end
local function remember(reply)
  redis.call('SET', REQ, cmsgpack.pack(reply), 'PX', @REQUEST_MS@)
  return reply
end
-- A reply that only carries what a load or a reap claimed (not the caller's own
-- write) is kept for a shorter while: it holds deleted values.
local function remember_claims(reply)
  redis.call('SET', REQ, cmsgpack.pack(reply), 'PX', @CLAIM_MS@)
  return reply
end
"""

# KEYS: session, request.  ARGV: sid, now, deadline, capacity, backstop_ms
# Returns {evicted, junk}: the sessions evicted, and index entries that named nothing.
CREATE = (
    _CLAIM
    + _ONCE
    + _INDEXES
    + r"""
local now = tonumber(ARGV[2])
local count = redis.call('ZCARD', P .. 'lru') + redis.call('ZCARD', P .. 'closed')
local evicted = {}
local junk = {}
while count >= tonumber(ARGV[4]) do
  local victim = redis.call('ZRANGE', P .. 'closed', 0, 0)[1]
  if not victim then victim = redis.call('ZRANGE', P .. 'lru', 0, 0)[1] end
  if not victim then break end
  local meta = {}
  if is_hash(P .. 's:' .. victim) then
    meta = redis.call('HMGET', P .. 's:' .. victim, '_c', '_d')
  end
  if not meta[2] then
    -- No session behind this entry: drop it, it holds no place.
    redis.call('ZREM', P .. 'lru', victim)
    redis.call('ZREM', P .. 'closed', victim)
    junk[#junk + 1] = victim
  else
    local reason = 'evicted'
    local at = ARGV[2]
    local deadline = tonumber(meta[2])
    if deadline and deadline <= now then
      at = meta[2]
      if meta[1] == '1' then reason = 'closed' else reason = 'idle' end
    end
    evicted[#evicted + 1] = claim(victim, reason, at)
  end
  count = count - 1
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'taken'}
end
redis.call('HSET', KEYS[1], '_v', 0, '_c', 0, '_d', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', P .. 'dl', ARGV[3], 's\0' .. ARGV[1])
redis.call('ZADD', P .. 'lru', ARGV[2], ARGV[1])
return remember({evicted, junk})
"""
)

# KEYS: session, request.  ARGV: sid, now, touch_until|'', lease|'', lease_until,
#       backstop_ms
LOAD = (
    _CLAIM
    + _ONCE
    + _INDEXES
    + r"""
local sid = ARGV[1]
local now = tonumber(ARGV[2])
local meta = redis.call('HMGET', KEYS[1], '_v', '_c', '_d', '_l', '_lu')
if not meta[3] then
  local gone = redis.call('GET', P .. 'gone:' .. sid)
  if gone then return {'gone', gone} end
  return {'none'}
end
local bad = damaged(meta[1], meta[3])
if bad then return {'corrupt', bad} end
if meta[4] and not tonumber(meta[5]) then return {'corrupt', '_lu'} end
local deadline = tonumber(meta[3])
if deadline <= now then
  local reason = 'idle'
  if meta[2] == '1' then reason = 'closed' end
  return remember_claims({'expired', claim(sid, reason, meta[3])})
end
local h = redis.call('HGETALL', KEYS[1])
local due = {}
for i = 1, #h, 2 do
  local f = h[i]
  if string.sub(f, 1, 2) == 't:' then
    local at = tonumber(h[i + 1])
    if not at then return {'corrupt', f} end
    if at <= now then
      due[string.sub(f, 3)] = h[i + 1]
    end
  end
end
if ARGV[4] ~= '' then
  if meta[4] and meta[4] ~= ARGV[4] and tonumber(meta[5]) > now then
    return {'busy', meta[5]}
  end
  redis.call('HSET', KEYS[1], '_l', ARGV[4], '_lu', ARGV[5])
end
local values = {}
local expired = {}
for i = 1, #h, 2 do
  local f = h[i]
  if string.sub(f, 1, 2) == 'v:' then
    local name = string.sub(f, 3)
    if not due[name] then
      values[#values + 1] = name
      values[#values + 1] = h[i + 1]
    end
  end
end
for name, at in pairs(due) do
  -- nil (and only the stray deadline removed) when the value is not there
  expired[#expired + 1] = claim_value(sid, name, at)
end
touch(KEYS[1], sid, meta[2], deadline, ARGV[2], ARGV[3], ARGV[6])
local reply = {'ok', meta[1], meta[2] or '0', values, expired}
if #expired > 0 then return remember_claims(reply) end
return reply
"""
)

# KEYS: session, request.  ARGV: sid, now, touch_until|'', name, backstop_ms
PEEK = (
    _CLAIM
    + _ONCE
    + _INDEXES
    + r"""
local sid = ARGV[1]
local now = tonumber(ARGV[2])
local name = ARGV[4]
local meta = redis.call('HMGET', KEYS[1], '_v', '_c', '_d', 'v:' .. name, 't:' .. name)
if not meta[3] then
  local gone = redis.call('GET', P .. 'gone:' .. sid)
  if gone then return {'gone', gone} end
  return {'none'}
end
local bad = damaged(meta[1], meta[3])
if bad then return {'corrupt', bad} end
local deadline = tonumber(meta[3])
if deadline <= now then
  local reason = 'idle'
  if meta[2] == '1' then reason = 'closed' end
  return remember_claims({'expired', claim(sid, reason, meta[3])})
end
local values = {}
local expired = {}
if meta[5] then
  local at = tonumber(meta[5])
  if not at then return {'corrupt', 't:' .. name} end
  if at <= now then
    expired[1] = claim_value(sid, name, meta[5])
  end
end
if meta[4] and not expired[1] then
  values = {name, meta[4]}
end
touch(KEYS[1], sid, meta[2], deadline, ARGV[2], ARGV[3], ARGV[5])
local reply = {'ok', meta[1], meta[2] or '0', values, expired}
if expired[1] then return remember_claims(reply) end
return reply
"""
)

# KEYS: session, request.  ARGV: sid, version, lease|'', release '1'|'0', then
#       name, value, deadline|'' for each write.
COMMIT = (
    _CLAIM
    + _ONCE
    + _INDEXES
    + r"""
local meta = redis.call('HMGET', KEYS[1], '_v', '_l')
if not meta[1] then
  local gone = redis.call('GET', P .. 'gone:' .. ARGV[1])
  if gone then return {'gone', gone} end
  return {'none'}
end
if not is_version(meta[1]) then return {'corrupt', '_v'} end
if meta[1] ~= ARGV[2] or (ARGV[3] ~= '' and meta[2] ~= ARGV[3]) then
  return {'conflict', meta[1]}
end
local sid = ARGV[1]
local names = {}
for i = 5, #ARGV, 3 do
  local name = ARGV[i]
  names[#names + 1] = name
  redis.call('HSET', KEYS[1], 'v:' .. name, ARGV[i + 1])
  local member = 'v\0' .. sid .. '\0' .. name
  if ARGV[i + 2] ~= '' then
    redis.call('HSET', KEYS[1], 't:' .. name, ARGV[i + 2])
    redis.call('ZADD', P .. 'dl', ARGV[i + 2], member)
  elseif redis.call('HDEL', KEYS[1], 't:' .. name) == 1 then
    redis.call('ZREM', P .. 'dl', member)
  end
end
local version = redis.call('HINCRBY', KEYS[1], '_v', 1)
if ARGV[3] ~= '' and ARGV[4] == '1' then
  redis.call('HDEL', KEYS[1], '_l', '_lu')
end
notice('changed', sid, nil, names)
return remember({'ok', tostring(version)})
"""
)

# KEYS: session.  ARGV: lease.  Idempotent by nature: no request key.
RELEASE = r"""
if redis.call('HGET', KEYS[1], '_l') == ARGV[1] then
  redis.call('HDEL', KEYS[1], '_l', '_lu')
end
return 1
"""

# KEYS: session, request.  ARGV: sid, now, deadline, backstop_ms
CLOSE = (
    _CLAIM
    + _ONCE
    + _INDEXES
    + r"""
local sid = ARGV[1]
local meta = redis.call('HMGET', KEYS[1], '_c', '_d', '_v')
if not meta[2] then
  local gone = redis.call('GET', P .. 'gone:' .. sid)
  if gone then return {'gone', gone} end
  return {'none'}
end
if meta[1] == '1' then return {'already'} end
local bad = damaged(meta[3], meta[2])
if bad then return {'corrupt', bad} end
if tonumber(meta[2]) <= tonumber(ARGV[2]) then
  return remember({'expired', claim(sid, 'idle', meta[2])})
end
redis.call('HSET', KEYS[1], '_c', 1, '_d', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', P .. 'dl', ARGV[3], 's\0' .. sid)
redis.call('ZREM', P .. 'lru', sid)
redis.call('ZADD', P .. 'closed', ARGV[2], sid)
notice('ended', sid, 'closed', nil)
return remember({'closed'})
"""
)

# KEYS: dl, request.  ARGV: now, limit, budget
# Returns {ended, junk, more}: what was claimed (at most limit entries); index members
# that named nothing claimable, removed (junk); and 1 when the budget of members
# looked at ran out with due members left. Every member looked at leaves the index, so
# one bad member never stops the others, and a pile of them is cleared a budget at a
# time. Junk is not remembered: removing it again is harmless.
REAP = (
    _CLAIM
    + _ONCE
    + _INDEXES
    + r"""
local limit = tonumber(ARGV[2])
local budget = tonumber(ARGV[3])
local out = {}
local junk = {}
local claimed = {}
local more = 0
while #out < limit do
  if budget <= 0 then more = 1 break end
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES',
                         'LIMIT', 0, math.min(limit - #out, budget))
  if #due == 0 then break end
  for i = 1, #due, 2 do
    budget = budget - 1
    local member = due[i]
    local kind = string.sub(member, 1, 2)
    local cut = nil
    if kind == 'v\0' then cut = string.find(member, '\0', 3, true) end
    local session = nil
    if kind == 's\0' and is_hash(P .. 's:' .. string.sub(member, 3)) then
      session = redis.call('HMGET', P .. 's:' .. string.sub(member, 3), '_c', '_d')
    end
    if session and tonumber(session[2]) and tonumber(session[2]) <= tonumber(ARGV[1]) then
      local sid = string.sub(member, 3)
      local reason = 'idle'
      if session[1] == '1' then reason = 'closed' end
      out[#out + 1] = claim(sid, reason, due[i + 1])
      claimed[sid] = true
    elseif session and tonumber(session[2]) then
      -- The index is behind the session's own deadline, which rules: index it anew.
      redis.call('ZADD', KEYS[1], session[2], member)
      junk[#junk + 1] = member
    elseif session then
      redis.call('ZREM', KEYS[1], member)  -- a damaged deadline: its loads say so
      junk[#junk + 1] = member
    elseif cut then
      local sid = string.sub(member, 3, cut - 1)
      local name = string.sub(member, cut + 1)
      local key = P .. 's:' .. sid
      local item = nil
      -- Only a value whose own deadline is due: an entry naming a live value
      -- without one is junk, not an order to delete it.
      if is_hash(key) then
        local at = tonumber(redis.call('HGET', key, 't:' .. name))
        if at and at <= tonumber(ARGV[1]) then item = claim_value(sid, name, due[i + 1]) end
      end
      if item then
        out[#out + 1] = item
      else
        redis.call('ZREM', KEYS[1], member)
        if not claimed[sid] then junk[#junk + 1] = member end
      end
    else
      redis.call('ZREM', KEYS[1], member)
      junk[#junk + 1] = member
    end
  end
end
if #out > 0 then remember_claims({out, {}, more}) end
return {out, junk, more}
"""
)

# KEYS: request.  Returns {1, reply} with the reply remembered for a request, or {0}.
REPLAY = r"""
local seen = redis.call('GET', KEYS[1])
if not seen then return {0} end
return {1, cmsgpack.unpack(seen)}
"""

# KEYS: global, request.  ARGV: version|'', value
GLOBAL_CAS = (
    _ONCE
    + r"""
local found = redis.call('HGET', KEYS[1], 'n')
if (found or '') ~= ARGV[1] then return false end
local version = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[1], 'v', ARGV[2])
return remember(version)
"""
)

# KEYS: global, request.  ARGV: amount, default
# Adds on the server only when the stored value and the amount are plain integers (the
# reply is the stored string, never a Lua number, which would round past 2**53); else
# returns false and the caller adds in Python with a compare-and-set.
GLOBAL_ADD = (
    _ONCE
    + r"""
local function is_version(text)
  return text ~= nil and #text <= 15 and string.find(text, '^%d+$') ~= nil
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'v', ARGV[2], 'n', 0)
end
local found = redis.call('HMGET', KEYS[1], 'v', 'n')
local current = found[1]
if not current or not is_version(found[2]) then return {'corrupt'} end
if string.find(current, '^-?%d+$') == nil or string.find(ARGV[1], '^-?%d+$') == nil then
  return false
end
local added = redis.pcall('HINCRBY', KEYS[1], 'v', ARGV[1])
if type(added) == 'table' and added.err then return false end
redis.call('HINCRBY', KEYS[1], 'n', 1)
return remember(redis.call('HGET', KEYS[1], 'v'))
"""
)


def render(
    script: str,
    *,
    prefix: str,
    origin: str,
    channel: str,
    tombstone_ttl: int,
    request_ms: int,
    claim_ms: int,
) -> str:
    """A script with its per-application constants written in."""
    for text in (prefix, origin, channel):
        if "]==]" in text or "\n" in text:
            raise ValueError(f"{text!r} cannot be used in a Redis key prefix")
    return (
        script.replace("@P@", prefix)
        .replace("@ORIGIN@", origin)
        .replace("@CHANNEL@", channel)
        .replace("@TOMBSTONE@", str(int(tombstone_ttl)))
        .replace("@REQUEST_MS@", str(int(request_ms)))
        .replace("@CLAIM_MS@", str(int(claim_ms)))
    )
