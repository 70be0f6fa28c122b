"""The Lua scripts behind the Redis store's atomic operations.

Each script touches one key (`KEYS[1]`), and `RESERVE` and `SETTLE` with an operation id also that operation's
record (`KEYS[2]`), which `op_key` names so that it hashes to the same slot: every script runs on one slot in
Redis Cluster whatever the key is, with no hash tag asked of the caller (who may still add `{...}` to co-locate
keys of its own). They are registered once per client (`register_script`: EVALSHA, reloaded automatically after
NOSCRIPT). Amounts arrive as integer strings (millionths, see `AMOUNT_SCALE`) and are passed to INCRBY unchanged,
so nothing is ever formatted from a Lua number. TTLs are milliseconds; an empty string means none. A script that
refuses (a value that is not a counter) does so before its first write: Redis does not undo a script's writes.

Budget leases: a reservation under an operation id may also hold a lease (`KEYS[3]`: a sorted set of op ids beside
the counter, `op_key(counter, LEASES, prefix)`, scored by expiry on Redis's clock), so that one a dead replica never
settles does not count as spend for the rest of its period. Each reservation against that counter first sweeps up
to `SWEEP_LIMIT` expired leases (`_SWEEP`): an expired op's record, read under `head .. op` (`head`:
`op_key(counter, "", prefix)`, every record's name but its op id), gives back what it holds. Those records are keys
the script does not declare: they are in the counter's hash slot by construction (`op_key`), which is all Redis
asks of a script without shebang flags, on one server, behind Sentinel and on Redis Cluster.
"""
from __future__ import annotations

__all__ = [
    "ACQUIRE_SLOT", "COMPARE_AND_DELETE", "COMPARE_AND_SET", "GET_WINDOW", "INCR_WINDOW", "LEASES", "RELEASE_SLOT",
    "RESERVE", "RESERVE_TOGETHER", "RESERVE_WINDOW", "SETTLE", "SWEEP_LIMIT", "op_key",
]

LEASES = "leases"
"""The name of a counter's leases among its operations' records (`op_key(counter, LEASES, prefix)`): an op id is 16
hex characters, never this."""
SWEEP_LIMIT = 32
"""Expired leases a reservation sweeps at most per counter (its cost stays bounded; the next one takes more)."""

_SWEEP = """
local function sweep(counter, leases, head, now)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, SWEEP_LIMIT)
  if #expired == 0 then return false end
  local live = redis.call('EXISTS', counter) == 1
  for _, op in ipairs(expired) do
    local record = head .. op
    local held = redis.call('GET', record)
    local units = held and tonumber(held)
    if units and units > 0 then
      if live and redis.call('DECRBY', counter, held) < 0 then redis.call('SET', counter, '0', 'KEEPTTL') end
      redis.call('SET', record, '0', 'KEEPTTL')
    end
  end
  redis.call('ZREM', leases, unpack(expired))
  return true
end
local function lease(counter, record, leases, keep, lease_ms, head, now)
  redis.call('ZADD', leases, now + tonumber(lease_ms), string.sub(record, #head + 1))
  local ttl = math.max(tonumber(keep), redis.call('PTTL', counter))
  redis.call('PEXPIRE', record, ttl)
  if redis.call('PTTL', leases) < ttl then redis.call('PEXPIRE', leases, ttl) end
end
""".replace("SWEEP_LIMIT", str(SWEEP_LIMIT))
"""`sweep`: give back what each of up to `SWEEP_LIMIT` expired leases' records holds (never from a counter that
no longer exists: one whose period ended is not made again, without a TTL; never below 0), mark the record `0`
(released: a settle that comes after all, from a replica that was only slow, replaces that 0 by its actual cost),
drop the leases; whether any was expired (the counter then read again). A record that holds no positive number
(settled, released, gone) gives nothing back. `lease`: lease (or renew) the op for `lease_ms` from `now`, its
record kept as long as the lease plus a margin (`keep`) or the counter, whichever is longer (a dead op's record
must outlive its lease until a reservation sweeps it, which may come only late in the counter's period), the set
as long as its longest record."""

COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '0' then
  if current then return 0 end
elseif current ~= ARGV[2] then
  return 0
end
if ARGV[4] == '' then
  redis.call('SET', KEYS[1], ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
end
return 1
"""
"""ARGV: has_expected ('0' or '1'), expected, new, ttl_ms. Returns 1 when written."""

COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
"""ARGV: expected. Returns 1 when the key held it and was removed."""

INCR_WINDOW = """
local count = redis.call('INCRBY', KEYS[1], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  ttl = tonumber(ARGV[2])
end
return {count, ttl}
"""
"""ARGV: amount, window_ms. The window opens at the first increment (no clocks to agree on across
replicas); a key left without a TTL gets one. Returns {count, ms until the window resets}."""

GET_WINDOW = """
local count = redis.call('GET', KEYS[1])
if not count then return {'0', -2} end
return {count, redis.call('PTTL', KEYS[1])}
"""
"""Returns {count as a string, PTTL in ms (-2: no window open)}."""

RESERVE = _SWEEP + """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current == nil then return redis.error_reply('ERR the value at this key is not an integer') end
local now
if KEYS[3] then
  if redis.replicate_commands then redis.replicate_commands() end
  local mark = redis.call('GET', KEYS[2])
  if mark == 's' then return {0, current} end
  if mark and tonumber(mark) == nil then return redis.error_reply('ERR the operation record is not a counter') end
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  if sweep(KEYS[1], KEYS[3], ARGV[7], now) then current = tonumber(redis.call('GET', KEYS[1]) or '0') end
end
if current + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {0, current} end
if KEYS[2] and not redis.call('SET', KEYS[2], KEYS[3] and ARGV[1] or ARGV[5], 'NX', 'PX', ARGV[4]) then
  local mark = redis.call('GET', KEYS[2])
  if mark == 's' then return {0, current} end
  if tonumber(mark) == nil then return redis.error_reply('ERR the operation record is not a counter') end
  redis.call('INCRBY', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
if ARGV[3] ~= '' and redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
if KEYS[3] then lease(KEYS[1], KEYS[2], KEYS[3], ARGV[4], ARGV[6], ARGV[7], now) end
return {1, total}
"""
"""ARGV: amount, limit (units), ttl_ms; with an operation record (KEYS[2]) also its ttl_ms and what it holds after
this step should it be absent (the caller's `held` plus `amount`; with a lease, `amount` alone: a leased record
lives as long as its counter, so one that is gone went with what it held, in a restart that lost Redis's data, and
a stream's next step must not bring that back for its settle to take off newer spend). The record holds the units
the operation reserved (a new one is made by the SET NX, the usual case: one call more than without it), or `s` once
it was settled: then a step (a reservation whose answer was lost, arriving after it was given up) changes nothing.
With a lease (KEYS[3], the counter's leases; ARGV also lease_ms and the records' head) the counter's expired leases
are swept first (`_SWEEP`; the op's own record checked before, so that a refusal still comes before any write),
and the op is leased (renewed by a stream's next step); the record's ttl_ms is then the lease's plus a margin,
or the counter's if longer. Returns {1 if reserved, total}; the sums stay below 2**53 so the double arithmetic of
Lua is exact."""

SETTLE = """
local mark = false
if KEYS[2] then
  mark = redis.call('GET', KEYS[2])
  if mark == 's' then return tonumber(redis.call('GET', KEYS[1]) or '0') or 0 end
  if mark and tonumber(mark) == nil then return redis.error_reply('ERR the operation record is not a counter') end
end
local total
if mark and mark ~= ARGV[5] then
  redis.call('INCRBY', KEYS[1], ARGV[4])
  total = redis.call('DECRBY', KEYS[1], mark)
elseif not mark and ARGV[7] == '1' then
  total = redis.call('INCRBY', KEYS[1], ARGV[4])
else
  total = redis.call('INCRBY', KEYS[1], ARGV[1])
end
if total < 0 then
  redis.call('SET', KEYS[1], '0', 'KEEPTTL')
  total = 0
end
if ARGV[2] ~= '' and redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if KEYS[2] then redis.call('SET', KEYS[2], 's', 'PX', ARGV[3]) end
if KEYS[3] and mark then redis.call('ZREM', KEYS[3], ARGV[6]) end
return total
"""
"""ARGV: delta (actual - reserved, units, may be negative), ttl_ms; with an operation record (KEYS[2]) also its
ttl_ms, the actual amount and `reserved` (units): the settle replaces what the record says was reserved (in one
INCRBY of `delta` when that is `reserved`, the usual case; `reserved` when there is no record), is applied once
(the record says `s` after it), and a repeat returns the total unchanged; with the counter's leases (KEYS[3]) and
the op id (ARGV[6]) its lease, if it had one, is dropped. A record a sweep released (`0`) is replaced like any other:
a late settle counts its actual cost. ARGV[7] `1`: the reservation was leased (a budget's), so its record lived as
long as the counter (`lease`); without the record the counter no longer holds it either (Redis lost its data, or
the counter ended with its period), and the actual amount alone is added. Returns the new total (never below 0)."""

RESERVE_WINDOW = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current == nil then return redis.error_reply('ERR the value at this key is not an integer') end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then ttl = tonumber(ARGV[3]) end
if current + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {0, current, ttl} end
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return {1, total, ttl}
"""
"""ARGV: amount, limit (units), window_ms. Returns {1 if reserved, total, ms until the window resets}."""

ACQUIRE_SLOT = """
if redis.replicate_commands then redis.replicate_commands() end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
local held = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {1, held} end
if held >= tonumber(ARGV[2]) then return {0, held} end
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, held + 1}
"""
"""ARGV: holder, limit, lease_ms. A sorted set of holders scored by lease expiry (Redis's clock: replicas
need not agree on time). TIME before a write needs replication by effects: the default from Redis 5 on,
asked for explicitly for older ones. Returns {1 if taken, slots held}."""

RESERVE_TOGETHER = _SWEEP + """
if redis.replicate_commands then redis.replicate_commands() end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local function counter(key)
  local current = tonumber(redis.call('GET', key) or '0')
  if current == nil then return redis.error_reply('ERR the value at this key is not an integer') end
  return current
end
local n, fits, keyed, plans = tonumber(ARGV[1]), true, 1, {}
for i = 1, n do
  local a = 2 + (i - 1) * 9
  local kind, key, plan = ARGV[a], KEYS[keyed], {}
  keyed = keyed + 1
  plan.kind, plan.key, plan.a = kind, key, a
  if kind == 'slot' then
    local mine = redis.call('ZSCORE', key, ARGV[a + 1])
    plan.mine = mine and tonumber(mine) > ms
    plan.held = redis.call('ZCOUNT', key, '(' .. ms, '+inf')
    plan.ok = plan.mine or plan.held < tonumber(ARGV[a + 2])
  else
    local current = counter(key)
    if type(current) == 'table' then return current end
    plan.current = current
    plan.ok = current + tonumber(ARGV[a + 1]) <= tonumber(ARGV[a + 2])
    if kind == 'window' then
      plan.ttl = redis.call('PTTL', key)
      if plan.ttl < 0 then plan.ttl = tonumber(ARGV[a + 3]) end
    elseif ARGV[a + 5] ~= '' then
      plan.record = KEYS[keyed]
      keyed = keyed + 1
      if ARGV[a + 7] ~= '' then
        plan.leases = KEYS[keyed]
        keyed = keyed + 1
      end
      local mark = redis.call('GET', plan.record)
      if mark == 's' then
        plan.ok, plan.settled = false, true
      elseif mark and tonumber(mark) == nil then
        return redis.error_reply('ERR the operation record is not a counter')
      end
    end
  end
  plans[i] = plan
end
for i = 1, n do
  local plan = plans[i]
  local a = plan.a
  if plan.leases and sweep(plan.key, plan.leases, ARGV[a + 8], ms) then
    plan.current = tonumber(redis.call('GET', plan.key) or '0')
    plan.ok = not plan.settled and plan.current + tonumber(ARGV[a + 1]) <= tonumber(ARGV[a + 2])
  end
  if not plan.ok and (plan.kind ~= 'budget' or ARGV[a + 4] == '1') then fits = false end
end
local answers = {fits and 1 or 0}
for i = 1, n do
  local plan = plans[i]
  local kind, key, a = plan.kind, plan.key, plan.a
  local take = fits and plan.ok
  if kind == 'slot' then
    local held = plan.held
    if take then
      redis.call('ZREMRANGEBYSCORE', key, '-inf', ms)
      if not plan.mine then
        redis.call('ZADD', key, ms + tonumber(ARGV[a + 3]), ARGV[a + 1])
        redis.call('PEXPIRE', key, ARGV[a + 3])
        held = held + 1
      end
    end
    answers[i + 1] = {plan.ok and 1 or 0, held}
  else
    local total = plan.current
    if take then
      if plan.record and not redis.call('SET', plan.record, ARGV[a + 6], 'NX', 'PX', ARGV[a + 5]) then
        redis.call('INCRBY', plan.record, ARGV[a + 1])
        redis.call('PEXPIRE', plan.record, ARGV[a + 5])
      end
      total = redis.call('INCRBY', key, ARGV[a + 1])
      if ARGV[a + 3] ~= '' and redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, ARGV[a + 3]) end
      if plan.leases then lease(key, plan.record, plan.leases, ARGV[a + 5], ARGV[a + 7], ARGV[a + 8], ms) end
    end
    answers[i + 1] = {plan.ok and 1 or 0, total, plan.ttl or 0}
  end
end
return answers
"""
"""`RESERVE_WINDOW`, `RESERVE` and `ACQUIRE_SLOT` of one request, all or nothing: each is checked first (reading
only), then all are applied, or none when one that is required does not fit. ARGV: the count, then nine per
reservation: `window` (amount, limit, window_ms), `slot` (holder, limit, lease_ms) or `budget` (amount, limit,
ttl_ms, required '1' or '0', and with an operation record: its ttl_ms and what it holds after this step, and with
a lease: lease_ms and the records' head, as `RESERVE`'s), padded with empty strings. KEYS: each reservation's key
in order, a budget's record and then its leases after its counter. A budget with a lease has its counter's
expired leases swept (`_SWEEP`) once every check has passed without an error, before its fit is decided, whether
the request is then taken or not. Returns {1 if taken, then per reservation {1 if it fits, total (or slots held)
after, window ms left (0: not a window)}}; a refusal leaves every total as it stood (but for what a sweep gave
back). Several keys: one server only (no cluster: slots differ)."""

RELEASE_SLOT = """
return redis.call('ZREM', KEYS[1], ARGV[1])
"""


def op_key(key: str, op: str, prefix: str) -> str | None:
    """The key of operation `op`'s record for the counter `key` (prefixed), in `key`'s Redis Cluster hash slot:
    `key:op:<op>` when `key` carries a hash tag (appended text keeps the first tag), else the whole of `key` made
    the tag (`<prefix>op:{<key>}:<op>`, or `{<key>}:op:<op>` when `key` holds a `{`). None when no key can share
    the slot (a key without a tag that holds a `}`: only a tag can name a slot, and a tag's text ends at its
    first `}`); the caller then goes without a record, or (not a cluster) names one anywhere."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:  # a tag with text: Redis hashes that text only
            return f"{key}:op:{op}"
    if "}" in key:
        return None
    if start < 0:
        return f"{prefix}op:{{{key}}}:{op}"
    return f"{{{key}}}:op:{op}"
