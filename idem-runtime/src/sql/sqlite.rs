//! A store in a SQLite database, over sqlx.
//!
//! One table, `idem_records` (see `src/sql/sqlite.sql` in the crate, or run
//! [`SqliteStore::migrate`]). The claim reads the record first: a live one (completed, or in
//! progress within its lease) answers at once, without taking the database's write lock, so
//! a replay is one read that neither waits for writers nor holds them up. Otherwise a single
//! `INSERT … ON CONFLICT … DO UPDATE … WHERE <expired or released> RETURNING fence` statement
//! inserts the record or takes over an expired one, atomically; only when it changed nothing
//! (another call claimed the key in between) does a read follow to say what holds the key. A
//! new key costs a read, the claim statement and the completion. In a transaction
//! ([`tx`](crate::tx)) the claim statement goes first, without the read. `complete`,
//! `release` and `extend` are one `UPDATE` each, conditional on the owner and the fence.
//!
//! A file database survives a restart and can be shared by the processes of one host (use
//! WAL, which [`SqliteStore::connect`] turns on). An in-memory database
//! ([`SqliteStore::in_memory`]) lives as long as its pool.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{
    Sqlite, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
};

use crate::clock;
use crate::sql::{self, Found, Table, decode_error, sql, store_error, stored_fence};
use crate::store::{Claim, Lease, new_owner};
use crate::{Error, Fingerprint, RecordKey};

/// The schema for the default table: `CREATE TABLE IF NOT EXISTS idem_records …` and its
/// expiry index (the file `src/sql/sqlite.sql` of this crate).
pub const SCHEMA: &str = include_str!("sqlite.sql");

/// The default table name.
pub const DEFAULT_TABLE: &str = "idem_records";

/// The statements of one table, built once from its checked name.
#[derive(Debug)]
struct Statements {
    schema: Arc<str>,
    claim: Arc<str>,
    read: Arc<str>,
}

impl Statements {
    /// `table` must have passed `name::sql_identifier`.
    fn new(table: &str) -> Self {
        Self {
            schema: sql::schema_for(SCHEMA, table).into(),
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
        }
    }
}

