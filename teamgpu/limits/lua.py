"""Lua scripts of the Redis backends: the algorithm of :mod:`teamgpu.limits.window`,
run atomically inside Redis.

Keys of one API key share the hash tag ``{key_id}``, so a script touches one cluster
slot. Times are integer microseconds since the epoch; an empty ``now`` argument means
the Redis server's clock (``TIME``), so replicas with skewed clocks still agree. Numbers
passed to Redis are formatted with ``%.0f``: Lua's default number-to-string conversion
keeps only 14 significant digits, fewer than a timestamp in microseconds has.
"""

from __future__ import annotations

PRELUDE = """
if redis.replicate_commands ~= nil then redis.replicate_commands() end
local W = 60000000               -- window, microseconds
local DAY = 86400000000          -- one UTC day, microseconds
local WINDOW_TTL_MS = 61000      -- window keys outlive their newest entry by 1 s
local DAY_TTL_MS = 172800000     -- the daily counter lives two days

local function num(x) return string.format('%.0f', x) end

local function clock(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function newest(key)
  local e = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if #e == 0 then return -1 end
  return tonumber(e[2])
end
"""

TOKENS = """
-- token window: ZSET member "<rid>:<tokens>" (or "<rid>+:<tokens>" for tokens beyond
-- the estimate), score = time; STRING sum key = running total of the ZSET's tokens
local function amount(member) return tonumber(string.match(member, ':(%d+)$')) end

local function prune_tokens(tok_key, sum_key, cutoff)
  local raw = redis.call('GET', sum_key)
  local sum = tonumber(raw) or 0
  local old = redis.call('ZRANGEBYSCORE', tok_key, '-inf', num(cutoff))
  for i = 1, #old do sum = sum - amount(old[i]) end
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', tok_key, '-inf', num(cutoff)) end
  local n = redis.call('ZCARD', tok_key)
  if n == 0 then
    sum = 0
  elseif raw == false then           -- the sum key was lost: recount
    sum = 0
    local all = redis.call('ZRANGE', tok_key, 0, -1)
    for i = 1, #all do sum = sum + amount(all[i]) end
  end
  return sum, (#old > 0 or (raw == false and n > 0))
end

local function write_tokens(tok_key, sum_key, sum)
  if redis.call('ZCARD', tok_key) == 0 then
    redis.call('DEL', sum_key)
  else
    redis.call('SET', sum_key, num(sum), 'PX', WINDOW_TTL_MS)
    redis.call('PEXPIRE', tok_key, WINDOW_TTL_MS)
  end
end

local function day_used(day_key, today)
  local d = redis.call('HMGET', day_key, 'd', 'u')
  if tonumber(d[1]) == today then return tonumber(d[2]) or 0 end
  return 0
end
"""

#: KEYS: req, tok, toksum, conc, day. ARGV: mode ("reserve" | "status"), now_us or "",
#: reservation id, estimate, rpm, tpm, max_concurrent, daily_tokens, lease_us,
#: concurrency_retry_us.
#: Returns {admitted, now, wait_req, wait_tok, wait_conc, wait_day, requests,
#: requests_newest, tokens, tokens_newest, in_flight, day, day_used}; -1 = none.
RESERVE = (
    PRELUDE
    + TOKENS
    + """
local req_key, tok_key, sum_key, conc_key, day_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local mode = ARGV[1]
local now = clock(ARGV[2])
local rid = ARGV[3]
local est = tonumber(ARGV[4])
local rpm, tpm = tonumber(ARGV[5]), tonumber(ARGV[6])
local maxc, daily = tonumber(ARGV[7]), tonumber(ARGV[8])
local lease, conc_retry = tonumber(ARGV[9]), tonumber(ARGV[10])
local cutoff = now - W

redis.call('ZREMRANGEBYSCORE', req_key, '-inf', num(cutoff))
local nreq = redis.call('ZCARD', req_key)
local sum, changed = prune_tokens(tok_key, sum_key, cutoff)
redis.call('ZREMRANGEBYSCORE', conc_key, '-inf', num(now))   -- expired leases
local nconc = redis.call('ZCARD', conc_key)
local today = math.floor(now / DAY)
local used = day_used(day_key, today)

local admitted = 0
local w_req, w_tok, w_conc, w_day = -1, -1, -1, -1
if mode == 'reserve' then
  if rpm > 0 and nreq + 1 > rpm then
    local e = redis.call('ZRANGE', req_key, nreq - rpm, nreq - rpm, 'WITHSCORES')
    w_req = tonumber(e[2]) + W - now
  end
  if tpm > 0 and sum + est > tpm then
    local need, freed, start = sum + est - tpm, 0, 0
    while w_tok < 0 do
      local batch = redis.call('ZRANGE', tok_key, start, start + 99, 'WITHSCORES')
      if #batch == 0 then w_tok = W break end
      for i = 1, #batch, 2 do
        freed = freed + amount(batch[i])
        if freed >= need then w_tok = tonumber(batch[i + 1]) + W - now break end
      end
      start = start + 100
    end
  end
  if maxc > 0 and nconc + 1 > maxc then w_conc = conc_retry end
  if daily > 0 and used + est > daily then w_day = (today + 1) * DAY - now end

  if w_req < 0 and w_tok < 0 and w_conc < 0 and w_day < 0 then
    admitted = 1
    redis.call('ZADD', req_key, num(now), rid)
    redis.call('PEXPIRE', req_key, WINDOW_TTL_MS)
    nreq = nreq + 1
    if est > 0 then
      redis.call('ZADD', tok_key, num(now), rid .. ':' .. num(est))
      sum = sum + est
      changed = true
    end
    redis.call('ZADD', conc_key, num(now + lease), rid)
    redis.call('PEXPIRE', conc_key, math.floor(lease / 1000) + 1000)
    nconc = nconc + 1
    used = used + est
    redis.call('HSET', day_key, 'd', num(today), 'u', num(used))
    redis.call('PEXPIRE', day_key, DAY_TTL_MS)
  end
end
if changed then write_tokens(tok_key, sum_key, sum) end
return {admitted, now, w_req, w_tok, w_conc, w_day, nreq, newest(req_key), sum,
        newest(tok_key), nconc, today, used}
"""
)

