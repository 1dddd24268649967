//! Shared pieces of idem's benchmarks (`benches/benches/*.rs`): the handler measured through
//! `#[idempotent]`, the same work written by hand on sqlx and redis with idem's own statements
//! (the floor: the wrapper's overhead is the difference), the raw primitives of each store
//! (the physical limit), the peer crate `idempotent` doing the same claim / complete / replay,
//! and the servers on loopback.
//!
//! Servers are found as in `tests/`: `IDEM_POSTGRES_URL`, `IDEM_MYSQL_URL`, `IDEM_REDIS_URL`,
//! with loopback defaults. A server that does not answer is skipped with a line on stderr.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_runtime::{Store, idempotent};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Row};

/// The scope every measured handler (and the hand-written code) keys its records under.
pub const SCOPE: &str = "bench.credit";
/// The lease of a claim, as idem's default.
pub const LEASE: Duration = Duration::from_secs(30);
/// How long a completed result is kept, as idem's default.
pub const TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Connections per SQL pool.
pub const POOL_SIZE: u32 = 32;

/// A delivered message: the business key and an amount.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Paid {
    /// The business key.
    pub order_no: String,
    /// The amount paid.
    pub amount: u64,
}

impl Paid {
    /// The message for `order_no`.
    pub fn new(order_no: String) -> Self {
        Self {
            order_no,
            amount: 250,
        }
    }
}

/// What the handler returns and the store keeps: `note` sets the result's size.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Receipt {
    /// The order credited.
    pub order_no: String,
    /// Points credited.
    pub points: u64,
    /// Filler that sets the size of the stored result.
    pub note: String,
}

impl Receipt {
    /// The body's result for `msg`, with a note of `size` bytes.
    pub fn for_message(msg: &Paid, size: usize) -> Self {
        Self {
            order_no: msg.order_no.clone(),
            points: msg.amount / 10,
            note: "x".repeat(size),
        }
    }
}

/// The benchmarks' error type.
#[derive(Debug)]
pub enum BenchError {
    /// idem refused or failed.
    Idem(idem_runtime::Error),
    /// The body's own statement failed.
    Sql(sqlx::Error),
}

impl From<idem_runtime::Error> for BenchError {
    fn from(error: idem_runtime::Error) -> Self {
        Self::Idem(error)
    }
}

impl From<sqlx::Error> for BenchError {
    fn from(error: sqlx::Error) -> Self {
        Self::Sql(error)
    }
}

/// The measured handler: the `claim` strategy with idem's defaults (the payload fingerprinted,
/// the result stored as JSON). The body builds the receipt and does nothing else.
#[idempotent(key = "order_no", store = store, scope = "bench.credit")]
pub async fn credit<S: Store>(store: &S, size: usize, msg: Paid) -> Result<Receipt, BenchError> {
    Ok(Receipt::for_message(&msg, size))
}

/// [`credit`] without the fingerprint (`fingerprint = false`).
#[idempotent(key = "order_no", store = store, scope = "bench.credit", fingerprint = false)]
pub async fn credit_unchecked<S: Store>(
    store: &S,
    size: usize,
    msg: Paid,
) -> Result<Receipt, BenchError> {
    Ok(Receipt::for_message(&msg, size))
}

/// Milliseconds since the epoch.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        })
}

