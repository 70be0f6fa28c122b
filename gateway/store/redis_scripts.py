"""The Lua scripts behind the Redis store's atomic operations.

Each script touches exactly one key (`KEYS[1]`), so every one runs on one slot in Redis Cluster whatever the
key is; no hash tags are needed (a caller may still add `{...}` to co-locate keys of its own). They are
registered once per client (`register_script`: EVALSHA, reloaded automatically after NOSCRIPT). Amounts
arrive as integer strings (millionths, see `AMOUNT_SCALE`) and are passed to INCRBY unchanged, so nothing is
ever formatted from a Lua number. TTLs are milliseconds; an empty string means none.
"""

from __future__ import annotations

__all__ = [
    "ACQUIRE_SLOT", "COMPARE_AND_DELETE", "COMPARE_AND_SET", "GET_WINDOW", "INCR_WINDOW", "RELEASE_SLOT", "RESERVE",
    "RESERVE_WINDOW", "SETTLE",
]

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

RESERVE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current == nil then return redis.error_reply('ERR the value at this key is not an integer') end
if current + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {0, current} end
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
if ARGV[3] ~= '' and redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return {1, total}
"""
"""ARGV: amount, limit (units), ttl_ms. Returns {1 if reserved, total}; the sums stay below 2**53 so the
double arithmetic of Lua is exact."""

SETTLE = """
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
if total < 0 then
  redis.call('SET', KEYS[1], '0', 'KEEPTTL')
  total = 0
end
if ARGV[2] ~= '' and redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return total
"""
"""ARGV: delta (actual - reserved, units, may be negative), ttl_ms. Returns the new total (never below 0)."""

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

RELEASE_SLOT = """
return redis.call('ZREM', KEYS[1], ARGV[1])
"""
