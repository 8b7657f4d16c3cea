"""The Lua scripts of the Redis store: each store operation is one atomic script.

**Constants.** A script's text never changes: it is the same for every application,
key prefix, process and handle, so the server's script cache holds each one once,
however many engines, handles and forked workers use it. What differs from call to
call (the origin and channel of notices, lifetimes, times, ids) travels in ARGV, and
every key a script reads or writes is declared in KEYS, as Redis asks of scripts.

**Keys.** A session's keys share its bucket's hash tag (see ``_redis_layout``), so each
script runs on one cluster slot: ``s:<sid>`` is a session hash (``_v`` version, ``_c``
closed, ``_d`` deadline, ``_l``/``_lu`` lease and its end, ``_lk`` the token of a lease
kept between events, ``v:<name>`` values, ``t:<name>`` value deadlines); the bucket's
``dl`` is its deadline index (a sorted set of ``s\\0<sid>`` and ``v\\0<sid>\\0<name>``);
``lru`` and ``closed`` order its open sessions by last use and closed ones by close
time; ``gone:<sid>`` remembers why a session ended; ``q:<request id>`` remembers the
reply of a write for a while. A global is a hash ``g:<name>`` (``v`` value, ``n``
version) with request keys of its own tag. Times travel as the strings Python wrote, so
Lua never rounds them.

**Layout.** The seven scripts about an application's sessions (CREATE, EVICT, LOAD,
PEEK, COMMIT, CLOSE, REAP) begin alike: KEYS[1] is the deadline index ``dl`` and KEYS[2]
the request's key, then, in the six that may claim (all but COMMIT), KEYS[3] and
KEYS[4] the capacity orders ``lru`` and ``closed``. ARGV[1] holds the handle's
settings, separated by spaces: the milliseconds a write's reply is remembered, the
milliseconds a reply that only carries claims is, the seconds an ended id is
remembered, the handle's origin, the command that publishes a notice (``PUBLISH``, or
``SPUBLISH`` on a cluster) and the bucket's notice channel (one argument rather than
six: each one costs the client time to send). A script about one session takes its
hash and tombstone as its last two keys, and its id as ARGV[2]. The globals' scripts
take the global and the request's key, and the milliseconds first.

**Keys found on the way.** A reap claims the sessions the deadline index names, and an
open at capacity evicts the least recently used: keys that are not known before the
script runs. The caller reads the candidates first (a plain ``ZRANGEBYSCORE``; an open
is answered ``{'full', victims}`` by its script, which then writes nothing) and runs
the script again with their hashes and tombstones declared; the script checks every
candidate again, atomically (still in the index and due, still the one to evict), so
that each entry is claimed by one caller only, and passes over one that moved on.
With several buckets, an open cannot see the other buckets' sessions: it is stored
first, and the oldest sessions of all buckets, read by the caller, are evicted by
``EVICT`` in their own buckets, each checked again the same way (``_redis_spread``).

**Idempotent writes.** Every script that writes takes a key made of a request id that
the caller draws once per operation. Before doing anything, the script looks for a
reply remembered under that key and, if there is one, returns it unchanged: a request
sent again (by a client that retries after a lost connection, or by the store itself)
is answered with the first outcome and applied once. A script remembers its reply
when running it again would not give the same answer: a commit, an open, a close, a
global write, and any load, peek or reap that claimed something. ``REPLAY`` reads a
remembered reply back, for a request whose answer never came. A commit's reply is
remembered on its master only; its outcome also travels to the replicas with its write,
in the session's hash (``_q0`` to ``_q3``: the last four commits' request ids, each with
the version it made): a commit sent again after a failover or a restart lost its
request key still gets its first outcome, unless four other commits of that session
came in between.

**What replicas get.** A commit sends them one ``HSET`` (values, version, its outcome,
and a kept lease's new state), where it sent a ``MULTI`` of four commands; a load sends
them nothing. Each replicated command costs the master and each replica work of their
own, and the AOF grows with the same stream. So an event's lease (taken by a load,
renewed, given back) is written with ``lease_write`` (``redis.set_repl(
redis.REPL_NONE)``): on the master only. A kept lease, and the end of a kept lease a
commit gives back (its fields emptied, not deleted), are in the commit's ``HSET``;
ending a kept lease otherwise (a load that turns it into an event's, or giving it back
without a commit) is replicated too. So a promoted
replica knows every kept lease (its keeper stays the only one using the session), and
no event's lease: an event that held one through a failover has its commit refused
(``LeaseLost``), nothing written twice. Notices stay replicated (on one server a
commit's write is then a ``MULTI`` of its ``HSET`` and ``PUBLISH``): a listener still
subscribed to a master demoted behind the address it knows hears them. Left as they
are: a replica that copied its master whole (a full resync), or an AOF rewritten while
an event held its lease, holds that lease until it ends (``lease_ttl`` at most) if it
is promoted or restarted before the session's next commit; and a master demoted to a
replica keeps the request keys of its last commits (they expire once it is a master
again, or at a full resync).

**Damaged data.** Fields the scripts read as numbers, and the types of the keys they
use, are checked before anything is written: a session with a damaged field is
answered ``{'corrupt', field}``, one whose key holds another type ``{'wrongtype'}``,
and left in place; a script that would write to a damaged index stops before it
writes anything (``{'damaged', key}``); a member of an index that names nothing (or
is not one statekit writes) is removed and reported, so that one bad entry never stops
reaping or opening sessions.
"""

