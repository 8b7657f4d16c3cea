"""The Redis scripts of an event's lease besides the load that takes it and the commit
that keeps or gives it back: giving it back without a commit (``RELEASE``) and renewing
it (``RENEW``), each fenced by the lease's token: a lease another event took is neither
given back nor renewed."""

from __future__ import annotations

from ._redis_fragments import LEASE_WRITE

__all__ = ["RELEASE", "RENEW"]

# KEYS: session.  ARGV: lease.  Idempotent by nature: no request key. An event's lease
# is given back on the master only (its replicas never saw it); a kept one, which they
# know, is given back on them too.
RELEASE = (
    LEASE_WRITE
    + r"""
if redis.call('TYPE', KEYS[1]).ok == 'hash' then
  local held = redis.call('HMGET', KEYS[1], '_l', '_lk')
  if held[1] == ARGV[1] and held[2] == ARGV[1] then
    redis.call('HDEL', KEYS[1], '_l', '_lu', '_lk')
  elseif held[1] == ARGV[1] then
    lease_write('HDEL', KEYS[1], '_l', '_lu', '_lk')
  end
end
return 1
"""
)

# KEYS: session. ARGV: lease token, new lease end.
RENEW = (
    LEASE_WRITE
    + r"""
if redis.call('TYPE', KEYS[1]).ok == 'hash' and redis.call('HGET', KEYS[1], '_l') == ARGV[1] then
  lease_write('HSET', KEYS[1], '_lu', ARGV[2])
  return 1
end
return 0
"""
)
