//! A store in Redis, over the `redis` crate (a [`ConnectionManager`] or a
//! [`MultiplexedConnection`]).
//!
//! # Records
//!
//! A record is a hash under the key `<prefix>:{<n>:<scope>:<key>}` ([`RedisStore::redis_key`]),
//! where `<n>` is the length in bytes of the scope as written and `%`, `{` and `}` in the scope
//! and the key are written `%25`, `%7B` and `%7D`. So the part in braces is a well-formed
//! cluster hash tag for any scope and key (the whole record lives in one slot), and two
//! different records never share a Redis key. Its fields:
//!
//! | field | value |
//! |---|---|
//! | `completed` | `0` in progress, `1` completed |
//! | `owner` | the current holder's token |
//! | `fence` | rises on every claim and takeover of the record, from 1 |
//! | `lease_until` | ms since the epoch (store clock): an in-progress claim can be taken over after this |
//! | `expires_at` | ms since the epoch (store clock): the record counts as gone after this |
//! | `fingerprint` | the 32 bytes of the payload's SHA-256, absent if not checked |
//! | `result` | the stored result, once completed |
//!
//! Times come from the store's [`Clock`] and are passed to the scripts, never read from the
//! server. Redis deletes a completed record by itself after a relative `PEXPIRE` of
//! `expires_at - now`, and an in-progress one [`IN_PROGRESS_GRACE`] after its lease; the
//! scripts also treat a record whose `lease_until` (in progress) or `expires_at`
//! (completed) has passed by the store's clock as free to claim, so the store clock decides,
//! even when it is far from the server's.
//!
//! # One script per operation
//!
//! Every operation is one Lua script run with `EVALSHA` (the script is loaded on the first
//! `NOSCRIPT`): one round trip, atomic in Redis.
//!
//! * **claim** — reads the hash; a live record answers in progress, completed or mismatch;
//!   no record, or a dead one (lease or ttl passed, or released), is replaced by a new
//!   in-progress record with `fence + 1` (1 for a new key) and `PEXPIRE <lease + grace>`.
//! * **complete** — if `owner` and `fence` match and `completed` is 0: sets `completed`,
//!   `result` and `expires_at` and `PEXPIRE <ttl>`; otherwise [`Error::LeaseLost`].
//! * **release** — same guard: sets `lease_until` and `expires_at` to now (the record stays
//!   until its lease would have run out in Redis, so the next holder's fence rises).
//! * **extend** — same guard: moves `lease_until` and `expires_at` and
//!   `PEXPIRE <duration + grace>`.
//! * **`purge_expired`** — `SCAN <prefix>:{* COUNT 1000` and one script per batch of keys that
//!   deletes the hashes whose `expires_at` has passed, up to the limit: two round trips per
//!   batch. With the system clock Redis expires records itself, so purging is optional; it
//!   removes released records early and keeps a [`ManualClock`](crate::clock::ManualClock)
//!   honest in tests. `SCAN` visits the node the connection talks to only, and a script may
//!   touch one slot only in Redis Cluster: there, leave expiry to Redis and run no sweeper.
//!
//! Inside Redis, a claim asks `EXISTS` first: a new key then costs one `HSET` of the whole
//! record and a `PEXPIRE`, and a key that exists one `HMGET` of its seven fields (a replay, or
//! a claim of a key in progress, is these two calls). Complete, release and extend read with
//! the `HMGET` alone (an `EXISTS` follows only when `completed` is missing, to tell a missing
//! key from a hash without it); a completion then writes one `HSET` and a `PEXPIRE`. Every
//! field is checked on every read (below).
//!
//! A record is gone once Redis expires it. The next claim then starts again at fence 1, and a
//! holder that outlived its lease by more than [`IN_PROGRESS_GRACE`] can no longer complete
//! ([`Error::LeaseLost`]), as after a purge in the SQL stores: its result is not recorded and
//! the next delivery runs the body again.
//!
//! A key that holds something other than a hash (`WRONGTYPE`) or a hash with a missing or
//! unreadable field is reported as [`Error::Decode`]; `purge_expired` skips it.
//!
//! # What survives a restart
//!
//! Redis keeps the records in memory; what survives depends on its configuration alone:
//!
//! * **No persistence** (`appendonly no` and `save ""`): a restart forgets every record.
//!   Completed keys are forgotten, so a redelivery after the restart runs the body again;
//!   in-progress claims are forgotten, so a duplicate can run the body while the first holder
//!   is still running it (the holder then gets [`Error::LeaseLost`] when it completes).
//! * **RDB snapshots only** (`save …`, the usual default): a restart loses everything written
//!   since the last snapshot, often minutes of completed keys.
//! * **AOF** (`appendonly yes`): with `appendfsync always` every write is on disk before Redis
//!   answers; with `appendfsync everysec` a crash of the process loses nothing but a crash of
//!   the machine loses up to about a second of writes.
//! * **Replicas** are updated asynchronously: a failover can promote a replica that lacks
//!   writes the primary already acknowledged. `WAIT` (and `WAITAOF` from Redis 7.2) narrows
//!   the window but does not close it; this store sends neither.
//! * **Eviction**: under `maxmemory`, any policy but `noeviction` may evict records (every
//!   record has a TTL, so the `volatile-*` policies pick them too), which forgets them early.
//!
//! So the store is safe across restarts with **`appendonly yes`, `appendfsync always` (or
//! `everysec` if losing the last second on a power failure is acceptable), `maxmemory-policy
//! noeviction`, and no automatic failover to an asynchronous replica**. Otherwise treat a Redis
//! restart or failover as a window in which duplicates run again.

