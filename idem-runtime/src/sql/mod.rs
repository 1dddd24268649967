//! What the SQL stores share: the pool, clock and table of a store, the statements that are
//! the same in every dialect (complete, release, extend, purge), reading back a record that a
//! claim did not take, and the errors for stored values that do not decode.
//!
//! Each store keeps its own claim, the one statement where the dialects differ.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{AssertSqlSafe, Database, Encode, Executor, IntoArguments, Pool, Type};

use crate::clock::{self, Clock, SystemClock};
use crate::name;
use crate::store::{Claim, Lease, lease_lost};
use crate::tx::{TxClaim, TxLease};
use crate::unique::Inserted;
use crate::{Error, Fingerprint, RecordKey, StoreError};

mod sealed {
    pub trait Sealed {}
}

/// The SQL dialect of a [`Backend`], for the statements idem writes differently per database.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    MySql,
}

/// A database idem's SQL stores run on: PostgreSQL, MySQL / MariaDB or SQLite. Sealed: what it
/// says about a database is idem's business (its name, literals, placeholders).
pub trait Backend: Database + sealed::Sealed {
    /// The store's name in [`StoreError`]s.
    const BACKEND: &'static str;

    /// The database's SQL dialect.
    #[doc(hidden)]
    const DIALECT: Dialect;

    /// The literal of a completed record's `completed` column.
    const COMPLETED: &'static str;

    /// The literal of an in-progress record's `completed` column.
    const IN_PROGRESS: &'static str;

    /// How many rows a statement changed.
    fn rows_affected(done: &Self::QueryResult) -> u64;

    /// The id a statement reported with its result: MySQL's `last_insert_id` (an
    /// `AUTO_INCREMENT` value, or what the statement passed to `LAST_INSERT_ID(expr)`),
    /// SQLite's last inserted rowid; PostgreSQL reports none.
    fn insert_id(done: &Self::QueryResult) -> Option<u64>;

    /// The `n`th (from 1) parameter placeholder.
    fn placeholder(n: usize) -> String;

    /// What turns a `SELECT` into a read of the latest committed row (MySQL's consistent reads
    /// would otherwise see the transaction's snapshot).
    const LOCKING_READ: &'static str = "";

    /// The statements that bound how long the statements after them in a transaction wait for
    /// a row lock to `wait`, and the one that puts the bound in force before back; `None` where
    /// idem leaves it to the database (SQLite, whose writers wait out the busy timeout).
    #[doc(hidden)]
    fn lock_wait(wait: Duration) -> Option<(String, &'static str)> {
        let _ = wait;
        None
    }

    /// Whether `error` is a row-lock wait that ran out of the time [`lock_wait`](Self::lock_wait)
    /// gave it.
    #[doc(hidden)]
    fn is_lock_timeout(error: &sqlx::Error) -> bool {
        let _ = error;
        false
    }
}

#[cfg(feature = "sqlite")]
impl sealed::Sealed for sqlx::Sqlite {}

#[cfg(feature = "sqlite")]
impl Backend for sqlx::Sqlite {
    const BACKEND: &'static str = "sqlite";
    const DIALECT: Dialect = Dialect::Sqlite;
    const COMPLETED: &'static str = "1";
    const IN_PROGRESS: &'static str = "0";

    fn rows_affected(done: &Self::QueryResult) -> u64 {
        done.rows_affected()
    }

    fn insert_id(done: &Self::QueryResult) -> Option<u64> {
        u64::try_from(done.last_insert_rowid()).ok()
    }

    fn placeholder(n: usize) -> String {
        format!("?{n}")
    }
}

#[cfg(feature = "postgres")]
impl sealed::Sealed for sqlx::Postgres {}

#[cfg(feature = "postgres")]
impl Backend for sqlx::Postgres {
    const BACKEND: &'static str = "postgres";
    const DIALECT: Dialect = Dialect::Postgres;
    const COMPLETED: &'static str = "TRUE";
    const IN_PROGRESS: &'static str = "FALSE";

    fn rows_affected(done: &Self::QueryResult) -> u64 {
        done.rows_affected()
    }

    fn insert_id(_: &Self::QueryResult) -> Option<u64> {
        None
    }

    fn placeholder(n: usize) -> String {
        format!("${n}")
    }

    const LOCKING_READ: &'static str = " FOR SHARE";