/// The bounded delete of expired records.
const PURGE: &str = "DELETE FROM {table} WHERE rowid IN
    (SELECT rowid FROM {table} WHERE expires_at <= ?1 LIMIT ?2)";

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
    table: Table<Sqlite>,
    statements: Arc<Statements>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url`, such as `sqlite://idem.db`, in WAL
    /// mode with a 5 second busy timeout.
    ///
    /// Processes that open a new file at the same moment all switch it to WAL, which takes a
    /// lock SQLite's busy timeout does not wait for: an open that finds the database locked is
    /// tried again (for up to the busy timeout) instead of failing.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if the URL is malformed or the database cannot be opened.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
        const LONGEST_PAUSE: Duration = Duration::from_millis(100);
        let options = SqliteConnectOptions::from_str(url)
            .map_err(store_error::<Sqlite>)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT);
        let deadline = tokio::time::Instant::now() + BUSY_TIMEOUT;
        let mut pause = Duration::from_millis(5);
        loop {
            match SqlitePoolOptions::new().connect_with(options.clone()).await {
                Ok(pool) => return Ok(Self::new(pool)),
                Err(error) if is_busy(&error) && tokio::time::Instant::now() + pause < deadline => {
                    tracing::debug!(%error, "the database is locked while it opens; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(LONGEST_PAUSE);
                }
                Err(error) => return Err(store_error::<Sqlite>(error)),
            }
        }
    }

    /// A store in a private in-memory database (one connection that lives as long as the
    /// store and its clones).
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if SQLite cannot open the database.
    pub async fn in_memory() -> Result<Self, Error> {
        let options =
            SqliteConnectOptions::from_str("sqlite::memory:").map_err(store_error::<Sqlite>)?;
        let pool = SqlitePoolOptions::new()
            .min_connections(1)
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(store_error::<Sqlite>)?;
        Ok(Self::new(pool))
    }

    /// Creates the table and its index if they do not exist; safe to run many times.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if the statements fail.
    pub async fn migrate(&self) -> Result<(), Error> {
        sqlx::raw_sql(sql(&self.statements.schema))
            .execute(&self.table.pool)
            .await
            .map_err(store_error::<Sqlite>)?;
        Ok(())
    }

    async fn try_claim(
        &self,
        connection: &mut sqlx::SqliteConnection,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Option<Claim>, Error> {
        let now = self.table.clock.now_millis();
        let until = clock::deadline(now, lease);
        let owner = new_owner();
        let claimed = sqlx::query(sql(&self.statements.claim))
            .bind(key.scope())
            .bind(key.key())
            .bind(&owner)
            .bind(until)
            .bind(fingerprint.map(|f| f.as_bytes().as_slice()))
            .bind(now)
            .fetch_optional(&mut *connection)
            .await
            .map_err(store_error::<Sqlite>)?;
        if let Some(row) = claimed {
            let fence = row.try_get(0).map_err(|source| decode_error(key, source))?;
            let fence = stored_fence(key, fence)?;
            return Ok(Some(Claim::Acquired(Lease::new(owner, fence, until))));
        }

        match self.read(&mut *connection, key).await? {
            Some(found) => found.answer(key, now, fingerprint),
            None => Ok(None), // purged since: claim again
        }
    }

    /// A claim that is a transaction of its own ([`Store::claim`](crate::Store::claim)): it
    /// reads first, and a live record (completed, or in progress within its lease) answers
    /// without taking the database's write lock, so replays neither wait for writers nor
    /// hold them up. Otherwise it claims as [`try_claim`](Self::try_claim) does. (In a
    /// transaction the claim statement goes first: a deferred transaction that reads and then
    /// writes can fail to take the write lock.)
    async fn claim_alone(
        &self,
        connection: &mut sqlx::SqliteConnection,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Option<Claim>, Error> {
        let now = self.table.clock.now_millis();
        if let Some(found) = self.read(&mut *connection, key).await?
            && let Some(claim) = found.answer(key, now, fingerprint)?
        {
            return Ok(Some(claim));
        }
        self.try_claim(connection, key, fingerprint, lease).await
    }

    /// The record of `key`, if there is one.
    async fn read(
        &self,
        connection: &mut sqlx::SqliteConnection,
        key: &RecordKey,
    ) -> Result<Option<Found>, Error> {
        let Some(row) = sqlx::query(sql(&self.statements.read))
            .bind(key.scope())
            .bind(key.key())
            .fetch_optional(&mut *connection)
            .await
            .map_err(store_error::<Sqlite>)?
        else {
            return Ok(None);
        };
        let corrupt = |source: sqlx::Error| decode_error(key, source);
        let completed = match row.try_get::<i64, _>(0).map_err(corrupt)? {
            0 => false,
            1 => true,
            other => return Err(decode_error(key, format!("`completed` is {other}"))),
        };
        Ok(Some(Found {
            completed,
            lease_until: row.try_get(1).map_err(corrupt)?,
            expires_at: row.try_get(2).map_err(corrupt)?,
            fingerprint: row.try_get(3).map_err(corrupt)?,
            result: row.try_get(4).map_err(corrupt)?,
        }))
    }
}

/// Whether `error` is SQLite's `SQLITE_BUSY` ("database is locked", in any of its extended
/// codes).
fn is_busy(error: &sqlx::Error) -> bool {
    const SQLITE_BUSY: i32 = 5;
    match error {
        sqlx::Error::Database(database) => database
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| code & 0xff == SQLITE_BUSY),
        _ => false,
    }
}

sql::sql_store!(SqliteStore, Sqlite, SqlitePool);

sql::insert_once_fn!(Sqlite);