use std::fmt::{self, Write as _};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, ErrorKind, RedisError, Script, ServerErrorKind, Value};

use crate::clock::{self, Clock, SystemClock};
use crate::name;
use crate::store::{Claim, Lease, Store, lease_lost, new_owner};
use crate::{Error, Fingerprint, RecordKey, StoreError};

#[cfg(doc)]
use redis::aio::MultiplexedConnection;

const BACKEND: &str = "redis";

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "idem";

/// The largest time the scripts store and compare exactly (Lua numbers are doubles):
/// 2^53 - 1 ms, in the year 287396. Deadlines beyond it are stored as it.
const MAX_MILLIS: i64 = (1 << 53) - 1;

/// How long Redis keeps an in-progress record after its lease: a holder that outlives its
/// lease can still complete while nobody has taken the key over (as in the SQL stores), and an
/// abandoned claim is gone this long after its lease. Takeover does not wait for it: the
/// scripts compare the lease itself.
pub const IN_PROGRESS_GRACE: Duration = Duration::from_secs(10 * 60);

/// How many keys one `SCAN` of a purge asks for.
const SCAN_COUNT: u32 = 1000;

/// Shared by every script: strict integer parsing and reading a record with its checks.
///
/// Every `redis.call` costs the server more than its command: its arguments and its reply are
/// converted between Lua and Redis, so an `HMGET` of seven fields costs several times an
/// `EXISTS`, even on a missing key. So `load` asks the cheapest question first: `EXISTS` for a
/// claim, which usually finds a new key; the `HMGET` alone for the holder's operations.
const PRELUDE: &str = r"
-- A stored integer: optional '-', then decimal digits, at most 16 bytes, exact as a Lua
-- number (|n| < 2^53); anything else is nil.
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
-- One HMGET reads every field; on a key of another type it fails with WRONGTYPE (caught by
-- pcall; any other error is raised as it is). `maybe_new` (a claim): EXISTS first, so that a
-- new key costs no HMGET. Otherwise (complete, release, extend: the holder's record is
-- there) HMGET first, and EXISTS only when `completed` is missing, to tell no key from a
-- hash without it.
local function load(key, maybe_new)
  if maybe_new and redis.call('EXISTS', key) == 0 then return nil end
  local f = redis.pcall('HMGET', key,
    'completed', 'owner', 'fence', 'lease_until', 'expires_at', 'fingerprint', 'result')
  if f.err then
    if not string.find(f.err, '^WRONGTYPE') then error(f) end
    return nil, 'WRONGTYPE: the key holds a ' .. redis.call('TYPE', key)['ok'] .. ', not a hash'
  end
  if not f[1] and not maybe_new and redis.call('EXISTS', key) == 0 then return nil end
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
-- ARGV[2] is the store's own decimal u64; a fence of 2^53 or more never equals a stored one.
local function held(r)
  return r and r.completed == '0' and r.owner == ARGV[1] and r.fence == tonumber(ARGV[2])