    fn lock_wait(wait: Duration) -> Option<(String, &'static str)> {
        // Local to the transaction, so it ends with it whatever happens; the value in force
        // before (the session's, or the transaction's own) is kept aside and put back.
        let millis = wait.as_millis().clamp(1, i32::MAX as u128);
        Some((
            format!(
                "SELECT set_config('idem.lock_timeout', current_setting('lock_timeout'), true); \
                 SET LOCAL lock_timeout = {millis}"
            ),
            "SELECT set_config('lock_timeout', current_setting('idem.lock_timeout'), true)",
        ))
    }

    fn is_lock_timeout(error: &sqlx::Error) -> bool {
        // lock_not_available
        matches!(error, sqlx::Error::Database(database) if database.code().as_deref() == Some("55P03"))
    }
}

#[cfg(feature = "mysql")]
impl sealed::Sealed for sqlx::MySql {}

#[cfg(feature = "mysql")]
impl Backend for sqlx::MySql {
    const BACKEND: &'static str = "mysql";
    const DIALECT: Dialect = Dialect::MySql;
    const COMPLETED: &'static str = "1";
    const IN_PROGRESS: &'static str = "0";

    fn rows_affected(done: &Self::QueryResult) -> u64 {
        done.rows_affected()
    }

    fn insert_id(done: &Self::QueryResult) -> Option<u64> {
        Some(done.last_insert_id())
    }

    fn placeholder(_: usize) -> String {
        "?".to_owned()
    }

    const LOCKING_READ: &'static str = " LOCK IN SHARE MODE";

    fn lock_wait(wait: Duration) -> Option<(String, &'static str)> {
        // Whole seconds, at least one. The setting belongs to the session, which outlives the
        // transaction on its pooled connection: the session's value is kept aside in a user
        // variable and put back after the claim.
        let seconds = wait.as_millis().div_ceil(1000).clamp(1, 1 << 30);
        Some((
            format!(
                "SET @idem_lock_wait = @@SESSION.innodb_lock_wait_timeout; \
                 SET SESSION innodb_lock_wait_timeout = {seconds}"
            ),
            "SET SESSION innodb_lock_wait_timeout = @idem_lock_wait",
        ))
    }

    fn is_lock_timeout(error: &sqlx::Error) -> bool {
        // ER_LOCK_WAIT_TIMEOUT
        match error {
            sqlx::Error::Database(database) => database
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .is_some_and(|mysql| mysql.number() == 1205),
            _ => false,
        }
    }
}

/// The statements every dialect writes alike, for one table.
#[derive(Debug)]
struct Shared {
    complete: Arc<str>,
    hold: Arc<str>,
    purge: Arc<str>,
}

impl Shared {
    /// `table` must have passed `name::sql_identifier`.
    fn new<DB: Backend>(table: &str, purge: &str) -> Self {
        let p = DB::placeholder;
        let held = format!(
            "scope = {} AND business_key = {} AND owner = {} AND fence = {} AND completed = {}",
            p(3),
            p(4),
            p(5),
            p(6),
            DB::IN_PROGRESS,
        );
        Self {
            complete: format!(
                "UPDATE {table} SET completed = {}, result = {}, expires_at = {} WHERE {held}",
                DB::COMPLETED,
                p(1),
                p(2)
            )
            .into(),
            hold: format!(
                "UPDATE {table} SET lease_until = {}, expires_at = {} WHERE {held}",
                p(1),
                p(2)
            )
            .into(),
            purge: purge.replace("{table}", table).into(),
        }
    }
}

/// The schema `schema` (written for `idem_records`) for the table `table`. Its expiry index is
/// `<table>_expires_at`, unless that would pass 63 bytes (PostgreSQL cuts longer names, so the
/// index of a 63-byte table would be named like the table and silently not created; MySQL
/// refuses names over 64): then it is the first 42 bytes of the table name, `_`, 8 hex digits of the
/// name's SHA-256, and `_expires_at`.
pub(crate) fn schema_for(schema: &str, table: &str) -> String {
    use sha2::{Digest, Sha256};
    const DEFAULT_INDEX: &str = "idem_records_expires_at";
    let mut index = format!("{table}_expires_at");
    if index.len() > name::MAX_IDENTIFIER_LEN {
        let digest = Sha256::digest(table.as_bytes());
        // `table` is ASCII (a checked identifier), so any byte index is a char boundary.
        index = format!(
            "{}_{:02x}{:02x}{:02x}{:02x}_expires_at",
            &table[..42],
            digest[0],
            digest[1],
            digest[2],
            digest[3]
        );
    }
    schema
        .replace(DEFAULT_INDEX, &index)
        .replace("idem_records", table)
}

