//! A store in a MySQL or MariaDB table, over sqlx.
//!
//! One InnoDB table, `idem_records` (see `src/sql/mysql.sql` in the crate, or run
//! [`MySqlStore::migrate`]). Scope and key are `VARBINARY`, compared byte for byte: the usual
//! collations would fold case, accents and trailing spaces and make different keys one. Times
//! are milliseconds since the Unix epoch by the store's [`Clock`](crate::clock::Clock), bound as parameters: the
//! database's own clock is never read.
//!
//! # Statements and round trips
//!
//! * **claim** — one `INSERT … ON DUPLICATE KEY UPDATE` whose assignments are all guarded by
//!   `owner = <the claim's fresh token> OR <lease or ttl passed>`: right whether the server
//!   assigns left to right (each assignment seeing the ones before it) or all at once from
//!   the old row (MariaDB's `SIMULTANEOUS_ASSIGNMENT` mode). A fence below 0, which only a
//!   hand-edited row holds, is raised to a value out of the column's range, so the takeover
//!   fails as [`Error::Decode`]. How the claim learns what its statement did depends on the
//!   server:
//!   * **MariaDB 10.5 and later** — the statement ends in `RETURNING` the record as it stands
//!     after it (the latest committed one, even in a `REPEATABLE READ` transaction whose
//!     snapshot is older, because the statement locks the row): the claim took the key when
//!     the returned owner is its own token, and otherwise the row is what holds the key. One
//!     round trip in every case.
//!   * **MySQL** (which has no `INSERT … RETURNING`) — the statement reports its outcome
//!     through `LAST_INSERT_ID(expr)`, which the server returns with the result: 1 for a new
//!     record, the raised fence for a takeover, 0 when it changed nothing. Only then does a
//!     locking read follow, to report what holds the key: a new key or a takeover costs one
//!     round trip, a duplicate two.
//!
//!   The store asks the server which it is once (`SELECT VERSION()`, on the first claim of
//!   the store and its clones); [`MySqlStore::with_returning`] tells it instead, for a proxy
//!   that answers `VERSION()` itself. A claim that meets a deadlock (InnoDB error 1213) is run
//!   again. (So the claim sets the session's `LAST_INSERT_ID()`; that matters only for a claim
//!   in your own transaction, see [`tx`](crate::tx).)
//! * **complete**, **release**, **extend** — one `UPDATE` each, conditional on the owner token,
//!   the fence and the record still being in progress: zero rows is [`Error::LeaseLost`].
//! * **purge_expired** — one `DELETE … WHERE expires_at <= now ORDER BY expires_at LIMIT n`.
//!
//! A new key therefore costs two round trips (claim, complete), and a replay one on MariaDB,
//! two (claim, read) on MySQL.
//!
//! # What survives a restart
//!
//! Everything committed, with InnoDB's defaults: each operation is its own transaction and
//! `innodb_flush_log_at_trx_commit = 1` writes it to the redo log before answering. With `0` or
//! `2` a crash of the server (or of its machine) can lose the last second of completions it
//! acknowledged, and a redelivery then runs the body again; asynchronous replication can lose
//! them on failover. Keep `innodb_flush_log_at_trx_commit = 1` (and `sync_binlog = 1` with
//! replication, semi-synchronous if failover must not lose them).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::Row;
use sqlx::mysql::{MySql, MySqlPool, MySqlRow};

use crate::clock;
use crate::sql::{self, Found, Table, decode_error, sql, store_error, stored_fence};
use crate::store::{Claim, Lease, new_owner};
use crate::{Error, Fingerprint, RecordKey};

/// The schema for the default table: `CREATE TABLE IF NOT EXISTS idem_records …` with its
/// expiry index (the file `src/sql/mysql.sql` of this crate).
pub const SCHEMA: &str = include_str!("mysql.sql");

/// The default table name.
pub const DEFAULT_TABLE: &str = "idem_records";

/// Whether the claim takes the record over, in every assignment of its `ON DUPLICATE KEY
/// UPDATE`: the record is dead (its lease or ttl passed, by the bound `now`), or the takeover
/// has begun (the owner is already the claim's fresh token). This reads the same whether the
/// server assigns left to right, each assignment seeing the ones before (MySQL, MariaDB by
/// default), or all at once from the old row (MariaDB's `SIMULTANEOUS_ASSIGNMENT` mode).
const TAKEOVER: &str = "(owner = VALUES(owner) OR IF(completed = 1, expires_at, lease_until) <= ?)";

/// How many times [`TAKEOVER`] binds `now` in the claim.
const TAKEOVER_TESTS: usize = 7;

