//! What the SQL stores share: the dialects (`dialect.rs`), the record table and its shared
//! statements (`table.rs`), savepoints and the claim in a transaction (`savepoint.rs`), the
//! claim loop, insert-once, store errors, and the macro that writes each store's impls; then
//! the stores themselves, one file per database, with their schemas (`*.sql`).
//!
//! Each store keeps its own claim, the one statement where the dialects differ.

use std::future::Future;

use sqlx::{Database, Executor, IntoArguments};

use crate::store::Claim;
use crate::unique::Inserted;
use crate::{Error, RecordKey, StoreError};

mod dialect;
mod savepoint;
mod table;
mod tx_store;

pub use dialect::{Backend, Dialect};
pub(crate) use savepoint::{
    abandon, claim_in_within, new_savepoint, release_savepoint, set_savepoint, settle_in, undo,
};
pub(crate) use table::{Found, Table, decode_error, read_integer, schema_for, sql, stored_fence};
pub use tx_store::{TxClaim, TxLease, TxStore};

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

        impl $crate::sql::TxStore for $store {
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
            ) -> Result<$crate::sql::TxClaim, Error> {
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
            ) -> Result<$crate::sql::TxClaim, Error> {
                $crate::sql::claim_in_within::<$db, _>(tx, key, lease, wait, async |tx| {
                    $crate::sql::TxStore::claim_in(self, tx, key, fingerprint, lease).await
                })
                .await
            }

            async fn complete_in(
                &self,
                tx: &mut ::sqlx::Transaction<'_, $db>,
                key: &RecordKey,
                claim: &$crate::sql::TxLease,
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
                claim: &$crate::sql::TxLease,
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
