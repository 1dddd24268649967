//! A store in a SQLite database, over sqlx.
//!
//! One table, `idem_records` (see `sql/sqlite.sql` in the crate, or run
//! [`SqliteStore::migrate`]). The claim is a single `INSERT … ON CONFLICT … DO UPDATE … WHERE
//! <expired or released> RETURNING fence` statement: it either inserts the record, takes over
//! an expired one, or changes nothing, atomically. Only when it changed nothing does a second
//! statement read what holds the key. `complete`, `release` and `extend` are one `UPDATE` each,
//! conditional on the owner and the fence.
//!
//! A file database survives a restart and can be shared by the processes of one host (use
//! WAL, which [`SqliteStore::connect`] turns on). An in-memory database
//! ([`SqliteStore::in_memory`]) lives as long as its pool.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, Row};

use crate::clock::{self, Clock, SystemClock};
use crate::name;
use crate::record::{CLAIM_ATTEMPTS, Found, decode_error, fence_param, stored_fence};
use crate::store::{Claim, Lease, Store, lease_lost, new_owner};
use crate::{Error, Fingerprint, RecordKey, StoreError};

const BACKEND: &str = "sqlite";

/// The schema for the default table: `CREATE TABLE IF NOT EXISTS idem_records …` and its
/// expiry index (the file `sql/sqlite.sql` of this crate).
pub const SCHEMA: &str = include_str!("../sql/sqlite.sql");

/// The default table name.
pub const DEFAULT_TABLE: &str = "idem_records";

/// The statements of one table, built once from its checked name.
#[derive(Debug)]
struct Statements {
    schema: String,
    claim: Arc<str>,
    read: Arc<str>,
    complete: Arc<str>,
    release: Arc<str>,
    extend: Arc<str>,
    purge: Arc<str>,
}

impl Statements {
    /// `table` must have passed `name::sql_identifier`.
    fn new(table: &str) -> Self {
        Self {
            schema: SCHEMA.replace(DEFAULT_TABLE, table),
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
                "UPDATE {table} SET completed = 1, result = ?1, expires_at = ?2
WHERE scope = ?3 AND business_key = ?4 AND owner = ?5 AND fence = ?6 AND completed = 0"
            )
            .into(),
            release: format!(
                "UPDATE {table} SET lease_until = ?1, expires_at = ?1
WHERE scope = ?2 AND business_key = ?3 AND owner = ?4 AND fence = ?5 AND completed = 0"
            )
            .into(),
            extend: format!(
                "UPDATE {table} SET lease_until = ?1, expires_at = ?1
WHERE scope = ?2 AND business_key = ?3 AND owner = ?4 AND fence = ?5 AND completed = 0"
            )
            .into(),
            purge: format!(
                "DELETE FROM {table} WHERE rowid IN
    (SELECT rowid FROM {table} WHERE expires_at <= ?1 LIMIT ?2)"
            )
            .into(),
        }
    }
}

fn sql(statement: &Arc<str>) -> AssertSqlSafe<Arc<str>> {
    // Built from a checked identifier and fixed text; every value is bound.
    AssertSqlSafe(statement.clone())
}

/// A store in a SQLite database.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idem_runtime::Error> {
/// use idem_runtime::sqlite::SqliteStore;
///
/// let store = SqliteStore::in_memory().await?;
/// store.migrate().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    clock: Arc<dyn Clock>,
    table: Arc<str>,
    statements: Arc<Statements>,
}

impl SqliteStore {
    /// A store on a pool the application already has. Run [`SqliteStore::migrate`] once
    /// before use (or apply [`SCHEMA`] with your own migrations).
    pub fn new(pool: SqlitePool) -> Self {
        Self {
            pool,
            clock: Arc::new(SystemClock),
            table: DEFAULT_TABLE.into(),
            statements: Arc::new(Statements::new(DEFAULT_TABLE)),
        }
    }

    /// The same store on the table `table` instead of `idem_records`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] unless `table` is a plain identifier (ASCII letter or `_`, then
    /// letters, digits or `_`, at most 63 bytes); it is never quoted or pasted unchecked.
    pub fn with_table(mut self, table: &str) -> Result<Self, Error> {
        name::sql_identifier("table name", table)?;
        self.table = table.into();
        self.statements = Arc::new(Statements::new(table));
        Ok(self)
    }