/// A name no other run uses: `prefix_<pid>_<nanos>`, a valid table name and key prefix.
pub fn unique_name(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// Says on stderr that the benchmarks of `server` are left out, and why.
pub fn skip(server: &str, url: &str, error: &dyn std::fmt::Display) {
    eprintln!("SKIPPED: the {server} benchmarks: {server} at {url} is unreachable ({error})");
}

/// The servers on loopback, as the tests find them.
pub mod servers {
    use std::time::Duration;

    use sqlx::{Connection, Database, Pool};

    /// The PostgreSQL URL: `IDEM_POSTGRES_URL` or loopback.
    pub fn postgres_url() -> String {
        url(
            "IDEM_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        )
    }

    /// The MySQL / MariaDB URL: `IDEM_MYSQL_URL` or loopback.
    pub fn mysql_url() -> String {
        url("IDEM_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
    }

    /// The Redis URL: `IDEM_REDIS_URL` or loopback.
    pub fn redis_url() -> String {
        url("IDEM_REDIS_URL", "redis://127.0.0.1:6379/")
    }

    fn url(var: &str, default: &str) -> String {
        std::env::var(var).unwrap_or_else(|_| default.to_owned())
    }

    /// A pool of [`POOL_SIZE`](crate::POOL_SIZE) connections to `url` with sqlx's default
    /// options but `test_before_acquire`, or `None` (after a skip line).
    pub async fn pool<DB: Database>(
        server: &str,
        url: &str,
        test_before_acquire: bool,
    ) -> Option<Pool<DB>> {
        match tokio::time::timeout(Duration::from_secs(5), DB::Connection::connect(url)).await {
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
            }
            Ok(Err(error)) => {
                crate::skip(server, url, &error);
                return None;
            }
            Err(elapsed) => {
                crate::skip(server, url, &elapsed);
                return None;
            }
        }
        let connected = sqlx::pool::PoolOptions::<DB>::new()
            .max_connections(crate::POOL_SIZE)
            .test_before_acquire(test_before_acquire)
            .connect(url)
            .await;
        match connected {
            Ok(pool) => Some(pool),
            Err(error) => {
                crate::skip(server, url, &error);
                None
            }
        }
    }

    /// A Redis connection manager, or `None` (after a skip line).
    pub async fn redis() -> Option<redis::aio::ConnectionManager> {
        let url = redis_url();
        let connect = async {
            let client = redis::Client::open(url.as_str())?;
            let mut manager = redis::aio::ConnectionManager::new(client).await?;
            redis::cmd("PING")
                .query_async::<()>(&mut manager)
                .await
                .map(|()| manager)
        };
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(manager)) => Some(manager),
            Ok(Err(error)) => {
                crate::skip("Redis", &url, &error);
                None
            }
            Err(elapsed) => {
                crate::skip("Redis", &url, &elapsed);
                None
            }
        }
    }
}

/// The same claim / complete / replay as idem's SQL stores, written by hand on sqlx with the
/// same statements (copied from `idem-runtime/src/sql/{postgres,mysql,sqlite}.rs` and `sql/mod.rs`):
/// no `RecordKey`, no fingerprint, no tracing span, no policy, the result serialized once.
pub mod hand_sql {
    use super::*;