/// The statements of one table, built once from its checked name.
#[derive(Debug)]
struct Statements {
    schema: Arc<str>,
    claim: Arc<str>,
    /// The claim that returns the record it leaves (MariaDB).
    claim_returning: Arc<str>,
    read: Arc<str>,
}

impl Statements {
    /// `table` must have passed `name::sql_identifier`.
    fn new(table: &str) -> Self {
        let claim = format!(
                "INSERT INTO {table}
    (scope, business_key, completed, owner, fence, lease_until, expires_at, fingerprint, result)
VALUES (?, ?, 0, ?, LAST_INSERT_ID(1), ?, ?, ?, NULL)
ON DUPLICATE KEY UPDATE
    fence = IF({TAKEOVER}, LAST_INSERT_ID(IF(fence >= 0, fence + 1, 18446744073709551615)), IF(LAST_INSERT_ID(0), fence, fence)),
    owner = IF({TAKEOVER}, VALUES(owner), owner),
    completed = IF({TAKEOVER}, 0, completed),
    lease_until = IF({TAKEOVER}, VALUES(lease_until), lease_until),
    expires_at = IF({TAKEOVER}, VALUES(expires_at), expires_at),
    fingerprint = IF({TAKEOVER}, VALUES(fingerprint), fingerprint),
    result = IF({TAKEOVER}, NULL, result)"
        )
        .replace("{TAKEOVER}", TAKEOVER);
        Self {
            schema: sql::schema_for(SCHEMA, table).into(),
            claim_returning: format!(
                "{claim}\nRETURNING owner, fence, completed, lease_until, expires_at, fingerprint, result"
            )
            .into(),
            claim: claim.into(),
            // A locking read sees the latest committed record even in a `REPEATABLE READ`
            // transaction whose snapshot is older (`strategy = "tx"`).
            read: format!(
                "SELECT completed, lease_until, expires_at, fingerprint, result
FROM {table} WHERE scope = ? AND business_key = ? LOCK IN SHARE MODE"
            )
            .into(),
        }
    }
}

/// The bounded delete of expired records.
const PURGE: &str = "DELETE FROM {table} WHERE expires_at <= ? ORDER BY expires_at LIMIT ?";

/// A store in a MySQL or MariaDB table.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_runtime::mysql::MySqlStore;
///
/// let pool = sqlx::MySqlPool::connect("mysql://root@127.0.0.1/app").await?;
/// let store = MySqlStore::new(pool);
/// store.migrate().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct MySqlStore {
    table: Table<MySql>,
    statements: Arc<Statements>,
    /// Whether the server takes `INSERT … RETURNING`: asked on the first claim, shared by the
    /// store's clones.
    returning: Arc<OnceLock<bool>>,
}

impl MySqlStore {
    /// Creates the table with its index if it does not exist. Safe to run many times and from
    /// many processes at once.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if the statement fails.
    pub async fn migrate(&self) -> Result<(), Error> {
        sqlx::raw_sql(sql(&self.statements.schema))
            .execute(&self.table.pool)
            .await
            .map_err(store_error::<MySql>)?;
        Ok(())
    }

    /// The same store, told whether the server takes `INSERT … ON DUPLICATE KEY UPDATE …
    /// RETURNING` (MariaDB 10.5 and later do, MySQL does not) instead of asking it with
    /// `SELECT VERSION()` on the first claim. Needed only behind a proxy that answers
    /// `VERSION()` itself with another server's version; `true` on a server without it makes
    /// every claim fail with the server's syntax error. With `false` a duplicate costs a
    /// second round trip (see the [module](self)).
    #[must_use]
    pub fn with_returning(mut self, returning: bool) -> Self {
        self.returning = Arc::new(OnceLock::from(returning));
        self
    }

    /// Whether the server takes `INSERT … RETURNING`, asked on `connection` the first time.
    async fn returning(&self, connection: &mut sqlx::MySqlConnection) -> Result<bool, Error> {
        if let Some(returning) = self.returning.get() {
            return Ok(*returning);
        }
        // As bytes: with a binary connection character set the server sends `VARBINARY`.
        let version: Vec<u8> = sqlx::query_scalar("SELECT CAST(VERSION() AS BINARY)")
            .fetch_one(&mut *connection)
            .await
            .map_err(store_error::<MySql>)?;
        let version = String::from_utf8_lossy(&version);
        Ok(*self.returning.get_or_init(|| takes_returning(&version)))
    }

