"""The Lua scripts of the Redis store: each store operation is one atomic script.

Keys: every key of an application starts with ``<prefix>:{<app>}:`` so that the hash
tag puts them in one cluster slot. ``s:<sid>`` is a session hash (``_v`` version,
``_c`` closed, ``_d`` deadline, ``_l``/``_lu`` lease and its end, ``v:<name>`` values,
``t:<name>`` value deadlines); ``dl`` is the deadline index (a sorted set of
``s\\0<sid>`` and ``v\\0<sid>\\0<name>``); ``lru`` and ``closed`` order open sessions by
last use and closed ones by close time; ``gone:<sid>`` remembers why a session ended;
``g:<name>`` is a global (``v`` value, ``n`` version). Times travel as the strings
Python wrote, so Lua never rounds them. The per-application constants are written
into each script's text (``@P@`` the key prefix, ``@ORIGIN@`` the handle, ``@CHANNEL@``
the notice channel, ``@TOMBSTONE@`` the seconds an ended id is remembered), so that a
call sends only what changes.
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
  local slide = tonumber(new_deadline) - tonumber(deadline)
  if slide < math.min(1, (tonumber(new_deadline) - tonumber(now)) / 10) then
    return
  end
  redis.call('HSET', key, '_d', new_deadline)
  redis.call('PEXPIRE', key, backstop_ms)
  redis.call('ZADD', P .. 'dl', new_deadline, 's\0' .. sid)
  redis.call('ZADD', P .. 'lru', now, sid)
end

-- Remove one value past its ttl; return {sid, 'ttl', at, name, value}.
local function claim_value(sid, name, at)
  local key = P .. 's:' .. sid
  local value = redis.call('HGET', key, 'v:' .. name)
  redis.call('HDEL', key, 'v:' .. name, 't:' .. name)
  redis.call('ZREM', P .. 'dl', 'v\0' .. sid .. '\0' .. name)
  return {sid, 'ttl', at, name, value or ''}
end
"""

# KEYS: session.  ARGV: sid, now, deadline, capacity, backstop_ms
CREATE = (
    _CLAIM
    + r"""
local now = tonumber(ARGV[2])
local count = redis.call('ZCARD', P .. 'lru') + redis.call('ZCARD', P .. 'closed')
local evicted = {}
while count >= tonumber(ARGV[4]) do
  local victim = redis.call('ZRANGE', P .. 'closed', 0, 0)[1]
  if not victim then victim = redis.call('ZRANGE', P .. 'lru', 0, 0)[1] end
  if not victim then break end
  local meta = redis.call('HMGET', P .. 's:' .. victim, '_c', '_d')
  local reason = 'evicted'
  local at = ARGV[2]
  if meta[2] and tonumber(meta[2]) <= now then
    at = meta[2]
    if meta[1] == '1' then reason = 'closed' else reason = 'idle' end
  end
  evicted[#evicted + 1] = claim(victim, reason, at)
  count = count - 1
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('session id already in use')
end
redis.call('HSET', KEYS[1], '_v', 0, '_c', 0, '_d', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', P .. 'dl', ARGV[3], 's\0' .. ARGV[1])
redis.call('ZADD', P .. 'lru', ARGV[2], ARGV[1])
return evicted
"""
)

# KEYS: session.  ARGV: sid, now, touch_until|'', lease|'', lease_until, backstop_ms
LOAD = (
    _CLAIM
    + r"""
local sid = ARGV[1]
local now = tonumber(ARGV[2])
local meta = redis.call('HMGET', KEYS[1], '_v', '_c', '_d', '_l', '_lu')
if not meta[3] then
  local gone = redis.call('GET', P .. 'gone:' .. sid)
  if gone then return {'gone', gone} end
  return {'none'}
end
if tonumber(meta[3]) <= now then
  local reason = 'idle'
  if meta[2] == '1' then reason = 'closed' end
  return {'expired', claim(sid, reason, meta[3])}
end
if ARGV[4] ~= '' then
  if meta[4] and meta[4] ~= ARGV[4] and tonumber(meta[5]) > now then
    return {'busy', meta[5]}
  end
  redis.call('HSET', KEYS[1], '_l', ARGV[4], '_lu', ARGV[5])
end
local h = redis.call('HGETALL', KEYS[1])
local values = {}
local expired = {}
local due = {}
for i = 1, #h, 2 do
  local f = h[i]
  if string.sub(f, 1, 2) == 't:' and tonumber(h[i + 1]) <= now then
    due[string.sub(f, 3)] = h[i + 1]
  end
end
for i = 1, #h, 2 do
  local f = h[i]
  if string.sub(f, 1, 2) == 'v:' then
    local name = string.sub(f, 3)
    if due[name] then
      expired[#expired + 1] = claim_value(sid, name, due[name])
    else
      values[#values + 1] = name
      values[#values + 1] = h[i + 1]
    end
  end
end
touch(KEYS[1], sid, meta[2], meta[3], ARGV[2], ARGV[3], ARGV[6])
return {'ok', meta[1], meta[2] or '0', values, expired}
"""
)