    /// The database a [`HandSql`] runs on.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Dialect {
        /// PostgreSQL: one claim statement that reads a live record first and writes only
        /// when there is none.
        Postgres,
        /// MariaDB: `INSERT … ON DUPLICATE KEY UPDATE … RETURNING` the record it leaves.
        MySql,
        /// SQLite: a read, then (for a key that is not live) `INSERT … ON CONFLICT …
        /// RETURNING fence`.
        Sqlite,
    }

    /// idem's statements for one table.
    #[derive(Clone, Debug)]
    pub struct Statements {
        /// The claim.
        pub claim: Arc<str>,
        /// The read of a record (SQLite reads first).
        pub read: Arc<str>,
        /// The completion.
        pub complete: Arc<str>,
    }

    const MYSQL_TAKEOVER: &str =
        "(owner = VALUES(owner) OR IF(completed = 1, expires_at, lease_until) <= ?)";

    impl Statements {
        /// The statements of `table` in `dialect`.
        pub fn new(dialect: Dialect, table: &str) -> Self {
            match dialect {
                Dialect::Postgres => Self {
                    claim: format!(
                        "WITH live AS (
    SELECT fence, completed, lease_until, expires_at, fingerprint, result
    FROM {table}
    WHERE scope = $1 AND business_key = $2
      AND CASE WHEN completed THEN expires_at > $6 ELSE lease_until > $6 END
), claimed AS (
    INSERT INTO {table} AS r
        (scope, business_key, completed, owner, fence, lease_until, expires_at, fingerprint, result)
    SELECT $1, $2, FALSE, $3, 1, $4, $4, $5, NULL
    WHERE NOT EXISTS (SELECT FROM live)
    ON CONFLICT (scope, business_key) DO UPDATE SET
        completed = FALSE,
        owner = EXCLUDED.owner,
        fence = r.fence + 1,
        lease_until = EXCLUDED.lease_until,
        expires_at = EXCLUDED.expires_at,
        fingerprint = EXCLUDED.fingerprint,
        result = NULL
    WHERE CASE WHEN r.completed THEN r.expires_at <= $6 ELSE r.lease_until <= $6 END
    RETURNING r.fence
)
SELECT TRUE AS acquired, fence, NULL::BOOLEAN AS completed, NULL::BIGINT AS lease_until,
       NULL::BIGINT AS expires_at, NULL::BYTEA AS fingerprint, NULL::BYTEA AS result
FROM claimed
UNION ALL
SELECT FALSE, fence, completed, lease_until, expires_at, fingerprint, result
FROM live"
                    )
                    .into(),
                    read: format!(
                        "SELECT FALSE AS acquired, fence, completed, lease_until, expires_at, fingerprint, result
FROM {table} WHERE scope = $1 AND business_key = $2"
                    )
                    .into(),
                    complete: format!(
                        "UPDATE {table} SET completed = TRUE, result = $1, expires_at = $2 WHERE scope = $3 AND business_key = $4 AND owner = $5 AND fence = $6 AND completed = FALSE"
                    )
                    .into(),
                },
                Dialect::MySql => Self {
                    claim: format!(
                        "INSERT INTO {table}
    (scope, business_key, completed, owner, fence, lease_until, expires_at, fingerprint, result)
VALUES (?, ?, 0, ?, LAST_INSERT_ID(1), ?, ?, ?, NULL)
ON DUPLICATE KEY UPDATE
    fence = IF({{TAKEOVER}}, LAST_INSERT_ID(IF(fence >= 0, fence + 1, 18446744073709551615)), IF(LAST_INSERT_ID(0), fence, fence)),
    owner = IF({{TAKEOVER}}, VALUES(owner), owner),
    completed = IF({{TAKEOVER}}, 0, completed),
    lease_until = IF({{TAKEOVER}}, VALUES(lease_until), lease_until),
    expires_at = IF({{TAKEOVER}}, VALUES(expires_at), expires_at),
    fingerprint = IF({{TAKEOVER}}, VALUES(fingerprint), fingerprint),
    result = IF({{TAKEOVER}}, NULL, result)
RETURNING owner, fence, completed, lease_until, expires_at, fingerprint, result"
                    )
                    .replace("{TAKEOVER}", MYSQL_TAKEOVER)
                    .into(),
                    read: format!(
                        "SELECT completed, lease_until, expires_at, fingerprint, result
FROM {table} WHERE scope = ? AND business_key = ? LOCK IN SHARE MODE"
                    )
                    .into(),
                    complete: format!(
                        "UPDATE {table} SET completed = 1, result = ?, expires_at = ? WHERE scope = ? AND business_key = ? AND owner = ? AND fence = ? AND completed = 0"
                    )
                    .into(),
                },
                Dialect::Sqlite => Self {
                    claim: format!(
                        "INSERT INTO {table}
    (scope, business_key, completed, owner, fence, lease_until, expires_at, fingerprint, result)
VALUES (?1, ?2, 0, ?3, 1, ?4, ?4, ?5, NULL)
ON CONFLICT (scope, business_key) DO UPDATE SET
    completed = 0,
    owner = excluded.owner,
    fence = {table}.fence + 1,
    lease_until = excluded.lease_until,
    expires_at = excluded.expires_at,
    fingerprint = excluded.fingerprint,
    result = NULL
WHERE CASE WHEN {table}.completed = 0
           THEN {table}.lease_until <= ?6
           ELSE {table}.expires_at <= ?6 END
RETURNING fence"
                    )
                    .into(),
                    read: format!(
                        "SELECT completed, lease_until, expires_at, fingerprint, result
FROM {table} WHERE scope = ?1 AND business_key = ?2"
                    )
                    .into(),
                    complete: format!(
                        "UPDATE {table} SET completed = 1, result = ?1, expires_at = ?2 WHERE scope = ?3 AND business_key = ?4 AND owner = ?5 AND fence = ?6 AND completed = 0"
                    )
                    .into(),
                },
            }
        }
    }

    /// Hand-written claim / complete / replay on a pool.
    pub struct HandSql<DB: sqlx::Database> {
        /// The pool.
        pub pool: sqlx::Pool<DB>,
        /// The statements.
        pub statements: Statements,
    }

    fn owner() -> String {
        uuid::Uuid::new_v4().to_string()
    }

    macro_rules! hand_impl {
        ($db:ty, $dialect:expr) => {
            impl HandSql<$db> {
                /// Hand-written code on `pool` and the idem table `table`.
                pub fn new(pool: sqlx::Pool<$db>, table: &str) -> Self {
                    Self {
                        pool,
                        statements: Statements::new($dialect, table),
                    }
                }

                /// Claims `key`, runs the body (a receipt of `size` bytes), stores the result:
                /// what a new key costs by hand. Returns the receipt.
                pub async fn new_key(
                    &self,
                    key: String,
                    size: usize,
                ) -> Result<Receipt, sqlx::Error> {
                    let msg = Paid::new(key);
                    let (owner, fence) = match self.claim(&msg.order_no).await? {
                        Claimed::Acquired { owner, fence } => (owner, fence),
                        Claimed::Completed(_) => panic!("{} is not a new key", msg.order_no),
                    };
                    let receipt = Receipt::for_message(&msg, size);
                    let stored = serde_json::to_vec(&receipt).expect("a receipt serializes");
                    let done = sqlx::query(AssertSqlSafe(self.statements.complete.clone()))
                        .bind(stored.as_slice())
                        .bind(now_millis() + TTL.as_millis() as i64)
                        .bind(SCOPE)
                        .bind(msg.order_no.as_str())
                        .bind(owner.as_str())
                        .bind(fence)
                        .execute(&self.pool)
                        .await?;
                    assert_eq!(done.rows_affected(), 1, "the claim was lost");
                    Ok(receipt)
                }

                /// Claims a completed `key` and decodes its stored result.
                pub async fn replay(&self, key: &str) -> Result<Receipt, sqlx::Error> {
                    match self.claim(key).await? {
                        Claimed::Completed(stored) => {
                            Ok(serde_json::from_slice(&stored).expect("a stored receipt"))
                        }
                        Claimed::Acquired { .. } => panic!("{key} was not completed"),
                    }
                }
            }
        };
    }

    /// What a hand-written claim found.
    pub enum Claimed {
        /// The key is ours: the owner token and fence to complete with.
        Acquired {
            /// The owner token.
            owner: String,
            /// The fence.
            fence: i64,
        },
        /// The key was completed: the stored result.
        Completed(Vec<u8>),
    }

    hand_impl!(sqlx::Postgres, Dialect::Postgres);
    hand_impl!(sqlx::MySql, Dialect::MySql);
    hand_impl!(sqlx::Sqlite, Dialect::Sqlite);

    impl HandSql<sqlx::Postgres> {
        async fn claim(&self, key: &str) -> Result<Claimed, sqlx::Error> {
            let now = now_millis();
            let owner = owner();
            let row = sqlx::query(AssertSqlSafe(self.statements.claim.clone()))
                .bind(SCOPE)
                .bind(key)
                .bind(owner.as_str())
                .bind(now + LEASE.as_millis() as i64)
                .bind(None::<&[u8]>)
                .bind(now)
                .fetch_one(&self.pool)
                .await?;
            if row.try_get::<bool, _>("acquired")? {
                Ok(Claimed::Acquired {
                    owner,
                    fence: row.try_get("fence")?,
                })
            } else {
                Ok(Claimed::Completed(row.try_get("result")?))
            }
        }
    }

    impl HandSql<sqlx::MySql> {
        async fn claim(&self, key: &str) -> Result<Claimed, sqlx::Error> {
            let now = now_millis();
            let until = now + LEASE.as_millis() as i64;
            let owner = owner();
            let mut connection = self.pool.acquire().await?;
            let mut query = sqlx::query(AssertSqlSafe(self.statements.claim.clone()))
                .bind(SCOPE)
                .bind(key)
                .bind(owner.as_str())
                .bind(until)
                .bind(until)
                .bind(None::<&[u8]>);
            for _ in 0..7 {
                query = query.bind(now);
            }
            let row = query.fetch_one(&mut *connection).await?;
            if row.try_get::<Vec<u8>, _>("owner")? == owner.as_bytes() {
                return Ok(Claimed::Acquired {
                    owner,
                    fence: row.try_get("fence")?,
                });
            }
            Ok(Claimed::Completed(row.try_get("result")?))
        }
    }

    impl HandSql<sqlx::Sqlite> {
        async fn claim(&self, key: &str) -> Result<Claimed, sqlx::Error> {
            let now = now_millis();
            let owner = owner();
            let mut connection = self.pool.acquire().await?;
            let found = sqlx::query(AssertSqlSafe(self.statements.read.clone()))
                .bind(SCOPE)
                .bind(key)
                .fetch_optional(&mut *connection)
                .await?;
            if let Some(found) = found {
                return Ok(Claimed::Completed(found.try_get("result")?));
            }
            let row = sqlx::query(AssertSqlSafe(self.statements.claim.clone()))
                .bind(SCOPE)
                .bind(key)
                .bind(owner.as_str())
                .bind(now + LEASE.as_millis() as i64)
                .bind(None::<&[u8]>)
                .bind(now)
                .fetch_one(&mut *connection)
                .await?;
            Ok(Claimed::Acquired {
                owner,
                fence: row.try_get("fence")?,
            })
        }
    }
}