    async fn try_claim(
        &self,
        connection: &mut sqlx::MySqlConnection,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Option<Claim>, Error> {
        let returning = self.returning(&mut *connection).await?;
        let now = self.table.clock.now_millis();
        let until = clock::deadline(now, lease);
        let owner = new_owner();
        let statement = if returning {
            &self.statements.claim_returning
        } else {
            &self.statements.claim
        };
        let claimed = sqlx::query(sql(statement))
            .bind(key.scope())
            .bind(key.key())
            .bind(&owner)
            .bind(until)
            .bind(until)
            .bind(fingerprint.map(|f| f.as_bytes().as_slice()));
        let claimed = (0..TAKEOVER_TESTS).fold(claimed, |query, _| query.bind(now));

        if returning {
            let row = claimed
                .fetch_one(&mut *connection)
                .await
                .map_err(|error| sql::claim_error::<MySql>(key, error))?;
            let corrupt = |source: sqlx::Error| decode_error(key, source);
            let holder: Vec<u8> = row.try_get("owner").map_err(corrupt)?;
            if holder == owner.as_bytes() {
                let fence = stored_fence(key, row.try_get("fence").map_err(corrupt)?)?;
                return Ok(Some(Claim::Acquired(Lease::new(owner, fence, until))));
            }
            return found(key, &row)?.answer(key, now, fingerprint);
        }

        let claimed = claimed
            .execute(&mut *connection)
            .await
            .map_err(|error| sql::claim_error::<MySql>(key, error))?;
        // `LAST_INSERT_ID(expr)` in the statement: 1 inserted, the new fence taken over, 0
        // changed nothing.
        match i64::try_from(claimed.last_insert_id()) {
            Ok(0) => {}
            Ok(fence) => {
                let fence = stored_fence(key, fence)?;
                return Ok(Some(Claim::Acquired(Lease::new(owner, fence, until))));
            }
            Err(_) => {
                return Err(decode_error(
                    key,
                    format!("`fence` is {}", claimed.last_insert_id()),
                ));
            }
        }

        let Some(row) = sqlx::query(sql(&self.statements.read))
            .bind(key.scope())
            .bind(key.key())
            .fetch_optional(&mut *connection)
            .await
            .map_err(store_error::<MySql>)?
        else {
            return Ok(None); // purged since: claim again
        };
        found(key, &row)?.answer(key, now, fingerprint)
    }

    /// A claim that is a transaction of its own: the same statement as in a transaction.
    async fn claim_alone(
        &self,
        connection: &mut sqlx::MySqlConnection,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Option<Claim>, Error> {
        self.try_claim(connection, key, fingerprint, lease).await
    }
}

/// Whether a server whose `VERSION()` is `version` takes `INSERT … RETURNING`: MariaDB from
/// 10.5 (`10.11.19-MariaDB-0+deb12u1`, `11.4.2-MariaDB`, or behind the `5.5.5-` some
/// versions put first for old clients); MySQL (`8.0.36`) never.
fn takes_returning(version: &str) -> bool {
    if !version.contains("MariaDB") {
        return false;
    }
    let version = version.strip_prefix("5.5.5-").unwrap_or(version);
    let mut numbers = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (10, 5),
        _ => false,
    }
}

/// The record a claim did not take.
fn found(key: &RecordKey, row: &MySqlRow) -> Result<Found, Error> {
    let corrupt = |source: sqlx::Error| decode_error(key, source);
    let completed = match row.try_get::<i8, _>("completed").map_err(corrupt)? {
        0 => false,
        1 => true,
        other => return Err(decode_error(key, format!("`completed` is {other}"))),
    };
    Ok(Found {
        completed,
        lease_until: row.try_get("lease_until").map_err(corrupt)?,
        expires_at: row.try_get("expires_at").map_err(corrupt)?,
        fingerprint: row.try_get("fingerprint").map_err(corrupt)?,
        result: row.try_get("result").map_err(corrupt)?,
    })
}

sql::sql_store!(MySqlStore, MySql, MySqlPool, returning: Arc::default());

sql::insert_once_fn!(MySql);

#[cfg(test)]
mod tests {
    use super::takes_returning;

    #[test]
    fn only_mariadb_from_10_5_returns_rows() {
        assert!(takes_returning("10.11.19-MariaDB-0+deb12u1"));
        assert!(takes_returning("10.5.0-MariaDB"));
        assert!(takes_returning("11.4.2-MariaDB-log"));
        // The prefix MariaDB 10 puts before its version in the handshake for old clients.
        assert!(takes_returning("5.5.5-10.6.12-MariaDB"));
        assert!(!takes_returning("10.4.32-MariaDB"));
        assert!(!takes_returning("8.0.36"));
        assert!(!takes_returning("8.4.0-commercial"));
        assert!(!takes_returning("MariaDB"));
        assert!(!takes_returning(""));
    }
}
