"""The Redis scripts of global states: a compare-and-set and an addition, each on the
global's hash (``v`` value, ``n`` version) and idempotent by its request key. A write
publishes ``{"k": "global", "s": "", "n": [name], "o": origin}`` on the app's channel of global
notices (plain pub/sub, also on a cluster, where each global lives on a slot of its
own), for other processes' change streams."""

from __future__ import annotations

from ._redis_requests import ONCE

__all__ = ["GLOBAL_ADD", "GLOBAL_CAS"]

# The start of the globals' scripts: KEYS[1] the global, KEYS[2] the request's key,
# ARGV[1] the milliseconds its reply is remembered, the handle's origin, the global's
# name and the app's channel of global notices, separated by spaces.
_GLOBAL = (
    r"""
local REQ = KEYS[2]
local REQUEST_MS, ORIGIN, NAME, CHANNEL = string.match(ARGV[1], '^(%d+) (%S+) (%S+) (.+)$')
"""
    + ONCE
    + r"""
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'hash' and kind ~= 'none' then return {'wrongtype'} end
local function changed()
  redis.call('PUBLISH', CHANNEL, cjson.encode({k = 'global', s = '', n = {NAME}, o = ORIGIN}))
end
"""
)

# KEYS: global, request.  ARGV: (1), version|'', value
GLOBAL_CAS = (
    _GLOBAL
    + r"""
local found = redis.call('HGET', KEYS[1], 'n')
if (found or '') ~= ARGV[2] then return false end
local version = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[1], 'v', ARGV[3])
changed()
return remember(version)
"""
)

# KEYS: global, request.  ARGV: (1), amount, default
# Adds on the server only when the stored value and the amount are plain integers (the
# reply is the stored string, never a Lua number, which would round past 2**53); else
# returns false and the caller adds in Python with a compare-and-set.
GLOBAL_ADD = (
    _GLOBAL
    + r"""
local function is_version(text)
  return text ~= nil and #text <= 15 and string.find(text, '^%d+$') ~= nil
end
if kind == 'none' then
  redis.call('HSET', KEYS[1], 'v', ARGV[3], 'n', 0)
end
local found = redis.call('HMGET', KEYS[1], 'v', 'n')
local current = found[1]
if not current or not is_version(found[2]) then return {'corrupt'} end
if string.find(current, '^-?%d+$') == nil or string.find(ARGV[2], '^-?%d+$') == nil then
  return false
end
local added = redis.pcall('HINCRBY', KEYS[1], 'v', ARGV[2])
if type(added) == 'table' and added.err then return false end
redis.call('HINCRBY', KEYS[1], 'n', 1)
changed()
return remember(redis.call('HGET', KEYS[1], 'v'))
"""
)