    /// The table the records live in.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Opens (creating if missing) the database at `url`, such as `sqlite://idem.db`, in WAL
    /// mode with a 5 second busy timeout.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if the URL is malformed or the database cannot be opened.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(store_error)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .connect_with(options)
            .await
            .map_err(store_error)?;
        Ok(Self::new(pool))
    }

    /// A store in a private in-memory database (one connection that lives as long as the
    /// store and its clones).
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if SQLite cannot open the database.
    pub async fn in_memory() -> Result<Self, Error> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:").map_err(store_error)?;
        let pool = SqlitePoolOptions::new()
            .min_connections(1)
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(store_error)?;
        Ok(Self::new(pool))
    }

    /// The same store on another clock (a [`ManualClock`](crate::clock::ManualClock) in tests).
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Creates the table and its index if they do not exist; safe to run many times.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if the statements fail.
    pub async fn migrate(&self) -> Result<(), Error> {
        sqlx::raw_sql(AssertSqlSafe(self.statements.schema.clone()))
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn try_claim(
        &self,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Option<Claim>, Error> {
        let now = self.clock.now_millis();
        let until = clock::deadline(now, lease);
        let owner = new_owner();
        let claimed = sqlx::query(sql(&self.statements.claim))
            .bind(key.scope())
            .bind(key.key())
            .bind(&owner)
            .bind(until)
            .bind(fingerprint.map(|f| f.as_bytes().as_slice()))
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(store_error)?;
        if let Some(row) = claimed {
            let fence = row.try_get(0).map_err(|source| decode_error(key, source))?;
            let fence = stored_fence(key, fence)?;
            return Ok(Some(Claim::Acquired(Lease::new(owner, fence, until))));
        }

        let Some(row) = sqlx::query(sql(&self.statements.read))
            .bind(key.scope())
            .bind(key.key())
            .fetch_optional(&self.pool)
            .await
            .map_err(store_error)?
        else {
            return Ok(None); // purged since: claim again
        };
        let corrupt = |source: sqlx::Error| decode_error(key, source);
        let completed = match row.try_get::<i64, _>(0).map_err(corrupt)? {
            0 => false,
            1 => true,
            other => return Err(decode_error(key, format!("`completed` is {other}"))),
        };
        Found {
            completed,
            lease_until: row.try_get(1).map_err(corrupt)?,
            expires_at: row.try_get(2).map_err(corrupt)?,
            fingerprint: row.try_get(3).map_err(corrupt)?,
            result: row.try_get(4).map_err(corrupt)?,
        }
        .answer(key, now, fingerprint)
    }

    async fn update_held(
        &self,
        statement: &Arc<str>,
        first: i64,
        key: &RecordKey,
        lease: &Lease,
    ) -> Result<(), Error> {
        let fence = fence_param(key, lease)?;
        let done = sqlx::query(sql(statement))
            .bind(first)
            .bind(key.scope())
            .bind(key.key())
            .bind(lease.owner())
            .bind(fence)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        if done.rows_affected() == 0 {
            return Err(lease_lost(key, lease));
        }
        Ok(())
    }
}

impl Store for SqliteStore {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, Error> {
        for _ in 0..CLAIM_ATTEMPTS {
            if let Some(claim) = self.try_claim(key, fingerprint, lease).await? {
                return Ok(claim);
            }
        }
        Err(store_error(format!(
            "the record for {key} kept changing during {CLAIM_ATTEMPTS} claim attempts"
        )))
    }

    async fn complete(
        &self,
        key: &RecordKey,
        lease: &Lease,
        result: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        let expires_at = clock::deadline(self.clock.now_millis(), ttl);
        let fence = fence_param(key, lease)?;
        let done = sqlx::query(sql(&self.statements.complete))
            .bind(result)
            .bind(expires_at)
            .bind(key.scope())
            .bind(key.key())
            .bind(lease.owner())
            .bind(fence)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        if done.rows_affected() == 0 {
            return Err(lease_lost(key, lease));
        }
        Ok(())
    }

    async fn release(&self, key: &RecordKey, lease: &Lease) -> Result<(), Error> {
        self.update_held(
            &self.statements.release,
            self.clock.now_millis(),
            key,
            lease,
        )
        .await
    }

    async fn extend(
        &self,
        key: &RecordKey,
        lease: &Lease,
        duration: Duration,
    ) -> Result<Lease, Error> {
        let until = clock::deadline(self.clock.now_millis(), duration);
        self.update_held(&self.statements.extend, until, key, lease)
            .await?;
        Ok(Lease::new(lease.owner().to_owned(), lease.fence(), until))
    }

    async fn purge_expired(&self, limit: u32) -> Result<u64, Error> {
        let done = sqlx::query(sql(&self.statements.purge))
            .bind(self.clock.now_millis())
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(done.rows_affected())
    }
}

fn store_error(source: impl Into<crate::BoxError>) -> Error {
    Error::Store(StoreError::new(BACKEND, source))
}