from __future__ import annotations

from ._redis_fragments import APP as _APP
from ._redis_fragments import CAPACITY as _CAPACITY
from ._redis_fragments import CLAIMS as _CLAIMS
from ._redis_fragments import INDEX_CHECK as _INDEX_CHECK
from ._redis_fragments import INDEXES as _INDEXES
from ._redis_fragments import LEASE_WRITE as _LEASE_WRITE
from ._redis_fragments import PUT_VALUES as _PUT_VALUES
from ._redis_fragments import SESSION as _SESSION
from ._redis_global_scripts import GLOBAL_ADD, GLOBAL_CAS
from ._redis_joint import JOINT
from ._redis_leases import RELEASE, RENEW
from ._redis_requests import ONCE, REPLAY
from ._redis_staged import APPLY, DECIDE, DISCARD, RESOLVE, STAGE

__all__ = ["TEXTS"]

_CLAIMING = _APP + _CLAIMS + ONCE + _INDEXES
# CREATE, EVICT and REAP also find and claim sessions of keys found on the way.
_EVICTING = _APP + _CLAIMS + _CAPACITY + ONCE + _INDEXES
# LOAD checks the indexes only before it writes to one (see INDEX_CHECK).
_CLAIMING_LAZILY = _APP + _CLAIMS + ONCE + _INDEX_CHECK

# KEYS: dl, request, lru, closed, session, then the hash and tombstone of each victim.
# ARGV: (1), sid, now, deadline, capacity, backstop_ms, 'free'|'prefer', then the
#       victims' ids.
# Returns {'ok', evicted, junk, size}: the sessions evicted, index entries that named
# nothing, and the sessions the bucket holds now; {'taken'}; or {'full', candidates}
# (nothing written) when too few of the declared candidates are left to evict: the
# oldest sessions, a few more than needed, which the caller declares when it asks
# again.
CREATE = (
    _EVICTING
    + r"""
local KEY, SID = KEYS[5], ARGV[2]
if redis.call('EXISTS', KEY) == 1 then
  return {'taken'}
end
local need = redis.call('ZCARD', LRU) + redis.call('ZCARD', CLOSED) - tonumber(ARGV[5]) + 1
local victims = {}
local slots = declared(6, 8, #ARGV)
if need > 0 then
  -- The sessions to evict: among the candidates this call declared (the oldest,
  -- closed ones first, when the caller read them), those still indexed. Another
  -- process may have evicted some meanwhile: the next candidates serve instead.
  -- Sessions held by a lease are passed over; with 'prefer' (candidates just named by
  -- the script, so the oldest of all) they are taken when too few others are left
  -- (kept leases first, each kind oldest first), else the script names the oldest
  -- again.
  local held
  victims, held = pick(8, slots, need, ARGV[3], true)
  if ARGV[7] == 'prefer' then  -- kept leases first, then events'
    for level = 1, 2 do
      for _, sid in ipairs(held[level]) do
        if #victims >= need then break end
        victims[#victims + 1] = sid
      end
    end
  end
  if #victims < need then
    -- Too few left: name the oldest again, with room to spare for the next try.
    local window = {}
    local picked = {}
    for _, index in ipairs({CLOSED, LRU}) do
      for _, sid in ipairs(redis.call('ZRANGE', index, 0, need + 31)) do
        if #window < need + 32 and not picked[sid] then
          picked[sid] = true
          window[#window + 1] = sid
        end
      end
    end
    return {'full', window}
  end
end
local evicted, junk = evict(victims, slots, ARGV[3])
redis.call('HSET', KEY, '_v', 0, '_c', 0, '_d', ARGV[4])
redis.call('PEXPIRE', KEY, ARGV[6])
redis.call('ZADD', DL, ARGV[4], 's\0' .. SID)
redis.call('ZADD', LRU, ARGV[3], SID)
return remember({'ok', evicted, junk, redis.call('ZCARD', LRU) + redis.call('ZCARD', CLOSED)})
"""
)