/// The same claim / complete / replay as idem's Redis store, by hand: the same Lua scripts
/// ([`idem_runtime::redis::lua`]) under the same keys, with no `RecordKey`, fingerprint, span
/// or policy.
pub mod hand_redis {
    use redis::aio::ConnectionManager;
    use redis::{Script, Value};

    use super::*;

    /// Hand-written Redis code under a key prefix.
    pub struct HandRedis {
        connection: ConnectionManager,
        prefix: String,
        claim: Script,
        complete: Script,
    }

    impl HandRedis {
        /// Hand-written code on `connection`, records under `prefix` (as `RedisStore::with_prefix`).
        pub fn new(connection: ConnectionManager, prefix: &str) -> Self {
            Self {
                connection,
                prefix: prefix.to_owned(),
                claim: Script::new(&idem_runtime::redis::lua::claim()),
                complete: Script::new(&idem_runtime::redis::lua::complete()),
            }
        }

        /// The record's key, as idem writes it for keys without `%`, `{` or `}`.
        fn key(&self, key: &str) -> String {
            format!("{}:{{{}:{SCOPE}:{key}}}", self.prefix, SCOPE.len())
        }

        async fn claim(&self, key: &str) -> redis::RedisResult<(String, Vec<Value>)> {
            let now = now_millis();
            let until = now + LEASE.as_millis() as i64;
            let owner = uuid::Uuid::new_v4().to_string();
            let grace = 10 * 60 * 1000;
            let reply: Vec<Value> = self
                .claim
                .key(self.key(key))
                .arg(now)
                .arg(owner.as_str())
                .arg(until)
                .arg(until - now + grace)
                .arg("")
                .invoke_async(&mut self.connection.clone())
                .await?;
            Ok((owner, reply))
        }