#: KEYS: req, tok, toksum, conc, day (req unused, kept for one key layout).
#: ARGV: now_us or "", reservation id, estimate, actual, admission day. Returns 1.
SETTLE = (
    PRELUDE
    + TOKENS
    + """
local tok_key, sum_key, conc_key, day_key = KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = clock(ARGV[1])
local rid = ARGV[2]
local est, actual, rday = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local sum = prune_tokens(tok_key, sum_key, now - W)

local kept = math.min(actual, est)
if est > 0 then
  local old = rid .. ':' .. num(est)
  local score = redis.call('ZSCORE', tok_key, old)
  if score then                      -- still in the window: refund the unused part there
    redis.call('ZREM', tok_key, old)
    if kept > 0 then redis.call('ZADD', tok_key, score, rid .. ':' .. num(kept)) end
    sum = sum - (est - kept)
  end
end
local excess = actual - est
if excess > 0 then                   -- beyond the estimate: charged now
  redis.call('ZADD', tok_key, num(now), rid .. '+:' .. num(excess))
  sum = sum + excess
end
write_tokens(tok_key, sum_key, sum)

local d = redis.call('HMGET', day_key, 'd', 'u')
local day, used = tonumber(d[1]), tonumber(d[2]) or 0
if day ~= nil and day == rday and est > kept then used = math.max(0, used - (est - kept)) end
if excess > 0 then
  local today = math.floor(now / DAY)
  if day ~= today then day = today used = 0 end
  used = used + excess
end
if day ~= nil then
  redis.call('HSET', day_key, 'd', num(day), 'u', num(used))
  redis.call('PEXPIRE', day_key, DAY_TTL_MS)
end
redis.call('ZREM', conc_key, rid)
return 1
"""
)

#: KEYS: conc. ARGV: now_us or "", lease_us, reservation ids... Extends the leases of
#: those still held (a released or expired one is not brought back).
RENEW = (
    PRELUDE
    + """
local now = clock(ARGV[1])
local lease = tonumber(ARGV[2])
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], 'XX', num(now + lease), ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], math.floor(lease / 1000) + 1000)
return 1
"""
)

#: KEYS: failures of one address. ARGV: mode ("check" | "record"), now_us or "",
#: max failures per window, member id. Returns the wait in microseconds until one more
#: attempt is allowed, or -1 when allowed now.
AUTH_FAILURES = (
    PRELUDE
    + """
local key = KEYS[1]
local now = clock(ARGV[2])
local max = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', num(now - W))
if ARGV[1] == 'record' then
  redis.call('ZADD', key, num(now), ARGV[4])
  redis.call('PEXPIRE', key, WINDOW_TTL_MS)
end
local n = redis.call('ZCARD', key)
if n >= max then
  local e = redis.call('ZRANGE', key, n - max, n - max, 'WITHSCORES')
  return tonumber(e[2]) + W - now
end
return -1
"""
)