/// A statement built from a checked identifier and fixed text, every value bound.
pub(crate) fn sql(statement: &Arc<str>) -> AssertSqlSafe<Arc<str>> {
    AssertSqlSafe(statement.clone())
}

/// The pool, clock and table of a SQL store, and the operations every dialect shares.
#[derive(Debug)]
pub(crate) struct Table<DB: Database> {
    pub(crate) pool: Pool<DB>,
    pub(crate) clock: Arc<dyn Clock>,
    name: Arc<str>,
    shared: Arc<Shared>,
    purge: &'static str,
}

impl<DB: Database> Clone for Table<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            clock: self.clock.clone(),
            name: self.name.clone(),
            shared: self.shared.clone(),
            purge: self.purge,
        }
    }
}

impl<DB> Table<DB>
where
    DB: Backend,
    for<'c> &'c Pool<DB>: Executor<'c, Database = DB>,
    <DB as Database>::Arguments: IntoArguments<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'a, 't> &'a str: Encode<'t, DB> + Type<DB>,
    for<'a, 't> &'a [u8]: Encode<'t, DB> + Type<DB>,
{
    /// The table `table` (already checked) of `pool` on the system clock. `purge` is the
    /// dialect's bounded delete of expired records, with `{table}` for the table and the
    /// parameters now and limit.
    pub(crate) fn new(pool: Pool<DB>, table: &str, purge: &'static str) -> Self {
        Self {
            pool,
            clock: Arc::new(SystemClock),
            name: table.into(),
            shared: Arc::new(Shared::new::<DB>(table, purge)),
            purge,
        }
    }

    /// The same store on the table `table`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] unless `table` is a plain identifier.
    pub(crate) fn renamed(&self, table: &str) -> Result<Self, Error> {
        name::sql_identifier("table name", table)?;
        Ok(Self {
            name: table.into(),
            shared: Arc::new(Shared::new::<DB>(table, self.purge)),
            ..self.clone()
        })
    }

    /// The table's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Records `result` for the held `lease`, kept for `ttl`, through `executor` (the pool,
    /// or the connection of a transaction).
    pub(crate) async fn complete<'c, E>(
        &self,
        executor: E,
        key: &RecordKey,
        lease: &Lease,
        result: &[u8],
        ttl: Duration,
    ) -> Result<(), Error>
    where
        E: Executor<'c, Database = DB>,
    {
        let expires_at = clock::deadline(self.clock.now_millis(), ttl);
        let done = sqlx::query::<DB>(sql(&self.shared.complete))
            .bind(result)
            .bind(expires_at)
            .bind(key.scope())
            .bind(key.key())
            .bind(lease.owner())
            .bind(fence_param(key, lease)?)
            .execute(executor)
            .await
            .map_err(store_error::<DB>)?;
        if DB::rows_affected(&done) == 0 {
            return Err(lease_lost(key, lease));
        }
        Ok(())
    }

    /// Gives the held key up: its lease and record end now.
    pub(crate) async fn release(&self, key: &RecordKey, lease: &Lease) -> Result<(), Error> {
        self.hold(key, lease, self.clock.now_millis()).await
    }

    /// Moves the held lease to `duration` from now.
    pub(crate) async fn extend(
        &self,
        key: &RecordKey,
        lease: &Lease,
        duration: Duration,
    ) -> Result<Lease, Error> {
        let until = clock::deadline(self.clock.now_millis(), duration);
        self.hold(key, lease, until).await?;
        Ok(Lease::new(lease.owner().to_owned(), lease.fence(), until))
    }

    async fn hold(&self, key: &RecordKey, lease: &Lease, until: i64) -> Result<(), Error> {
        let done = sqlx::query::<DB>(sql(&self.shared.hold))
            .bind(until)
            .bind(until)
            .bind(key.scope())
            .bind(key.key())
            .bind(lease.owner())
            .bind(fence_param(key, lease)?)
            .execute(&self.pool)
            .await
            .map_err(store_error::<DB>)?;
        if DB::rows_affected(&done) == 0 {
            return Err(lease_lost(key, lease));
        }
        Ok(())
    }

    /// Deletes up to `limit` expired records.
    pub(crate) async fn purge_expired(&self, limit: u32) -> Result<u64, Error> {
        let done = sqlx::query::<DB>(sql(&self.shared.purge))
            .bind(self.clock.now_millis())
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await
            .map_err(store_error::<DB>)?;
        Ok(DB::rows_affected(&done))
    }
}