        /// Claims `key`, runs the body, stores the result.
        pub async fn new_key(&self, key: String, size: usize) -> redis::RedisResult<Receipt> {
            let msg = Paid::new(key);
            let (owner, reply) = self.claim(&msg.order_no).await?;
            let fence = match reply.get(1) {
                Some(Value::Int(fence)) => *fence,
                _ => panic!("{} is not a new key: {reply:?}", msg.order_no),
            };
            let receipt = Receipt::for_message(&msg, size);
            let stored = serde_json::to_vec(&receipt).expect("a receipt serializes");
            let now = now_millis();
            let ttl = TTL.as_millis() as i64;
            let done: Vec<Value> = self
                .complete
                .key(self.key(&msg.order_no))
                .arg(owner.as_str())
                .arg(fence)
                .arg(stored)
                .arg(now + ttl)
                .arg(ttl)
                .invoke_async(&mut self.connection.clone())
                .await?;
            assert!(
                matches!(done.first(), Some(Value::BulkString(tag)) if tag == b"done"),
                "the claim was lost: {done:?}"
            );
            Ok(receipt)
        }

        /// Claims a completed `key` and decodes its stored result.
        pub async fn replay(&self, key: &str) -> redis::RedisResult<Receipt> {
            let (_, reply) = self.claim(key).await?;
            match reply.get(1) {
                Some(Value::BulkString(stored)) => {
                    Ok(serde_json::from_slice(stored).expect("a stored receipt"))
                }
                _ => panic!("{key} was not completed: {reply:?}"),
            }
        }
    }
}