end
";

/// KEYS: record. ARGV: now, owner, until, px, fingerprint or ''.
const CLAIM: &str = r"
local key, now = KEYS[1], tonumber(ARGV[1])
local r, err = load(key, true)
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
-- The whole record in one HSET (`%d`: a Lua number as an argument would be written `%.14g`).
local fence_text = fence == 1 and '1' or string.format('%d', fence)
if ARGV[5] == '' then
  redis.call('HSET', key, 'completed', '0', 'owner', ARGV[2], 'fence', fence_text,
    'lease_until', ARGV[3], 'expires_at', ARGV[3])
else
  redis.call('HSET', key, 'completed', '0', 'owner', ARGV[2], 'fence', fence_text,
    'lease_until', ARGV[3], 'expires_at', ARGV[3], 'fingerprint', ARGV[5])
end
redis.call('PEXPIRE', key, ARGV[4])
return {'acquired', fence}
";

/// KEYS: record. ARGV: owner, fence, result, expires_at, px.
const COMPLETE: &str = r"
local r, err = load(KEYS[1])
if err then return {'corrupt', err} end
if not held(r) then return {'lost'} end
redis.call('HSET', KEYS[1], 'completed', '1', 'result', ARGV[3], 'expires_at', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {'done'}
";

/// KEYS: record. ARGV: owner, fence, now.
const RELEASE: &str = r"
local r, err = load(KEYS[1])
if err then return {'corrupt', err} end
if not held(r) then return {'lost'} end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[3], 'expires_at', ARGV[3])
return {'done'}
";

/// KEYS: record. ARGV: owner, fence, until, px.
const EXTEND: &str = r"
local r, err = load(KEYS[1])
if err then return {'corrupt', err} end
if not held(r) then return {'lost'} end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[3], 'expires_at', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'done'}
";

/// KEYS: candidate records. ARGV: now, limit. Returns how many it deleted.
const PURGE: &str = r"
local now, limit, deleted = tonumber(ARGV[1]), tonumber(ARGV[2]), 0
for _, key in ipairs(KEYS) do
  if deleted >= limit then break end
  if redis.call('TYPE', key)['ok'] == 'hash' then
    local expires_at = int(redis.call('HGET', key, 'expires_at'))
    if expires_at and expires_at <= now then
      redis.call('DEL', key)
      deleted = deleted + 1
    end
  end
end
return deleted
";

/// The scripts, hashed once per process.
struct Scripts {
    claim: Script,
    complete: Script,
    release: Script,
    extend: Script,
    purge: Script,
}

/// The Lua source of the scripts the store runs, the shared prelude included: to read them
/// when auditing the store, or to run them without it (the benchmarks' hand-written floor).
pub mod lua {
    /// The claim. KEYS: the record. ARGV: now, owner, lease until, PEXPIRE ms, fingerprint or
    /// `''`.
    pub fn claim() -> String {
        format!("{}{}", super::PRELUDE, super::CLAIM)
    }

    /// The completion. KEYS: the record. ARGV: owner, fence, result, expires at, PEXPIRE ms.
    pub fn complete() -> String {
        format!("{}{}", super::PRELUDE, super::COMPLETE)
    }
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let script = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
    Scripts {
        claim: script(CLAIM),
        complete: script(COMPLETE),
        release: script(RELEASE),
        extend: script(EXTEND),
        purge: script(PURGE),
    }
});

/// A store in Redis.
///
/// `C` is the connection: a [`ConnectionManager`] (reconnects by itself; the default), a
/// [`MultiplexedConnection`], or anything else implementing the crate's async
/// [`ConnectionLike`] that is cheap to clone. Each operation clones it and sends one script.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_runtime::redis::RedisStore;
///
/// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
/// let manager = redis::aio::ConnectionManager::new(client).await?;
/// let store = RedisStore::new(manager).with_prefix("orders:idem")?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore<C = ConnectionManager> {
    connection: C,
    clock: Arc<dyn Clock>,
    prefix: Arc<str>,
}