# KEYS: session.  ARGV: sid, now, touch_until|'', name, backstop_ms
PEEK = (
    _CLAIM
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
if tonumber(meta[3]) <= now then
  local reason = 'idle'
  if meta[2] == '1' then reason = 'closed' end
  return {'expired', claim(sid, reason, meta[3])}
end
local values = {}
local expired = {}
if meta[5] and tonumber(meta[5]) <= now then
  expired[1] = claim_value(sid, name, meta[5])
elseif meta[4] then
  values = {name, meta[4]}
end
touch(KEYS[1], sid, meta[2], meta[3], ARGV[2], ARGV[3], ARGV[5])
return {'ok', meta[1], meta[2] or '0', values, expired}
"""
)

# KEYS: session.  ARGV: sid, version, lease|'', release '1'|'0', then
#       name, value, deadline|'' for each write.
COMMIT = (
    _CLAIM
    + r"""
local meta = redis.call('HMGET', KEYS[1], '_v', '_l')
if not meta[1] then
  local gone = redis.call('GET', P .. 'gone:' .. ARGV[1])
  if gone then return {'gone', gone} end
  return {'none'}
end
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
return {'ok', tostring(version)}
"""
)

# KEYS: session.  ARGV: lease
RELEASE = r"""
if redis.call('HGET', KEYS[1], '_l') == ARGV[1] then
  redis.call('HDEL', KEYS[1], '_l', '_lu')
end
return 1
"""

# KEYS: session.  ARGV: sid, now, deadline, backstop_ms
CLOSE = (
    _CLAIM
    + r"""
local sid = ARGV[1]
local meta = redis.call('HMGET', KEYS[1], '_c', '_d')
if not meta[2] then
  local gone = redis.call('GET', P .. 'gone:' .. sid)
  if gone then return {'gone', gone} end
  return {'none'}
end
if meta[1] == '1' then return {'already'} end
if tonumber(meta[2]) <= tonumber(ARGV[2]) then
  return {'expired', claim(sid, 'idle', meta[2])}
end
redis.call('HSET', KEYS[1], '_c', 1, '_d', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', P .. 'dl', ARGV[3], 's\0' .. sid)
redis.call('ZREM', P .. 'lru', sid)
redis.call('ZADD', P .. 'closed', ARGV[2], sid)
notice('ended', sid, 'closed', nil)
return {'closed'}
"""
)

# KEYS: dl.  ARGV: now, limit
REAP = (
    _CLAIM
    + r"""
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0,
                       tonumber(ARGV[2]))
local out = {}
for i = 1, #due, 2 do
  local member = due[i]
  if string.sub(member, 1, 2) == 's\0' then
    local sid = string.sub(member, 3)
    local closed = redis.call('HGET', P .. 's:' .. sid, '_c')
    local reason = 'idle'
    if closed == '1' then reason = 'closed' end
    out[#out + 1] = claim(sid, reason, due[i + 1])
  else
    local cut = string.find(member, '\0', 3, true)
    local sid = string.sub(member, 3, cut - 1)
    local name = string.sub(member, cut + 1)
    out[#out + 1] = claim_value(sid, name, due[i + 1])
  end
end
return out
"""
)

# KEYS: global.  ARGV: version|'', value
GLOBAL_CAS = r"""
local found = redis.call('HGET', KEYS[1], 'n')
if (found or '') ~= ARGV[1] then return false end
local version = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[1], 'v', ARGV[2])
return version
"""

# KEYS: global.  ARGV: amount, default
# Adds on the server only when the stored value and the amount are plain integers (the
# reply is the stored string, never a Lua number, which would round past 2**53); else
# returns false and the caller adds in Python with a compare-and-set.
GLOBAL_ADD = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'v', ARGV[2], 'n', 0)
end
local current = redis.call('HGET', KEYS[1], 'v')
if string.find(current, '^-?%d+$') == nil or string.find(ARGV[1], '^-?%d+$') == nil then
  return false
end
local added = redis.pcall('HINCRBY', KEYS[1], 'v', ARGV[1])
if type(added) == 'table' and added.err then return false end
redis.call('HINCRBY', KEYS[1], 'n', 1)
return redis.call('HGET', KEYS[1], 'v')
"""


def render(script: str, *, prefix: str, origin: str, channel: str, tombstone_ttl: int) -> str:
    """A script with its per-application constants written in."""
    for text in (prefix, origin, channel):
        if "]==]" in text or "\n" in text:
            raise ValueError(f"{text!r} cannot be used in a Redis key prefix")
    return (
        script.replace("@P@", prefix)
        .replace("@ORIGIN@", origin)
        .replace("@CHANNEL@", channel)
        .replace("@TOMBSTONE@", str(int(tombstone_ttl)))
    )