/// Runs `attempt` until it settles the claim (`Some`), at most [`CLAIM_ATTEMPTS`] times; a
/// deadlock or serialization failure (SQLSTATE 40001 or 40P01), which rolled the statement
/// back, is attempted again too.
pub(crate) async fn claim<DB, F, Fut>(key: &RecordKey, mut attempt: F) -> Result<Claim, Error>
where
    DB: Backend,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<Claim>, Error>>,
{
    for _ in 0..CLAIM_ATTEMPTS {
        match attempt().await {
            Ok(Some(claim)) => return Ok(claim),
            Ok(None) => {}
            Err(error) if is_conflict(&error) => {
                tracing::debug!(%error, "the claim met a deadlock; claiming again");
            }
            Err(error) => return Err(error),
        }
    }
    Err(store_error::<DB>(format!(
        "the record for {key} kept changing during {CLAIM_ATTEMPTS} claim attempts"
    )))
}

/// The error of a claim statement: an arithmetic overflow (SQLSTATE 22003) can only come from
/// raising a stored fence that is already at its maximum, a record no claim writes, so it is
/// [`Error::Decode`]; anything else is [`Error::Store`].
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) fn claim_error<DB: Backend>(key: &RecordKey, error: sqlx::Error) -> Error {
    match &error {
        sqlx::Error::Database(database) if database.code().as_deref() == Some("22003") => {
            decode_error(key, format!("`fence` cannot rise: {database}"))
        }
        _ => store_error::<DB>(error),
    }
}

/// [`TxStore::claim_in`](crate::tx::TxStore::claim_in) with the wait on another transaction's
/// record bounded by `wait` where the database lets idem bound it: a claim that waited that
/// long is [`Error::InProgress`].
pub(crate) async fn claim_in_within<DB, F>(
    tx: &mut sqlx::Transaction<'_, DB>,
    key: &RecordKey,
    lease: Duration,
    wait: Duration,
    claim: F,
) -> Result<TxClaim, Error>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    F: AsyncFnOnce(&mut sqlx::Transaction<'_, DB>) -> Result<TxClaim, Error>,
{
    let Some((bound, unbound)) = DB::lock_wait(wait) else {
        return claim(tx).await;
    };
    sqlx::raw_sql(AssertSqlSafe(bound))
        .execute(&mut **tx)
        .await
        .map_err(store_error::<DB>)?;
    let claimed = match claim(tx).await {
        Err(Error::Store(store)) if is_lock_timeout::<DB>(&store) => Err(Error::InProgress {
            scope: key.scope().to_owned(),
            key: key.key().to_owned(),
            retry_after: lease,
        }),
        other => other,
    };
    // The handler's own statements wait as the session says; and on MySQL the session outlives
    // the transaction, on its pooled connection.
    let lifted = sqlx::raw_sql(AssertSqlSafe(unbound.to_owned()))
        .execute(&mut **tx)
        .await
        .map_err(store_error::<DB>);
    match (claimed, lifted) {
        (claimed, Ok(_)) => claimed,
        (Err(claim), Err(_)) => Err(claim),
        // As every error of a claim: nothing of it stays in the transaction.
        (Ok(TxClaim::Run(claim)), Err(error)) => {
            match abandon::<DB>(&mut **tx, claim.savepoint()).await {
                Ok(()) => Err(error),
                Err(undo) => Err(store_error::<DB>(format!("{error}; then {undo}"))),
            }
        }
        (Ok(TxClaim::Completed(_)), Err(error)) => Err(error),
    }
}

fn is_lock_timeout<DB: Backend>(store: &StoreError) -> bool {
    std::error::Error::source(store)
        .and_then(|source| source.downcast_ref::<sqlx::Error>())
        .is_some_and(DB::is_lock_timeout)
}

/// Whether `error` is a deadlock or serialization failure: the database rolled the
/// statement back, and running it again may succeed.
fn is_conflict(error: &Error) -> bool {
    let Error::Store(store) = error else {
        return false;
    };
    let source = std::error::Error::source(store);
    match source.and_then(|source| source.downcast_ref::<sqlx::Error>()) {
        Some(sqlx::Error::Database(database)) => {
            matches!(database.code().as_deref(), Some("40001" | "40P01"))
        }
        _ => false,
    }
}

/// A savepoint name no other claim uses: handlers nested in one transaction must not share
/// one (MySQL replaces a savepoint of the same name instead of stacking it).
pub(crate) fn new_savepoint() -> String {
    format!("idem_{}", uuid::Uuid::new_v4().simple())
}

/// Runs `statement` (savepoint statements naming a savepoint from [`new_savepoint`], one or
/// more separated by `;`) on `connection` in one round trip, in the text protocol: not every
/// database prepares these.
async fn savepoint<DB>(
    connection: &mut DB::Connection,
    statement: String,
) -> Result<(), sqlx::Error>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    sqlx::raw_sql(AssertSqlSafe(statement))
        .execute(&mut *connection)
        .await?;
    Ok(())
}