/// The in-memory floor: idem's `MemoryStore` logic by hand, a map under a mutex.
pub mod hand_memory {
    use super::*;

    struct Record {
        completed: bool,
        owner: String,
        fence: u64,
        lease_until: i64,
        expires_at: i64,
        result: Vec<u8>,
    }

    /// Records in a map under a mutex.
    #[derive(Default)]
    pub struct HandMemory {
        records: Mutex<HashMap<String, Record>>,
    }

    impl HandMemory {
        /// Claims `key`, runs the body, stores the result.
        pub fn new_key(&self, key: String, size: usize) -> Receipt {
            let msg = Paid::new(key);
            let now = now_millis();
            let owner = uuid::Uuid::new_v4().to_string();
            let fence = {
                let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
                let fence = match records.get(&msg.order_no) {
                    Some(record) if record.completed && record.expires_at > now => {
                        panic!("{} is not a new key", msg.order_no)
                    }
                    Some(record) if !record.completed && record.lease_until > now => {
                        panic!("{} is in progress", msg.order_no)
                    }
                    Some(record) => record.fence + 1,
                    None => 1,
                };
                records.insert(
                    msg.order_no.clone(),
                    Record {
                        completed: false,
                        owner: owner.clone(),
                        fence,
                        lease_until: now + LEASE.as_millis() as i64,
                        expires_at: now + LEASE.as_millis() as i64,
                        result: Vec::new(),
                    },
                );
                fence
            };
            let receipt = Receipt::for_message(&msg, size);
            let stored = serde_json::to_vec(&receipt).expect("a receipt serializes");
            let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
            let record = records.get_mut(&msg.order_no).expect("the claimed record");
            assert!(!record.completed && record.owner == owner && record.fence == fence);
            record.completed = true;
            record.result = stored;
            record.expires_at = now_millis() + TTL.as_millis() as i64;
            receipt
        }

        /// Claims a completed `key` and decodes its stored result.
        pub fn replay(&self, key: &str) -> Receipt {
            let stored = {
                let records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
                let record = records.get(key).expect("a completed record");
                assert!(record.completed && record.expires_at > now_millis());
                record.result.clone()
            };
            serde_json::from_slice(&stored).expect("a stored receipt")
        }
    }
}

/// The peer: the crates.io crate `idempotent` (0.3) doing the same claim / complete / replay
/// through its `IdempotencyStore` trait, as its docs describe a handler doing it.
pub mod peer {
    use idempotent::entry::ExistingEntry;
    use idempotent::fingerprint::{DefaultFingerprintStrategy, FingerprintStrategy};
    use idempotent::store::{IdempotencyStore, InsertResult};
    use idempotent::{CachedResponse, IdempotencyEntry, IdempotencyKey, Metadata};

    use super::*;

    /// Claims `key` in `store`, runs the body, completes with the JSON receipt as the cached
    /// response's body; or, for a completed key, decodes the stored receipt.
    pub async fn handle<S: IdempotencyStore>(store: &S, key: String, size: usize) -> Receipt {
        let msg = Paid::new(key);
        let payload = serde_json::to_vec(&msg).expect("a message serializes");
        let fingerprint = DefaultFingerprintStrategy.compute(SCOPE, &payload);
        let key = IdempotencyKey::new(msg.order_no.clone()).expect("a valid key");
        let entry = IdempotencyEntry::new(fingerprint, TTL);
        match store.try_insert(&key, entry.clone()).await {
            Ok(InsertResult::Claimed { fencing_token }) => {
                let receipt = Receipt::for_message(&msg, size);
                let response = CachedResponse {
                    status_code: 200,
                    metadata: Metadata::default(),
                    body: serde_json::to_vec(&receipt)
                        .expect("a receipt serializes")
                        .into(),
                };
                if store
                    .complete(&key, entry.complete(response), fencing_token)
                    .await
                    .is_err()
                {
                    panic!("the peer could not complete {key}");
                }
                receipt
            }
            Ok(InsertResult::Exists(ExistingEntry::Completed(done))) => {
                serde_json::from_slice(&done.response().body).expect("a stored receipt")
            }
            Ok(InsertResult::Exists(ExistingEntry::Processing(_))) => {
                panic!("{key} is in progress")
            }
            Err(_) => panic!("the peer's store failed on {key}"),
        }
    }
}