impl<C> fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("connection", &std::any::type_name::<C>())
            .field("clock", &self.clock)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisStore<ConnectionManager> {
    /// Connects a [`ConnectionManager`] to `url`, such as `redis://127.0.0.1:6379/`, and
    /// builds a store on it.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if the URL is malformed or the server cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let client = redis::Client::open(url).map_err(store_error)?;
        let manager = ConnectionManager::new(client).await.map_err(store_error)?;
        Ok(Self::new(manager))
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A store on a connection the application already has, with keys under
    /// [`DEFAULT_PREFIX`]. Redis needs no schema.
    pub fn new(connection: C) -> Self {
        Self {
            connection,
            clock: Arc::new(SystemClock),
            prefix: DEFAULT_PREFIX.into(),
        }
    }

    /// The same store with its keys under `prefix` instead of `idem`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] unless `prefix` is 1 to 64 bytes of ASCII letters, digits, `_`,
    /// `-`, `.` and `:` (no `{`, `}` or glob characters).
    pub fn with_prefix(mut self, prefix: &str) -> Result<Self, Error> {
        name::key_prefix(prefix)?;
        self.prefix = prefix.into();
        Ok(self)
    }

    /// The prefix of the store's keys.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The same store on another clock (a [`ManualClock`](crate::clock::ManualClock) in tests).
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The connection the store runs on.
    pub fn connection(&self) -> &C {
        &self.connection
    }

    /// The Redis key of the record of `key`: `<prefix>:{<n>:<scope>:<key>}`, where `<n>` is
    /// the byte length of the scope as written and `%`, `{`, `}` are written `%25`, `%7B`,
    /// `%7D`. The part in braces is the record's cluster hash tag: for the key `A-1{7}` of
    /// `orders::pay` under the prefix `idem` it is `idem:{11:orders::pay:A-1%7B7%7D}`.
    pub fn redis_key(&self, key: &RecordKey) -> String {
        record_key(&self.prefix, key)
    }

    /// Sends `cmd` (an [`evalsha`] of `script`), loading the script on `NOSCRIPT` and sending
    /// it again; a reply `{'corrupt', why}` is [`Error::Decode`].
    async fn invoke(
        &self,
        key: &RecordKey,
        script: &Script,
        cmd: &Cmd,
    ) -> Result<Vec<Value>, Error> {
        let mut connection = self.connection.clone();
        let mut reply = cmd.query_async::<Value>(&mut connection).await;
        if matches!(&reply, Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript))
        {
            script
                .load_async(&mut connection)
                .await
                .map_err(|error| redis_error(key, error))?;
            reply = cmd.query_async(&mut connection).await;
        }
        let reply = reply.map_err(|error| redis_error(key, error))?;
        let Value::Array(items) = reply else {
            return Err(store_error(format!("unexpected script reply {reply:?}")));
        };
        if tag(&items) == Some(b"corrupt".as_slice()) {
            let reason = items.get(1).and_then(text).unwrap_or_default();
            return Err(decode_error(key, reason));
        }
        Ok(items)
    }

    /// An [`evalsha`] of `script` (complete, release or extend) on `key`'s record with the
    /// lease's owner and fence as its first arguments; the caller adds the rest.
    fn held_cmd(&self, key: &RecordKey, lease: &Lease, script: &Script) -> Cmd {
        let mut cmd = evalsha(script, &self.redis_key(key));
        cmd.arg(lease.owner()).arg(lease.fence());
        cmd
    }

    /// Sends `cmd` from [`held_cmd`](Self::held_cmd): `done`, or the lease is lost.
    async fn update_held(
        &self,
        key: &RecordKey,
        lease: &Lease,
        script: &Script,
        cmd: &Cmd,
    ) -> Result<(), Error> {
        let reply = self.invoke(key, script, cmd).await?;
        if tag(&reply) == Some(b"done".as_slice()) {
            Ok(())
        } else if tag(&reply) == Some(b"lost".as_slice()) {
            Err(lease_lost(key, lease))
        } else {
            Err(unexpected(&reply))
        }
    }
}

