//! A store in a PostgreSQL table, over sqlx.
//!
//! One table, `idem_records` (see `src/sql/postgres.sql` in the crate, or run
//! [`PostgresStore::migrate`]). Times are milliseconds since the Unix epoch by the store's
//! [`Clock`](crate::clock::Clock), bound as parameters: the database's own clock is never read.
//!
//! # Statements and round trips
//!
//! * **claim** — one statement. It first reads the record if it is live (completed and not
//!   expired, or in progress within its lease); when there is one, it returns it and writes
//!   nothing, so a duplicate neither locks the row nor gets a transaction id: a replay is a
//!   read-only transaction, with no WAL flush at its commit. Otherwise, in the same statement,
//!   `INSERT … ON CONFLICT (scope, business_key) DO UPDATE … WHERE <lease or ttl passed>
//!   RETURNING fence` inserts the record or takes over the dead one (raising the fence). One
//!   round trip in every case but one: under `READ COMMITTED` the statement sees the snapshot
//!   taken when it began, so a record inserted or taken over by a concurrent claim that
//!   committed after that (the `INSERT` waited for it) is invisible to its read and not taken
//!   by its `INSERT`. Then the statement returns nothing and a plain read follows (a second
//!   round trip), and if the record is gone by then the claim runs again. (A live record the
//!   read returned may have been completed or released by a concurrent call since the
//!   snapshot: the claim reports it as it was then, which is an answer the call could have
//!   got a moment earlier — in progress, so the caller retries.)
//! * **complete**, **release**, **extend** — one `UPDATE` each, conditional on the owner token,
//!   the fence and the record still being in progress: zero rows is [`Error::LeaseLost`].
//! * **purge_expired** — one `DELETE … WHERE ctid IN (SELECT ctid … WHERE expires_at <= now
//!   LIMIT n FOR UPDATE SKIP LOCKED)`: bounded, and it never waits for a row another call is
//!   changing.
//!
//! A new key therefore costs two round trips (claim, complete), each its own commit, and a
//! replay one round trip that writes nothing.
//!
//! # What survives a restart
//!
//! Everything committed: each operation is its own transaction and PostgreSQL writes it to
//! its WAL before answering. With `synchronous_commit = off` a crash of the server can lose the
//! last completions it acknowledged (a redelivery then runs the body again); with asynchronous
//! streaming replication a failover can lose them too. Keep `synchronous_commit` on (the
//! default), and use synchronous replication if failover must not lose them.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow, Postgres};

use crate::clock;
use crate::sql::{self, Found, Table, decode_error, sql, store_error, stored_fence};
use crate::store::{Claim, Lease, new_owner};
use crate::{Error, Fingerprint, RecordKey};

/// The schema for the default table: `CREATE TABLE IF NOT EXISTS idem_records …` and its
/// expiry index (the file `src/sql/postgres.sql` of this crate).
pub const SCHEMA: &str = include_str!("postgres.sql");

/// The default table name.
pub const DEFAULT_TABLE: &str = "idem_records";

/// The advisory lock [`PostgresStore::migrate`] holds while it creates tables, so that many
/// processes can migrate at once (`CREATE TABLE IF NOT EXISTS` alone races in PostgreSQL).
pub const MIGRATION_LOCK: i64 = 0x6964_656d_6d69_6772; // "idemmigr"

/// The statements of one table, built once from its checked name.
#[derive(Debug)]
struct Statements {
    migrate: Arc<str>,
    claim: Arc<str>,
    read: Arc<str>,
}

impl Statements {
    /// `table` must have passed `name::sql_identifier`.
    fn new(table: &str) -> Self {
        let schema = sql::schema_for(SCHEMA, table);
        Self {
            migrate: format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK});\n{schema}").into(),
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
        }
    }
}

/// The bounded delete of expired records: it skips rows another call has locked.
const PURGE: &str = "DELETE FROM {table} WHERE ctid IN (
    SELECT ctid FROM {table} WHERE expires_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)";

/// A store in a PostgreSQL table.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_runtime::postgres::PostgresStore;
///
/// let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/app").await?;
/// let store = PostgresStore::new(pool);
/// store.migrate().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PostgresStore {
    table: Table<Postgres>,
    statements: Arc<Statements>,
}

impl PostgresStore {
    /// Creates the table and its index if they do not exist. Safe to run many times and from
    /// many processes at once: it holds the advisory lock [`MIGRATION_LOCK`] while it runs.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if the statements fail.
    pub async fn migrate(&self) -> Result<(), Error> {
        // One simple query: its statements run in one transaction, which holds the lock.
        sqlx::raw_sql(sql(&self.statements.migrate))
            .execute(&self.table.pool)
            .await
            .map_err(store_error::<Postgres>)?;
        Ok(())
    }

    async fn try_claim(
        &self,
        connection: &mut sqlx::PgConnection,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Option<Claim>, Error> {
        let now = self.table.clock.now_millis();
        let until = clock::deadline(now, lease);
        let owner = new_owner();
        let row = sqlx::query(sql(&self.statements.claim))
            .bind(key.scope())
            .bind(key.key())
            .bind(&owner)
            .bind(until)
            .bind(fingerprint.map(|f| f.as_bytes().as_slice()))
            .bind(now)
            .fetch_optional(&mut *connection)
            .await
            .map_err(|error| sql::claim_error::<Postgres>(key, error))?;
        let row = match row {
            Some(row) => row,
            // The record was inserted by a claim that committed after this statement's
            // snapshot: read it with a fresh one.
            None => match sqlx::query(sql(&self.statements.read))
                .bind(key.scope())
                .bind(key.key())
                .fetch_optional(&mut *connection)
                .await
                .map_err(store_error::<Postgres>)?
            {
                Some(row) => row,
                None => return Ok(None), // purged since: claim again
            },
        };
        let corrupt = |source: sqlx::Error| decode_error(key, source);
        let acquired: bool = row.try_get("acquired").map_err(corrupt)?;
        let fence = stored_fence(key, row.try_get("fence").map_err(corrupt)?)?;
        if acquired {
            return Ok(Some(Claim::Acquired(Lease::new(owner, fence, until))));
        }
        found(key, &row)?.answer(key, now, fingerprint)
    }

    /// A claim that is a transaction of its own: the same statement as in a transaction.
    async fn claim_alone(
        &self,
        connection: &mut sqlx::PgConnection,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Option<Claim>, Error> {
        self.try_claim(connection, key, fingerprint, lease).await
    }
}

/// The record a claim did not take.
fn found(key: &RecordKey, row: &PgRow) -> Result<Found, Error> {
    let corrupt = |source: sqlx::Error| decode_error(key, source);
    Ok(Found {
        completed: row.try_get("completed").map_err(corrupt)?,
        lease_until: row.try_get("lease_until").map_err(corrupt)?,
        expires_at: row.try_get("expires_at").map_err(corrupt)?,
        fingerprint: row.try_get("fingerprint").map_err(corrupt)?,
        result: row.try_get("result").map_err(corrupt)?,
    })
}

sql::sql_store!(PostgresStore, Postgres, PgPool);

sql::insert_once_fn!(Postgres);
