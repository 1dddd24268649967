//! What idem says about each SQL database: its name, literals, placeholders, and the
//! statements it writes differently.

use std::time::Duration;

use sqlx::Database;

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
    /// The store's name in [`StoreError`](crate::StoreError)s.
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