# KEYS: dl, request, lru, closed, then the hash and tombstone of each victim.
# ARGV: (1), now, 'free'|'any', the most to evict, then the ids of sessions to evict,
#       oldest first (the caller chose them among the oldest of every bucket, when the
#       app's sessions are spread over several).
# Returns {'ok', evicted, junk} as CREATE does, then, with 'free', the ids passed over
# because a lease holds them: kept leases', then events' (both empty with 'any'); a
# victim no longer in a capacity order (another process took it) is passed over.
EVICT = (
    _EVICTING
    + r"""
local slots = declared(5, 5, #ARGV)
local victims, held = pick(5, slots, tonumber(ARGV[4]), ARGV[2], ARGV[3] == 'free')
local evicted, junk = evict(victims, slots, ARGV[2])
local reply = {'ok', evicted, junk, held[1], held[2]}
if #evicted > 0 then return remember_claims(reply) end
return reply
"""
)

# KEYS: dl, request, lru, closed, session, tombstone.
# ARGV: (1), sid, now, touch_until|'', lease|'', lease_until, backstop_ms
LOAD = (
    _CLAIMING_LAZILY
    + _SESSION
    + _LEASE_WRITE
    + r"""
local now = tonumber(ARGV[3])
local h = redis.pcall('HGETALL', KEY)
if h.err then return {'wrongtype'} end
-- One pass over the hash, by the first two bytes of each field's name: the session's
-- own fields ('_'), its values ('v:') and their deadlines ('t:'), noting those due
-- and the first damaged one (answered below, after what outranks it).
local fields = {}
local values = {}
local due = nil
local bad_ttl = nil
for i = 1, #h, 2 do
  local f = h[i]
  local first, second = string.byte(f, 1, 2)
  if first == 95 then  -- '_'
    fields[f] = h[i + 1]
  elseif second == 58 then  -- ':'
    if first == 118 then  -- 'v'
      values[#values + 1] = string.sub(f, 3)
      values[#values + 1] = h[i + 1]
    elseif first == 116 then  -- 't'
      local at = number(h[i + 1])
      if not at then
        bad_ttl = bad_ttl or f
      elseif at <= now then
        due = due or {}
        due[string.sub(f, 3)] = h[i + 1]
      end
    end
  end
end
local version, closed, deadline_text, lease = fields._v, fields._c, fields._d, fields._l
if lease == '' then lease = nil end  -- given back by a commit
if not deadline_text then return missing(GONE) end
local bad = damaged(version, deadline_text)
if bad then return {'corrupt', bad} end
if lease and not number(fields._lu) then return {'corrupt', '_lu'} end
local deadline = tonumber(deadline_text)
if deadline <= now then
  local bad_index = damaged_index()
  if bad_index then return bad_index end
  return expired(SID, KEY, GONE, {version, closed, deadline_text})
end
if bad_ttl then return {'corrupt', bad_ttl} end
if ARGV[5] ~= '' and lease and lease ~= ARGV[5] and tonumber(fields._lu) > now then
  if fields._lk == lease then ask_keeper(SID) end
  return {'busy', fields._lu}
end
-- Claiming a value writes to the indexes: checked first. Sliding the deadline writes
-- to them first (see slide), before the lease is taken.
if due then
  local bad_index = damaged_index()
  if bad_index then return bad_index end
end
if slides(closed, deadline, ARGV[3], ARGV[4]) then
  local bad_index = slide(KEY, SID, ARGV[3], ARGV[4], ARGV[7], deadline_text)
  if bad_index then return bad_index end
end
if ARGV[5] ~= '' then
  -- The lease makes an open at capacity (of its own user's record, say) pass the
  -- session over while the event holds it; its place in the capacity order moves with
  -- its deadline only (touch below), by a second or more (a tenth of the idle ttl, if
  -- that is shorter).
  -- An event's lease now, not a kept one (its engine loads with the kept token when
  -- the kept lease is too short to use, another once it lapsed): an open at capacity
  -- passes it over. The replicas knew the kept lease: they learn of its end.
  if fields._lk and fields._lk ~= '' then
    redis.call('HSET', KEY, '_l', '', '_lu', '0', '_lk', '')
  end
  lease_write('HSET', KEY, '_l', ARGV[5], '_lu', ARGV[6])
end
local claimed = {}
if due then
  -- Values past their ttl are claimed, not loaded.
  local kept = {}
  for j = 1, #values, 2 do
    if not due[values[j]] then
      kept[#kept + 1] = values[j]
      kept[#kept + 1] = values[j + 1]
    end
  end
  values = kept
  for name, at in pairs(due) do
    -- nil (and only the stray deadline removed) when the value is not there
    claimed[#claimed + 1] = claim_value(KEY, SID, name, at)
  end
end
local reply = {'ok', version, closed or '0', values, claimed}
if fields._tx then reply[6] = fields._tx end  -- a user's record, with a commit staged
if #claimed > 0 then return remember_claims(reply) end
return reply
"""
)