/// Sets the savepoint `name`.
pub(crate) async fn set_savepoint<DB>(
    connection: &mut DB::Connection,
    name: &str,
) -> Result<(), Error>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    savepoint::<DB>(connection, format!("SAVEPOINT {name}"))
        .await
        .map_err(store_error::<DB>)
}

/// Ends the savepoint `name`, keeping what was written since.
pub(crate) async fn release_savepoint<DB>(
    connection: &mut DB::Connection,
    name: &str,
) -> Result<(), Error>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    savepoint::<DB>(connection, format!("RELEASE SAVEPOINT {name}"))
        .await
        .map_err(store_error::<DB>)
}

/// Undoes what was written since the savepoint `name` and ends it. Its error says that the
/// transaction must be rolled back: it still holds what the savepoint should have undone, or
/// the database has already rolled it back.
pub(crate) async fn abandon<DB>(connection: &mut DB::Connection, name: &str) -> Result<(), Error>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    // Both statements in one round trip: the second runs only if the first succeeded.
    let undone = savepoint::<DB>(
        connection,
        format!("ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}"),
    );
    undone.await.map_err(|error| {
        store_error::<DB>(format!(
            "could not roll back to the savepoint of the claim ({error}); the transaction may \
             hold the claim and the body's writes, or the database rolled it back already: \
             roll it back, do not commit it"
        ))
    })
}

/// `error`, after undoing what was written since the savepoint `name` (or the error of that
/// undo too, which says to roll the transaction back).
pub(crate) async fn undo<DB>(tx: &mut sqlx::Transaction<'_, DB>, name: &str, error: Error) -> Error
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    match abandon::<DB>(&mut **tx, name).await {
        Ok(()) => error,
        Err(undo) => store_error::<DB>(format!("{error}; then {undo}")),
    }
}

/// The first column of `row` as an integer, whichever integer column holds it (`BIGINT`,
/// `INTEGER`, `SMALLINT`); `None` for `NULL`.
pub(crate) fn read_integer<DB>(row: &DB::Row) -> Result<Option<i64>, sqlx::Error>
where
    DB: Database,
    for<'q> i64: sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> i32: sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> i16: sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    use sqlx::Row as _;
    row.try_get::<Option<i64>, _>(0)
        .or_else(|_| row.try_get::<Option<i32>, _>(0).map(|v| v.map(i64::from)))
        .or_else(|_| row.try_get::<Option<i16>, _>(0).map(|v| v.map(i64::from)))
}

