"""Idempotent writes in the Redis store's scripts (see "Idempotent writes" in
``_redis_scripts``): the fragment every script that writes begins with, which answers
a request sent again with its first outcome, and ``REPLAY``, which reads a remembered
reply back for a request whose answer never came."""

from __future__ import annotations

__all__ = ["ONCE", "REPLAY"]

# After the locals REQ and REQUEST_MS, in every script that writes.
ONCE = r"""
local seen = redis.call('GET', REQ)
if seen then return cmsgpack.unpack(seen) end
local function remember(reply)
  redis.call('SET', REQ, cmsgpack.pack(reply), 'PX', REQUEST_MS)
  return reply
end
"""


# KEYS: request.  Returns {1, reply} with the reply remembered for a request, or {0}.
REPLAY = r"""
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then return {0} end
return {1, cmsgpack.unpack(redis.call('GET', KEYS[1]))}
"""