# KEYS: dl, request, lru, closed, session, tombstone.
# ARGV: (1), sid, now, touch_until|'', name, backstop_ms
PEEK = (
    _CLAIMING
    + _SESSION
    + r"""
local now = tonumber(ARGV[3])
local name = ARGV[5]
local meta = redis.pcall('HMGET', KEY, '_v', '_c', '_d', 'v:' .. name, 't:' .. name)
if meta.err then return {'wrongtype'} end
if not meta[3] then return missing(GONE) end
local bad = damaged(meta[1], meta[3])
if bad then return {'corrupt', bad} end
local deadline = tonumber(meta[3])
if deadline <= now then return expired(SID, KEY, GONE, meta) end
local values = {}
local expired = {}
if meta[5] then
  local at = number(meta[5])
  if not at then return {'corrupt', 't:' .. name} end
  if at <= now then
    expired[1] = claim_value(KEY, SID, name, meta[5])
  end
end
if meta[4] and not expired[1] then
  values = {name, meta[4]}
end
-- A read is answered even when the server refuses its slide for reasons of its own
-- (out of memory, too few replicas: nothing was written then), as Redis serves reads;
-- but a master demoted to a replica says so, for the client to follow the failover.
local refused = touch(KEY, SID, meta[2], deadline, ARGV[3], ARGV[4], ARGV[6])
if refused and refused.err and string.sub(refused.err, 1, 8) == 'READONLY' then
  return refused
end
local reply = {'ok', meta[1], meta[2] or '0', values, expired}
if expired[1] then return remember_claims(reply) end
return reply
"""
)