/// What a claim in a transaction tells its caller; anything but an acquired key undoes the
/// savepoint `name` first.
pub(crate) async fn settle_in<DB>(
    connection: &mut DB::Connection,
    key: &RecordKey,
    name: String,
    claim: Result<Option<Claim>, Error>,
) -> Result<TxClaim, Error>
where
    DB: Backend,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    let settled = match claim {
        Ok(Some(Claim::Acquired(lease))) => return Ok(TxClaim::Run(TxLease::new(lease, name))),
        Ok(Some(Claim::Completed(stored))) => Ok(TxClaim::Completed(stored)),
        Ok(Some(Claim::InProgress { retry_after })) => Err(Error::InProgress {
            scope: key.scope().to_owned(),
            key: key.key().to_owned(),
            retry_after,
        }),
        Ok(Some(Claim::Mismatch)) => Err(Error::FingerprintMismatch {
            scope: key.scope().to_owned(),
            key: key.key().to_owned(),
        }),
        Ok(None) => Err(store_error::<DB>(format!(
            "the record for {key} kept changing during {CLAIM_ATTEMPTS} claim attempts"
        ))),
        Err(error) => Err(error),
    };
    match (settled, abandon::<DB>(connection, &name).await) {
        (settled, Ok(())) => settled,
        // The transaction is lost (MySQL rolls it back on a deadlock): that is what the caller
        // must act on, whatever the claim said.
        (Err(claim), Err(undo)) => Err(store_error::<DB>(format!("{claim}; then {undo}"))),
        (Ok(_), Err(undo)) => Err(undo),
    }
}

/// Runs `insert` through `executor` and reads a unique-key conflict, or a row not written
/// because of one, as [`Inserted::Duplicate`] (see `crate::unique`).
pub(crate) async fn insert_once<'q, 'c, DB, E>(
    executor: E,
    insert: sqlx::query::Query<'q, DB, <DB as Database>::Arguments>,
) -> Result<Inserted, Error>
where
    DB: Backend,
    E: Executor<'c, Database = DB>,
    <DB as Database>::Arguments: IntoArguments<DB>,
{
    match insert.execute(executor).await {
        Ok(done) if DB::rows_affected(&done) == 0 => Ok(Inserted::Duplicate),
        Ok(_) => Ok(Inserted::New),
        Err(sqlx::Error::Database(error)) if error.is_unique_violation() => Ok(Inserted::Duplicate),
        Err(error) => Err(store_error::<DB>(error)),
    }
}

/// [`Error::Store`] from the driver of `DB`.
pub(crate) fn store_error<DB: Backend>(source: impl Into<crate::BoxError>) -> Error {
    Error::Store(StoreError::new(DB::BACKEND, source))
}

/// How many times a claim is retried when the record it found vanished or expired between
/// the claim statement and the read that follows it.
pub(crate) const CLAIM_ATTEMPTS: usize = 8;

/// A record as a SQL store reads it when its claim statement changed nothing.
pub(crate) struct Found {
    /// Completed (`true`) or in progress.
    pub(crate) completed: bool,
    /// When the lease of an in-progress record runs out.
    pub(crate) lease_until: i64,
    /// When the record expires.
    pub(crate) expires_at: i64,
    /// The stored fingerprint, if any.
    pub(crate) fingerprint: Option<Vec<u8>>,
    /// The stored result, if any.
    pub(crate) result: Option<Vec<u8>>,
}

impl Found {
    /// What the claim of `key` with `fingerprint` at `now` reports for this record, or `None`
    /// when the record is free by now (it expired since the claim statement): claim again.
    pub(crate) fn answer(
        self,
        key: &RecordKey,
        now: i64,
        fingerprint: Option<&Fingerprint>,
    ) -> Result<Option<Claim>, Error> {
        let live_until = if self.completed {
            self.expires_at
        } else {
            self.lease_until
        };
        if live_until <= now {
            return Ok(None);
        }
        if let (Some(stored), Some(given)) = (self.fingerprint, fingerprint) {
            let stored = <[u8; 32]>::try_from(stored.as_slice()).map_err(|_| {
                decode_error(key, format!("`fingerprint` has {} bytes", stored.len()))
            })?;
            if Fingerprint::from_bytes(stored) != *given {
                return Ok(Some(Claim::Mismatch));
            }
        }
        if self.completed {
            let result = self
                .result
                .ok_or_else(|| decode_error(key, "a completed record has no result"))?;
            Ok(Some(Claim::Completed(result)))
        } else {
            Ok(Some(Claim::InProgress {
                retry_after: clock::remaining(now, self.lease_until),
            }))
        }
    }
}

/// [`Error::Decode`] for `key`: a stored value that does not decode, and why.
pub(crate) fn decode_error(key: &RecordKey, reason: impl Into<crate::BoxError>) -> Error {
    Error::Decode {
        scope: key.scope().to_owned(),
        key: key.key().to_owned(),
        source: reason.into(),
    }
}

/// A stored fence, which must be positive.
pub(crate) fn stored_fence(key: &RecordKey, fence: i64) -> Result<u64, Error> {
    match u64::try_from(fence) {
        Ok(fence) if fence > 0 => Ok(fence),
        _ => Err(decode_error(key, format!("`fence` is {fence}"))),
    }
}

