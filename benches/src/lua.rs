//! The Lua of idem's Redis store (`idem-runtime/src/redis.rs`: `PRELUDE`, `CLAIM`,
//! `COMPLETE`), copied for the hand-written Redis code, which runs the same scripts without
//! the store around them. Keep in step with that file.

/// Strict integer parsing and reading a record with its checks.
pub const PRELUDE: &str = r"
local function int(v)
  if type(v) == 'string' and #v <= 16 and string.find(v, '^%-?%d+$') then
    local n = tonumber(v)
    if n >= -9007199254740991 and n <= 9007199254740991 then return n end
  end
  return nil
end

local function show(v)
  if not v then return 'missing' end
  return '`' .. string.sub(v, 1, 40) .. '`'
end

-- The record at `key`: nil if there is none, or nil and why it does not decode.
local function load(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'none' then return nil end
  if kind ~= 'hash' then
    return nil, 'WRONGTYPE: the key holds a ' .. kind .. ', not a hash'
  end
  local f = redis.call('HMGET', key,
    'completed', 'owner', 'fence', 'lease_until', 'expires_at', 'fingerprint', 'result')
  local r = {
    completed = f[1], owner = f[2], fence = int(f[3]), lease_until = f[4],
    expires_at = f[5], fingerprint = f[6], result = f[7],
    lease_until_n = int(f[4]), expires_at_n = int(f[5]),
  }
  if r.completed ~= '0' and r.completed ~= '1' then
    return nil, '`completed` is ' .. show(f[1])
  end
  if not r.owner then return nil, '`owner` is missing' end
  if not r.fence or r.fence < 1 then return nil, '`fence` is ' .. show(f[3]) end
  if not r.lease_until_n then return nil, '`lease_until` is ' .. show(f[4]) end
  if not r.expires_at_n then return nil, '`expires_at` is ' .. show(f[5]) end
  if r.completed == '1' and not r.result then
    return nil, 'a completed record has no result'
  end
  return r
end

-- Whether the record belongs to the lease (owner ARGV[1], fence ARGV[2]) and is in progress.
local function held(r)
  return r and r.completed == '0' and r.owner == ARGV[1] and r.fence == int(ARGV[2])
end
";

/// KEYS: record. ARGV: now, owner, until, px, fingerprint or ''.
pub const CLAIM: &str = r"
local key, now = KEYS[1], tonumber(ARGV[1])
local r, err = load(key)
if err then return {'corrupt', err} end
local fence = 1
if r then
  local live_until = r.lease_until_n
  if r.completed == '1' then live_until = r.expires_at_n end
  if live_until > now then
    local given = ARGV[5]
    if given ~= '' and r.fingerprint then
      if #r.fingerprint ~= 32 then
        return {'corrupt', '`fingerprint` has ' .. #r.fingerprint .. ' bytes'}
      end
      if r.fingerprint ~= given then return {'mismatch'} end
    end
    if r.completed == '1' then return {'completed', r.result} end
    return {'in_progress', r.lease_until}
  end
  fence = r.fence + 1
  redis.call('DEL', key)
end
redis.call('HSET', key, 'completed', '0', 'owner', ARGV[2], 'fence', string.format('%d', fence),
  'lease_until', ARGV[3], 'expires_at', ARGV[3])
if ARGV[5] ~= '' then redis.call('HSET', key, 'fingerprint', ARGV[5]) end
redis.call('PEXPIRE', key, ARGV[4])
return {'acquired', fence}
";

/// KEYS: record. ARGV: owner, fence, result, expires_at, px.
pub const COMPLETE: &str = r"
local r, err = load(KEYS[1])
if err then return {'corrupt', err} end
if not held(r) then return {'lost'} end
redis.call('HSET', KEYS[1], 'completed', '1', 'result', ARGV[3], 'expires_at', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {'done'}
";
