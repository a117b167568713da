"""The Lua scripts of the Redis hot state (:mod:`.redis_state`), one decision each.

Redis runs a script atomically, so every read-decide-write below is one step however
many workers send it at once. Times come from Redis ``TIME``, read as seconds since
:data:`ORIGIN` (so every worker and every box reads one clock, and a double keeps
sub-microsecond resolution for decades). Numbers that go back into a command are
formatted by the script itself (``%d``, ``%.17g``): Redis would otherwise write a Lua
number with 14 significant digits.
"""

from __future__ import annotations

ORIGIN = 1_700_000_000  # Unix seconds: Redis TIME is read as seconds since then

_NOW = f"""
local _t = redis.call('TIME')
local now = (tonumber(_t[1]) - {ORIGIN}) + tonumber(_t[2]) / 1000000
"""

# KEYS: 1 the credential's GCRA hash, [2 a sticky session's key], [then the account's
# open-tunnel zset]
# ARGV: 1 rate, 2 burst, 3 expiry ms, 4 1 when KEYS[2] is a session (else 0),
# [5 tunnel member, 6 max tunnels, 7 lease seconds]
# The arithmetic is ratelimit.Gcra.take's (debt formulation, _EPS slack), line for line.
# Returns {allowed, debt before, at before, now, open tunnels before (-1: none asked), taken,
# the session's egress (nil: not pinned, or the request refused)}; the caller replays
# Gcra.take from the state before to build the verdict's fields. The session is read, not
# kept alive: the request may still be refused before it is routed (the caller touches it
# when its route uses the pin).
TAKE = (
    _NOW
    + """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'debt', 'at')
local debt0 = tonumber(s[1]) or 0
local at0 = tonumber(s[2]) or 0
local debt = debt0
if now > at0 then debt = math.max(0, debt0 - (now - at0) * rate) end
local allowed = 0
if debt + 1 <= burst + 0.001 then
  allowed = 1
  redis.call('HSET', KEYS[1], 'debt', string.format('%.17g', debt + 1),
             'at', string.format('%.17g', math.max(now, at0)))
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
local count = -1
local taken = 0
local session = tonumber(ARGV[4])
local tun = KEYS[2 + session]
if tun then
  redis.call('ZREMRANGEBYSCORE', tun, '-inf', string.format('%.17g', now))
  count = redis.call('ZCARD', tun)
  if allowed == 1 and count < tonumber(ARGV[6]) then
    local lease = tonumber(ARGV[7])
    redis.call('ZADD', tun, string.format('%.17g', now + lease), ARGV[5])
    redis.call('PEXPIRE', tun, string.format('%d', (lease + 1) * 1000))
    taken = 1
  end
end
local pinned = false
if session == 1 and allowed == 1 then pinned = redis.call('GET', KEYS[2]) end
return {allowed, string.format('%.17g', debt0), string.format('%.17g', at0),
        string.format('%.17g', now), count, taken, pinned}
"""
)

# KEYS: the tunnel zsets, one per member; ARGV: 1 lease seconds, then the members (aligned)
RENEW = (
    _NOW
    + """
local lease = tonumber(ARGV[1])
local score = string.format('%.17g', now + lease)
local ms = string.format('%d', (lease + 1) * 1000)
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], score, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ms)
end
return #KEYS
"""
)

# KEYS: 1 the address's hash; ARGV: 1 limit, 2 block seconds, 3 window seconds
# local.LoginFailures.record's rule; returns the seconds blocked, as text
LOGIN = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'start', 'count', 'until')
local start = tonumber(f[1]) or now
local count = tonumber(f[2]) or 0
local untl = tonumber(f[3]) or 0
local window = tonumber(ARGV[3])
if now - start > window then start = now; count = 0 end
count = count + 1
if count == tonumber(ARGV[1]) + 1 then untl = now + tonumber(ARGV[2]) end
redis.call('HSET', KEYS[1], 'start', string.format('%.17g', start), 'count', count,
           'until', string.format('%.17g', untl))