/// The fence of `lease` as a SQL integer; a fence no record can hold means the lease is lost.
fn fence_param(key: &RecordKey, lease: &Lease) -> Result<i64, Error> {
    i64::try_from(lease.fence()).map_err(|_| lease_lost(key, lease))
}

/// What every SQL store writes alike: `new`, `with_table`, `table`, `with_clock` and `pool`,
/// and its [`Store`](crate::Store) impl, which runs the store's own `try_claim` and the shared
/// [`Table`] operations.
///
/// The store is a struct with the fields `table: Table<$db>` and `statements:
/// Arc<Statements>`, and any further fields given as `name: initial value` after the pool
/// type; its module defines `DEFAULT_TABLE`, `PURGE`, `Statements::new(table)`, and
/// `try_claim` (a claim in a transaction) and `claim_alone` (a claim that is a transaction of
/// its own), both `(&self, connection, key, fingerprint, lease) -> Result<Option<Claim>,
/// Error>`.
macro_rules! sql_store {
    ($store:ident, $db:ty, $pool:ty $(, $field:ident: $init:expr)*) => {
        impl $store {
            /// A store on a pool the application already has. Run
            /// [`migrate`](Self::migrate) once before use (or apply [`SCHEMA`] with your own
            /// migrations).
            pub fn new(pool: $pool) -> Self {
                Self {
                    table: $crate::sql::Table::new(pool, DEFAULT_TABLE, PURGE),
                    statements: ::std::sync::Arc::new(Statements::new(DEFAULT_TABLE)),
                    $($field: $init,)*
                }
            }

            /// The same store on the table `table` instead of `idem_records`.
            ///
            /// # Errors
            ///
            /// [`Error::InvalidName`] unless `table` is a plain identifier (an ASCII letter or
            /// `_`, then letters, digits or `_`, at most 63 bytes); it is never quoted or
            /// pasted unchecked.
            pub fn with_table(mut self, table: &str) -> Result<Self, Error> {
                self.table = self.table.renamed(table)?;
                self.statements = ::std::sync::Arc::new(Statements::new(table));
                Ok(self)
            }

            /// The table the records live in.
            pub fn table(&self) -> &str {
                self.table.name()
            }

            /// The same store on another clock (a
            /// [`ManualClock`](crate::clock::ManualClock) in tests).
            pub fn with_clock(mut self, clock: impl $crate::clock::Clock) -> Self {
                self.table.clock = ::std::sync::Arc::new(clock);
                self
            }

            /// The pool the store runs on.
            pub fn pool(&self) -> &$pool {
                &self.table.pool
            }
        }

        impl $crate::tx::TxStore for $store {
            type Database = $db;

            async fn begin(&self) -> Result<::sqlx::Transaction<'static, $db>, Error> {
                self.table
                    .pool
                    .begin()
                    .await
                    .map_err($crate::sql::store_error::<$db>)
            }

            async fn claim_in(
                &self,
                tx: &mut ::sqlx::Transaction<'_, $db>,
                key: &RecordKey,
                fingerprint: Option<&Fingerprint>,
                lease: ::std::time::Duration,
            ) -> Result<$crate::tx::TxClaim, Error> {
                let savepoint = $crate::sql::new_savepoint();
                $crate::sql::set_savepoint::<$db>(&mut **tx, &savepoint).await?;
                let mut claim = Ok(None);
                for _ in 0..$crate::sql::CLAIM_ATTEMPTS {
                    claim = self.try_claim(&mut **tx, key, fingerprint, lease).await;
                    if !matches!(claim, Ok(None)) {
                        break;
                    }
                }
                $crate::sql::settle_in::<$db>(&mut **tx, key, savepoint, claim).await
            }

            async fn claim_in_within(
                &self,
                tx: &mut ::sqlx::Transaction<'_, $db>,
                key: &RecordKey,
                fingerprint: Option<&Fingerprint>,
                lease: ::std::time::Duration,
                wait: ::std::time::Duration,
            ) -> Result<$crate::tx::TxClaim, Error> {
                $crate::sql::claim_in_within::<$db, _>(tx, key, lease, wait, async |tx| {
                    $crate::tx::TxStore::claim_in(self, tx, key, fingerprint, lease).await
                })
                .await
            }

            async fn complete_in(
                &self,
                tx: &mut ::sqlx::Transaction<'_, $db>,
                key: &RecordKey,
                claim: &$crate::tx::TxLease,
                result: &[u8],
                ttl: ::std::time::Duration,
            ) -> Result<(), Error> {
                self.table
                    .complete(&mut **tx, key, claim.lease(), result, ttl)
                    .await?;
                $crate::sql::release_savepoint::<$db>(&mut **tx, claim.savepoint()).await
            }

            async fn abandon_in(
                &self,
                tx: &mut ::sqlx::Transaction<'_, $db>,
                claim: &$crate::tx::TxLease,
            ) -> Result<(), Error> {
                $crate::sql::abandon::<$db>(&mut **tx, claim.savepoint()).await
            }
        }

        impl $crate::Store for $store {
            async fn claim(
                &self,
                key: &RecordKey,
                fingerprint: Option<&Fingerprint>,
                lease: ::std::time::Duration,
            ) -> Result<Claim, Error> {
                $crate::sql::claim::<$db, _, _>(key, || async {
                    let mut connection = self
                        .table
                        .pool
                        .acquire()
                        .await
                        .map_err($crate::sql::store_error::<$db>)?;
                    self.claim_alone(&mut connection, key, fingerprint, lease)
                        .await
                })
                .await
            }

            async fn complete(
                &self,
                key: &RecordKey,
                lease: &Lease,
                result: &[u8],
                ttl: ::std::time::Duration,
            ) -> Result<(), Error> {
                self.table
                    .complete(&self.table.pool, key, lease, result, ttl)
                    .await
            }

            async fn release(&self, key: &RecordKey, lease: &Lease) -> Result<(), Error> {
                self.table.release(key, lease).await
            }

            async fn extend(
                &self,
                key: &RecordKey,
                lease: &Lease,
                duration: ::std::time::Duration,
            ) -> Result<Lease, Error> {
                self.table.extend(key, lease, duration).await
            }

            async fn purge_expired(&self, limit: u32) -> Result<u64, Error> {
                self.table.purge_expired(limit).await
            }
        }
    };
}