# KEYS: dl, request, session, tombstone (keeping the lease: dl, request, lru, session,
#       tombstone).
# ARGV: (1), sid, version, lease|'', release '1'|'0'|'k <lease end> <deadline> <now>
#       <backstop_ms>', then name, value, deadline|'' for each write.
# Its reply is remembered twice (see "Idempotent writes"): under its request key, on
# this master only; and in the session's hash, with the values: ``_q<version % 4>`` is
# ``<request id>:<version>[:g]`` (':g' when it gave a kept lease back), so the hash
# holds the last four commits' outcomes, each in a field short enough for Redis's
# compact encoding of small hashes.
COMMIT = (
    _APP
    + ONCE
    + _INDEX_CHECK
    + _SESSION
    + _PUT_VALUES
    + _LEASE_WRITE
    + r"""
local RID = string.sub(REQ, -16)  -- the request's id (see request() in the namespace)
-- The session's version, lease, deadline, closed mark and last four commits, then
-- (for up to 200 values) the deadline of each value written, if it has one.
local asked = {'_v', '_l', '_d', '_c', '_q0', '_q1', '_q2', '_q3', '_lk'}
local read_ttls = #ARGV - 5 <= 600
if read_ttls then
  for j = 6, #ARGV, 3 do asked[#asked + 1] = 't:' .. ARGV[j] end
end
local meta = redis.pcall('HMGET', KEY, unpack(asked))
if meta.err then return {'wrongtype'} end
if not meta[1] then return missing(GONE) end
-- Sent again, and applied already (its request key was lost with a master that
-- failed over, or with a restart): its first outcome.
local mine = RID .. ':'
for i = 5, 8 do
  local entry = meta[i]
  if entry and string.sub(entry, 1, #mine) == mine then
    local made, flag = string.match(entry, '^%x+:(%d+)(:?g?)$')
    if made and flag == ':g' then return {'ok', made, 'given back'} end
    if made then return {'ok', made} end
  end
end
if not is_version(meta[1]) then return {'corrupt', '_v'} end
if meta[1] ~= ARGV[3] or (ARGV[4] ~= '' and meta[2] ~= ARGV[4]) then
  return {'conflict', meta[1]}
end
-- Keeping the lease (ARGV[5] 'k <lease end> <deadline> <now> <backstop_ms>'): it
-- lasts until the new end, marked as kept, and the session's deadline slides as a
-- load's would (the next event here may skip its load).
local keep_until, touch_until, keep_now, backstop =
  string.match(ARGV[5], '^k (%S+) (%S+) (%S+) (%S+)$')
local slide = false
if keep_until and meta[2] == ARGV[4] and meta[4] ~= '1' and number(meta[3]) then
  local wanted = tonumber(touch_until)
  slide = wanted - tonumber(meta[3]) >= math.min(1, (wanted - tonumber(keep_now)) / 10)
  if slide then
    local kind = redis.call('TYPE', KEYS[3]).ok
    if kind ~= 'zset' and kind ~= 'none' then return {'damaged', KEYS[3]} end
  end
end
-- Sliding the deadline, or giving a value a deadline or taking one away, writes to
-- the index: checked first (most commits do neither).
local had = nil
local indexes = slide or not read_ttls
if read_ttls then
  had = {}
  local k = 10
  for j = 6, #ARGV, 3 do
    if meta[k] then
      had[ARGV[j]] = true
      indexes = true
    end
    if ARGV[j + 2] ~= '' then indexes = true end
    k = k + 1
  end
end
if indexes then
  local bad_index = damaged_index()
  if bad_index then return bad_index end
end
-- The values, their deadlines, the next version, this commit's outcome and a kept
-- lease's new state in one HSET (put_values): the one write its replicas get.
local version = string.format('%d', tonumber(meta[1]) + 1)
-- A session closed meanwhile is not kept: its lease is given back (and the reply
-- says so), so that the next event loads it and sees it closed.
local given_back = keep_until and meta[4] == '1'
local sets = {
  '_v', version, '_q' .. (tonumber(version) % 4), mine .. version .. (given_back and ':g' or '')
}
-- The lease given back: an event's on the master only (below), a kept one (which the
-- replicas know) in this write.
local releasing = ARGV[4] ~= '' and (ARGV[5] == '1' or given_back)
local was_kept = is_kept(meta[2], meta[9])
if keep_until and not given_back then
  -- Kept: the replicas know it, so that a promoted one keeps it too.
  for _, v in ipairs({'_l', ARGV[4], '_lu', keep_until, '_lk', ARGV[4]}) do
    sets[#sets + 1] = v
  end
elseif releasing and was_kept then  -- emptied rather than deleted: in this write
  for _, v in ipairs({'_l', '', '_lu', '0', '_lk', ''}) do sets[#sets + 1] = v end
end
if slide then
  sets[#sets + 1] = '_d'
  sets[#sets + 1] = touch_until
  redis.call('PEXPIRE', KEY, backstop)
  redis.call('ZADD', DL, touch_until, 's\0' .. SID)
  redis.call('ZADD', KEYS[3], keep_now, SID)
end
local names = put_values(KEY, DL, SID, ARGV, 6, #ARGV, sets, had)
if releasing and not was_kept then
  lease_write('HDEL', KEY, '_l', '_lu', '_lk')
end
notice('changed', SID, nil, names)
local reply = {'ok', version}
if given_back then reply[3] = 'given back' end
-- Remembered here only: the recent commits above are what a replica knows of it.
redis.set_repl(redis.REPL_NONE)
redis.call('SET', REQ, cmsgpack.pack(reply), 'PX', REQUEST_MS)
redis.set_repl(redis.REPL_ALL)
return reply
"""
)