redis.call('PEXPIRE', KEYS[1], string.format('%d', (math.max(window, untl - now) + 1) * 1000))
return string.format('%.17g', math.max(0, untl - now))
"""
)

# KEYS: 1 account credit hash, 2 credential credit hash, 3 this worker's set of hashes,
#       4 epoch, 5 this worker's heartbeat, 6 settle, 7 account trial hash
# ARGV: 1 worker, 2 epoch, 3 bytes wanted, 4 account debt, 5 credential debt,
#       6 the reap count read before the snapshot, 7 account ledger allowance,
#       8 n, then n (worker, flushed) pairs,
#       then capped (0/1), credential ledger room, m, then m (worker, flushed) pairs,
#       then ledger trial, the paid credit this worker holds (it may become trial),
#       q, then q (worker, trial flushed) pairs
# Room = allowance - sum over the hash's workers of (claimed - flushed) - debt; the grant
# is min(wanted, rooms), never negative. A debt (bytes charged beyond what was claimed)
# is added whatever the room: it is spent. The trial grant comes out of the bytes held
# (the grant and the paid credit already held), up to the trial room = ledger trial -
# sum of (trial claimed - trial flushed): trial first, and never the same trial twice.
# Returns {grant, trial grant, account room, credential room, trial room, and the same
# three sums over the other workers only, then the other workers that hold or spent
# something there}, or {-1} (epoch changed: Redis restarted) or {-2} (this worker's
# heartbeat is gone: it was taken for dead and reaped) or {-3} (a worker left a hash
# after the snapshot was read: its flushes may be missing from the snapshot's balance,
# so the snapshot must be read again) or {-4} (the settle key lives: workers are still
# writing their claims again after a restart; nothing granted).
CLAIM = """
if redis.call('GET', KEYS[4]) ~= ARGV[2] then return {-1} end
if redis.call('EXISTS', KEYS[5]) == 0 then return {-2} end
local me = ARGV[1]
local read_at = tonumber(ARGV[6])
local holders = {}
local function outstanding(key, base, n)
  local flushed = {}
  for i = 1, n do flushed[ARGV[base + 2 * i - 1]] = tonumber(ARGV[base + 2 * i]) end
  local f = redis.call('HGETALL', key)
  local sum, others = 0, 0
  for i = 1, #f, 2 do
    if f[i] == '~r' then
      if tonumber(f[i + 1]) > read_at then return nil end
    else
      local o = tonumber(f[i + 1]) - (flushed[f[i]] or 0)
      sum = sum + o
      if f[i] ~= me then
        others = others + o
        if o > 0 then holders[f[i]] = true end
      end
    end
  end
  return sum, others
end
local debt_a = tonumber(ARGV[4])
local debt_c = tonumber(ARGV[5])
local na = tonumber(ARGV[8])
local out_a, oth_a = outstanding(KEYS[1], 8, na)
if not out_a then return {-3} end
local room_a = tonumber(ARGV[7]) - out_a - debt_a
local j = 9 + 2 * na
local room_c = room_a
local oth_c = 0
local nc = tonumber(ARGV[j + 2])
if ARGV[j] == '1' then
  local out_c
  out_c, oth_c = outstanding(KEYS[2], j + 2, nc)
  if not out_c then return {-3} end
  room_c = tonumber(ARGV[j + 1]) - out_c - debt_c
end
local k = j + 3 + 2 * nc
local out_t, oth_t = outstanding(KEYS[7], k + 2, tonumber(ARGV[k + 2]))
if not out_t then return {-3} end
local room_t = tonumber(ARGV[k]) - out_t
if redis.call('EXISTS', KEYS[6]) == 1 then return {-4} end
local g = tonumber(ARGV[3])
if room_a < g then g = room_a end
if room_c < g then g = room_c end
if g < 0 then g = 0 end
local gt = g + tonumber(ARGV[k + 1])
if room_t < gt then gt = room_t end
if gt < 0 then gt = 0 end
if g + debt_a ~= 0 then
  redis.call('HINCRBY', KEYS[1], me, string.format('%d', g + debt_a))