pub(crate) use sql_store;

#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod unique;
pub(crate) mod upsert;

/// The `insert_once` of a SQL store's module, for its database `$db`.
macro_rules! insert_once_fn {
    ($db:ty) => {
        /// Runs `insert` and reads a unique-key conflict as a duplicate (see
        /// [`unique`](crate::unique)): [`Inserted::New`](crate::unique::Inserted::New) when
        /// the row went in, [`Inserted::Duplicate`](crate::unique::Inserted::Duplicate) when
        /// a unique key refused it or the statement's own conflict clause skipped it.
        ///
        /// # Errors
        ///
        /// [`Error::Store`] for every other failure, such as another constraint.
        pub async fn insert_once<'q, 'c, E>(
            executor: E,
            insert: ::sqlx::query::Query<'q, $db, <$db as ::sqlx::Database>::Arguments>,
        ) -> Result<$crate::unique::Inserted, Error>
        where
            E: ::sqlx::Executor<'c, Database = $db>,
        {
            $crate::sql::insert_once::<$db, E>(executor, insert).await
        }
    };
}

pub(crate) use insert_once_fn;

#[cfg(test)]
mod tests {
    use super::schema_for;

    #[test]
    fn long_table_names_get_an_index_name_of_their_own() {
        let schema = "CREATE TABLE idem_records (x INT);\nCREATE INDEX idem_records_expires_at ON idem_records (x);";
        assert_eq!(
            schema_for(schema, "points"),
            "CREATE TABLE points (x INT);\nCREATE INDEX points_expires_at ON points (x);"
        );
        for length in [52, 53, 62, 63] {
            let table = "t".repeat(length);
            let created = schema_for(schema, &table);
            let index = created
                .split_whitespace()
                .find(|word| word.ends_with("_expires_at"))
                .expect("an index name");
            assert!(index.len() <= 63, "{index}");
            assert_ne!(index, table);
            assert!(created.contains(&format!("CREATE TABLE {table} ")));
        }
        assert_ne!(
            schema_for(schema, &"a".repeat(63)),
            schema_for(schema, &format!("{}b", "a".repeat(62))),
            "two long names keep two index names"
        );
    }
}
