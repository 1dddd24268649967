//! The record table of a SQL store: its pool, clock and name, the statements every dialect
//! writes alike (complete, release, extend, purge), the schema for a table name, and reading
//! back a record that a claim did not take.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{AssertSqlSafe, Database, Encode, Executor, IntoArguments, Pool, Type};

use super::{Backend, store_error};
use crate::clock::{self, Clock, SystemClock};
use crate::name;
use crate::store::{Claim, Lease, lease_lost};
use crate::{Error, Fingerprint, RecordKey};

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