impl<C> Store for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, Error> {
        let now = self.clock.now_millis();
        let until = deadline(now, lease);
        let owner = new_owner();
        let script = &SCRIPTS.claim;
        let mut cmd = evalsha(script, &self.redis_key(key));
        cmd.arg(now)
            .arg(owner.as_str())
            .arg(until)
            .arg(held_pexpire(now, until))
            .arg(fingerprint.map_or(&[][..], |f| f.as_bytes().as_slice()));
        let mut reply = self.invoke(key, script, &cmd).await?;
        match (tag(&reply), reply.get(1)) {
            (Some(b"acquired"), Some(Value::Int(fence))) => {
                let fence = u64::try_from(*fence)
                    .map_err(|_| decode_error(key, format!("`fence` is {fence}")))?;
                Ok(Claim::Acquired(Lease::new(owner, fence, until)))
            }
            (Some(b"completed"), Some(Value::BulkString(_))) => match reply.swap_remove(1) {
                Value::BulkString(result) => Ok(Claim::Completed(result)),
                _ => unreachable!("the result was matched as a bulk string"),
            },
            (Some(b"in_progress"), Some(lease_until)) => {
                let lease_until = text(lease_until)
                    .and_then(|text| text.parse::<i64>().ok())
                    .ok_or_else(|| decode_error(key, "`lease_until` is not an integer"))?;
                Ok(Claim::InProgress {
                    retry_after: clock::remaining(now, lease_until),
                })
            }
            (Some(b"mismatch"), None) => Ok(Claim::Mismatch),
            _ => Err(unexpected(&reply)),
        }
    }

    async fn complete(
        &self,
        key: &RecordKey,
        lease: &Lease,
        result: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        let now = self.clock.now_millis();
        let expires_at = deadline(now, ttl);
        let script = &SCRIPTS.complete;
        let mut cmd = self.held_cmd(key, lease, script);
        cmd.arg(result)
            .arg(expires_at)
            .arg(pexpire(now, expires_at));
        self.update_held(key, lease, script, &cmd).await
    }

    async fn release(&self, key: &RecordKey, lease: &Lease) -> Result<(), Error> {
        let now = self.clock.now_millis().min(MAX_MILLIS);
        let script = &SCRIPTS.release;
        let mut cmd = self.held_cmd(key, lease, script);
        cmd.arg(now);
        self.update_held(key, lease, script, &cmd).await
    }

    async fn extend(
        &self,
        key: &RecordKey,
        lease: &Lease,
        duration: Duration,
    ) -> Result<Lease, Error> {
        let now = self.clock.now_millis();
        let until = deadline(now, duration);
        let script = &SCRIPTS.extend;
        let mut cmd = self.held_cmd(key, lease, script);
        cmd.arg(until).arg(held_pexpire(now, until));
        self.update_held(key, lease, script, &cmd).await?;
        Ok(Lease::new(lease.owner().to_owned(), lease.fence(), until))
    }

    async fn purge_expired(&self, limit: u32) -> Result<u64, Error> {
        let now = self.clock.now_millis();
        let pattern = format!("{}:{{*", self.prefix);
        let mut connection = self.connection.clone();
        let mut cursor: u64 = 0;
        let mut deleted: u64 = 0;
        while deleted < u64::from(limit) {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut connection)
                .await
                .map_err(store_error)?;
            if !keys.is_empty() {
                let mut invocation = SCRIPTS.purge.prepare_invoke();
                for key in &keys {
                    invocation.key(key.as_slice());
                }
                let done: u64 = invocation
                    .arg(now)
                    .arg(u64::from(limit) - deleted)
                    .invoke_async(&mut connection)
                    .await
                    .map_err(store_error)?;
                deleted += done;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(deleted)
    }
}

/// `EVALSHA <sha1 of script> 1 <redis_key>`: the caller adds the script's `ARGV`. Sent as is
/// (numbers written straight into the command), with no intermediate `ScriptInvocation`.
fn evalsha(script: &Script, redis_key: &str) -> Cmd {
    let mut cmd = Cmd::with_capacity(10, 128 + redis_key.len());
    cmd.arg("EVALSHA")
        .arg(script.get_hash())
        .arg(1)
        .arg(redis_key);
    cmd
}

