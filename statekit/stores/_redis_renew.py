"""The Redis script that renews an event's lease (``RedisNamespace.renew``), fenced by
the lease's token as a commit is: a lease another event took is not renewed."""

from __future__ import annotations

__all__ = ["RENEW"]

# KEYS: session. ARGV: lease token, new lease end.
RENEW = r"""
if redis.call('TYPE', KEYS[1]).ok == 'hash' and redis.call('HGET', KEYS[1], '_l') == ARGV[1] then
  redis.call('HSET', KEYS[1], '_lu', ARGV[2])
  return 1
end
return 0
"""