end
if g + debt_c ~= 0 then
  redis.call('HINCRBY', KEYS[2], me, string.format('%d', g + debt_c))
end
if gt ~= 0 then
  redis.call('HINCRBY', KEYS[7], me, string.format('%d', gt))
end
redis.call('SADD', KEYS[3], KEYS[1], KEYS[2], KEYS[7])
local out = {g, gt, string.format('%d', room_a), string.format('%d', room_c),
             string.format('%d', room_t), string.format('%d', oth_a),
             string.format('%d', oth_c), string.format('%d', oth_t)}
for w in pairs(holders) do out[#out + 1] = w end
return out
"""

# KEYS: 1 epoch, 2 heartbeat, 3.. credit hashes; ARGV: 1 worker, 2 epoch, 3.. amounts
# (aligned with KEYS from 3): take each amount off this worker's field. Refused like CLAIM.
GIVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return -1 end
if redis.call('EXISTS', KEYS[2]) == 0 then return -2 end
for i = 3, #KEYS do
  redis.call('HINCRBY', KEYS[i], ARGV[1], string.format('%d', -tonumber(ARGV[i])))
end
return 1
"""

# KEYS: 1 the newest configuration version a worker read; ARGV: 1 a version just read,
# 2 expiry ms. Raises the key to ARGV[1] (never lowers it); returns the key's value.
VERSION = """
local v = tonumber(redis.call('GET', KEYS[1]) or '-1')
local mine = tonumber(ARGV[1])
if mine > v then
  v = mine
end
redis.call('SET', KEYS[1], string.format('%d', v), 'PX', ARGV[2])
return v
"""

# KEYS: 1 epoch; ARGV: 1 a fresh epoch. The epoch, set to ARGV[1] when missing (a new or
# restarted Redis). Returns {epoch, 1 if this call set it}.
EPOCH = """
local e = redis.call('GET', KEYS[1])
if e then return {e, 0} end
redis.call('SET', KEYS[1], ARGV[1])
return {ARGV[1], 1}
"""

# KEYS: 1 epoch, 2 heartbeat, 3 workers, 4 this worker's set of hashes, 5 settle,
#       6.. credit hashes; ARGV: 1 worker, 2 epoch, 3 heartbeat ms, 4 settle ms (0: none),
#       5 unused, 6.. this worker's claimed totals (aligned with KEYS from 6).
# Sets this worker's fields to what it knows it claimed, and its heartbeat.
REASSERT = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return -1 end
if ARGV[4] ~= '0' then redis.call('SET', KEYS[5], '1', 'PX', ARGV[4]) end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
for i = 6, #KEYS do
  redis.call('HSET', KEYS[i], ARGV[1], ARGV[i])
  redis.call('SADD', KEYS[4], KEYS[i])
end
return 1
"""

# KEYS: 1 epoch, 2 heartbeat, 3 workers; ARGV: 1 worker, 2 epoch, 3 heartbeat ms
# Refresh the heartbeat; -1: epoch changed, -2: the heartbeat had lapsed (re-assert).
HEARTBEAT = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return -1 end
if redis.call('EXISTS', KEYS[2]) == 0 then return -2 end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

# KEYS: 1 the worker's heartbeat, 2 its set of hashes, 3 workers, 4 the reap count;
# ARGV: 1 the worker. Remove a dead worker's field from every hash it touched, and mark
# each such hash with the new reap count (field ``~r``): a snapshot read before this
# reap may miss the worker's last flushes, which its field stood for until now (CLAIM
# refuses such a snapshot). Returns 1 when this call removed the worker, 0 when it is
# alive or another reaper got there first. (The hashes come from the set, not from
# KEYS: fine on one Redis, not on a cluster.)
REAP = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 0 then return 0 end
local n = redis.call('INCR', KEYS[4])
for _, h in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  redis.call('HDEL', h, ARGV[1])
  redis.call('HSET', h, '~r', n)
end
redis.call('DEL', KEYS[2])
return redis.call('SREM', KEYS[3], ARGV[1])
"""