/// `<prefix>:{<n>:<scope>:<key>}` with `%`, `{`, `}` percent-encoded in scope and key.
fn record_key(prefix: &str, key: &RecordKey) -> String {
    fn escaped(c: char) -> Option<&'static str> {
        match c {
            '%' => Some("%25"),
            '{' => Some("%7B"),
            '}' => Some("%7D"),
            _ => None,
        }
    }
    fn encode(part: &str, out: &mut String) {
        for c in part.chars() {
            match escaped(c) {
                Some(code) => out.push_str(code),
                None => out.push(c),
            }
        }
    }
    // Each escape turns one byte into three.
    let escapes = |part: &str| part.chars().filter(|&c| escaped(c).is_some()).count();
    let scope_len = key.scope().len() + 2 * escapes(key.scope());
    let mut out = String::with_capacity(prefix.len() + scope_len + key.key().len() + 24);
    out.push_str(prefix);
    out.push_str(":{");
    let _ = write!(out, "{scope_len}:");
    encode(key.scope(), &mut out);
    out.push(':');
    encode(key.key(), &mut out);
    out.push('}');
    out
}

/// `now + duration` in ms, no further than the scripts compare exactly.
fn deadline(now: i64, duration: Duration) -> i64 {
    clock::deadline(now, duration).min(MAX_MILLIS)
}

/// The relative Redis TTL for a record that expires at `until`: at least 1 ms.
fn pexpire(now: i64, until: i64) -> i64 {
    until.saturating_sub(now).clamp(1, MAX_MILLIS)
}

/// The relative Redis TTL for an in-progress record whose lease runs to `until`: the lease
/// plus [`IN_PROGRESS_GRACE`].
fn held_pexpire(now: i64, until: i64) -> i64 {
    pexpire(now, until)
        .saturating_add(clock::duration_millis(IN_PROGRESS_GRACE))
        .min(MAX_MILLIS)
}

fn tag(reply: &[Value]) -> Option<&[u8]> {
    match reply.first()? {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

fn unexpected(reply: &[Value]) -> Error {
    store_error(format!("unexpected script reply {reply:?}"))
}

fn store_error(source: impl Into<crate::BoxError>) -> Error {
    Error::Store(StoreError::new(BACKEND, source))
}

fn decode_error(key: &RecordKey, reason: impl Into<crate::BoxError>) -> Error {
    Error::Decode {
        scope: key.scope().to_owned(),
        key: key.key().to_owned(),
        source: reason.into(),
    }
}

/// A driver error on `key`'s record: `WRONGTYPE` means the key holds something else.
fn redis_error(key: &RecordKey, error: RedisError) -> Error {
    if error.code() == Some("WRONGTYPE") {
        decode_error(key, error)
    } else {
        store_error(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(scope: &str, key: &str) -> String {
        record_key("p", &RecordKey::new(scope, key).expect("a valid key"))
    }

    #[test]
    fn record_keys_escape_braces_and_length_prefix_the_scope() {
        assert_eq!(
            key("orders::pay", "A-1{7}"),
            "p:{11:orders::pay:A-1%7B7%7D}"
        );
        assert_eq!(key("s{", "%}"), "p:{4:s%7B:%25%7D}");
        assert_ne!(key("a:b", "c"), key("a", "b:c"));
        assert_ne!(key("s", "{"), key("s", "%7B"));
        assert_ne!(key("1:s", "x"), key("1", "s:x"));
    }

    #[test]
    fn times_stay_exact_in_lua_and_ttls_positive() {
        assert_eq!(deadline(1_000, Duration::MAX), MAX_MILLIS);
        assert_eq!(deadline(1_000, Duration::from_secs(1)), 2_000);
        assert_eq!(pexpire(2_000, 1_000), 1);
        assert_eq!(pexpire(1_000, 1_000), 1);
        assert_eq!(pexpire(1_000, 31_000), 30_000);
        assert_eq!(pexpire(i64::MIN, MAX_MILLIS), MAX_MILLIS);
    }
}