# KEYS: dl, request, lru, closed, session, tombstone.
# ARGV: (1), sid, now, deadline, backstop_ms
CLOSE = (
    _CLAIMING
    + _SESSION
    + r"""
local meta = redis.pcall('HMGET', KEY, '_c', '_d', '_v', '_l', '_lk')
if meta.err then return {'wrongtype'} end
if not meta[2] then return missing(GONE) end
if meta[1] == '1' then return {'already'} end
local bad = damaged(meta[3], meta[2])
if bad then return {'corrupt', bad} end
if tonumber(meta[2]) <= tonumber(ARGV[3]) then
  return remember({'expired', claim(SID, KEY, GONE, 'idle', meta[2])})
end
redis.call('HSET', KEY, '_c', 1, '_d', ARGV[4])
redis.call('PEXPIRE', KEY, ARGV[5])
redis.call('ZADD', DL, ARGV[4], 's\0' .. SID)
redis.call('ZREM', LRU, SID)
redis.call('ZADD', CLOSED, ARGV[3], SID)
notice('ended', SID, 'closed', nil)
if is_kept(meta[4], meta[5]) then ask_keeper(SID) end
return remember({'closed'})
"""
)

# KEYS: dl, request, lru, closed, then the hash and tombstone of each session in ARGV.
# ARGV: (1), now, limit, how many sessions, their ids, then the members of the deadline
#       index to look at, as the caller read them (due, earliest first).
# Returns {ended, junk}: what was claimed (at most limit entries), and members that
# named nothing claimable, removed (junk). A member no longer in the index, or no
# longer due, was taken or moved by another caller meanwhile: it is passed over. Every
# other member looked at leaves the index (or is indexed anew at its session's own
# deadline), so one bad member never stops the others. Junk is not remembered:
# removing it again is harmless.
REAP = (
    _EVICTING
    + r"""
local now = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local first = 5 + tonumber(ARGV[4])
local slots = declared(5, 5, first - 1)
local out = {}
local junk = {}
for i = first, #ARGV do
  if #out >= limit then break end
  local member = ARGV[i]
  local at = redis.call('ZSCORE', DL, member)
  if at and tonumber(at) <= now then
    local kind = string.sub(member, 1, 2)
    local sid = nil
    local name = nil
    if kind == 's\0' then
      sid = string.sub(member, 3)
    elseif kind == 'v\0' then
      local cut = string.find(member, '\0', 3, true)
      if cut then
        sid = string.sub(member, 3, cut - 1)
        name = string.sub(member, cut + 1)
      end
    end
    local slot = sid and slots[sid]
    local key = slot and KEYS[slot]
    local session = nil
    if key and not name and is_hash(key) then
      session = redis.call('HMGET', key, '_c', '_d')
    end
    if session and number(session[2]) and number(session[2]) <= now then
      local reason = 'idle'
      if session[1] == '1' then reason = 'closed' end
      out[#out + 1] = claim(sid, key, KEYS[slot + 1], reason, at)
    elseif session and number(session[2]) then
      -- The index is behind the session's own deadline, which rules: index it anew.
      redis.call('ZADD', DL, session[2], member)
      junk[#junk + 1] = member
    elseif key and name then
      local item = nil
      -- Only a value whose own deadline is due: an entry naming a live value
      -- without one is junk, not an order to delete it.
      if is_hash(key) then
        local due = number(redis.call('HGET', key, 't:' .. name))
        if due and due <= now then item = claim_value(key, sid, name, at) end
      end
      if item then
        out[#out + 1] = item
      else
        redis.call('ZREM', DL, member)
        junk[#junk + 1] = member
      end
    else
      -- Names no session, or a session whose deadline is damaged (its loads say so).
      redis.call('ZREM', DL, member)
      junk[#junk + 1] = member
    end
  end
end
if #out > 0 then remember_claims({out, {}}) end
return {out, junk}
"""
)


#: The text of every script, by name.
TEXTS: dict[str, str] = {
    "CREATE": CREATE,
    "EVICT": EVICT,
    "LOAD": LOAD,
    "PEEK": PEEK,
    "COMMIT": COMMIT,
    "JOINT": JOINT,
    "STAGE": STAGE,
    "DECIDE": DECIDE,
    "APPLY": APPLY,
    "DISCARD": DISCARD,
    "RESOLVE": RESOLVE,
    "RELEASE": RELEASE,
    "RENEW": RENEW,
    "CLOSE": CLOSE,
    "REAP": REAP,
    "REPLAY": REPLAY,
    "GLOBAL_CAS": GLOBAL_CAS,
    "GLOBAL_ADD": GLOBAL_ADD,
}
