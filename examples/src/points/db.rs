//! The databases the points service runs on, and the SQL it runs there.
//!
//! Everything that differs between SQLite, PostgreSQL and MySQL / MariaDB is here: the schema,
//! placeholders, the balance upsert, how a ledger row that exists already is reported, and how
//! to open the idem store. [`Points`](super::Points) is written once over [`PointsDb`].

use std::future::Future;
use std::time::Duration;

use idem_runtime::mysql::MySqlStore;
use idem_runtime::postgres::PostgresStore;
use idem_runtime::sqlite::SqliteStore;
use idem_runtime::tx::TxStore;
use idem_runtime::unique::Inserted;
use idem_runtime::{SqlDatabase, Store, StoreError};
use sqlx::{AssertSqlSafe, MySql, Pool, Postgres, Sqlite, Transaction};

use super::{LedgerRow, PointsError, Tables};

/// A database the points service runs on: its idem store, and the points tables' SQL.
///
/// Implemented for [`Sqlite`], [`Postgres`] and [`MySql`] (MariaDB too).
pub trait PointsDb: SqlDatabase + Sized {
    /// The idem store in this database, which keeps its records in the points service's
    /// transactions.
    type Store: TxStore<Database = Self> + Store + Clone + Send + Sync + 'static;

    /// Opens a pool on `url` and the idem store on it (its default table, `idem_records`).
    fn connect(url: &str) -> impl Future<Output = Result<Self::Store, PointsError>> + Send;

    /// The pool `store` runs on.
    fn pool(store: &Self::Store) -> &Pool<Self>;

    /// Creates `store`'s table if it is missing.
    fn migrate_store(store: &Self::Store) -> impl Future<Output = Result<(), PointsError>> + Send;

    /// The statements on `tables`, built once.
    fn statements(tables: &Tables) -> Statements;

    /// Creates the points tables if they are missing.
    fn create_tables(
        pool: &Pool<Self>,
        statements: &Statements,
    ) -> impl Future<Output = Result<(), PointsError>> + Send;

    /// Inserts `row` into the ledger, or reports [`Inserted::Duplicate`] (writing nothing and
    /// leaving the transaction usable) when the order has a row already.
    fn insert_ledger(
        tx: &mut Transaction<'_, Self>,
        statements: &Statements,
        row: &LedgerRow,
    ) -> impl Future<Output = Result<Inserted, PointsError>> + Send;

    /// The ledger row of `order_no`, read in `tx`.
    fn ledger_row(
        tx: &mut Transaction<'_, Self>,
        statements: &Statements,
        order_no: &str,
    ) -> impl Future<Output = Result<Option<LedgerRow>, PointsError>> + Send;

    /// Adds `points` to `user_id`'s balance (creating it) and returns the new balance.
    fn add_to_balance(
        tx: &mut Transaction<'_, Self>,
        statements: &Statements,
        user_id: i64,
        points: i64,
    ) -> impl Future<Output = Result<i64, PointsError>> + Send;

    /// `user_id`'s balance, 0 without one.
    fn balance(
        pool: &Pool<Self>,
        statements: &Statements,
        user_id: i64,
    ) -> impl Future<Output = Result<i64, PointsError>> + Send;

    /// `user_id`'s ledger rows, by order number.
    fn ledger(
        pool: &Pool<Self>,
        statements: &Statements,
        user_id: i64,
    ) -> impl Future<Output = Result<Vec<LedgerRow>, PointsError>> + Send;
}

/// The statements of the points tables in one database's dialect, with the tables' (checked)
/// names in them. Values are always bound, never pasted.
#[derive(Clone, Debug)]
pub struct Statements {
    /// Creates both tables if they are missing, in one script.
    pub schema: String,
    /// Inserts a ledger row: `order_no, user_id, points, entry_id`.
    pub insert_ledger: String,
    /// Reads the ledger row of `order_no`.
    pub ledger_row: String,
    /// Adds `points` to the balance of `user_id`, creating it: `user_id, points`.
    pub add_to_balance: String,
    /// Reads the balance of `user_id`.
    pub balance: String,
    /// Reads the ledger rows of `user_id`.
    pub ledger: String,
}

impl Statements {
    /// The statements every dialect writes alike, with the placeholder `p(n)` for the `n`th
    /// value.
    fn common(
        tables: &Tables,
        p: fn(usize) -> String,
        schema: String,
        insert: String,
        upsert: String,
    ) -> Self {
        let (ledger, balances) = (tables.ledger(), tables.balances());
        Self {
            schema,
            insert_ledger: insert,
            ledger_row: format!(
                "SELECT order_no, user_id, points, entry_id FROM {ledger} WHERE order_no = {}",
                p(1)
            ),
            add_to_balance: upsert,
            balance: format!("SELECT points FROM {balances} WHERE user_id = {}", p(1)),
            ledger: format!(
                "SELECT order_no, user_id, points, entry_id FROM {ledger} WHERE user_id = {} ORDER BY order_no",
                p(1)
            ),
        }
    }
}

fn numbered(n: usize) -> String {
    format!("${n}")
}

fn question_mark(_: usize) -> String {
    "?".to_owned()
}

fn numbered_question_mark(n: usize) -> String {
    format!("?{n}")
}

/// Serializes concurrent `create_tables` on PostgreSQL, whose `CREATE TABLE IF NOT EXISTS` can
/// fail when two sessions race. "idempnts".
const PG_MIGRATION_LOCK: i64 = 0x6964_656d_706e_7473;

/// The database operations, alike in each dialect but for the types: `$insert_once` is the
/// idem module's insert-once for that database.
macro_rules! points_db {
    ($db:ty, $store:ty, $insert_once:path, connect = |$url:ident| $connect:expr, statements = |$tables:ident| $statements:expr) => {
        impl PointsDb for $db {
            type Store = $store;

            async fn connect($url: &str) -> Result<Self::Store, PointsError> {
                $connect
            }

            fn pool(store: &Self::Store) -> &Pool<Self> {
                store.pool()
            }

            async fn migrate_store(store: &Self::Store) -> Result<(), PointsError> {
                Ok(store.migrate().await?)
            }

            fn statements($tables: &Tables) -> Statements {
                $statements
            }

            async fn create_tables(
                pool: &Pool<Self>,
                statements: &Statements,
            ) -> Result<(), PointsError> {
                sqlx::raw_sql(AssertSqlSafe(statements.schema.clone()))
                    .execute(pool)
                    .await?;
                Ok(())
            }

            async fn insert_ledger(
                tx: &mut Transaction<'_, Self>,
                statements: &Statements,
                row: &LedgerRow,
            ) -> Result<Inserted, PointsError> {
                let insert = sqlx::query(AssertSqlSafe(statements.insert_ledger.clone()))
                    .bind(&row.order_no)
                    .bind(row.user_id)
                    .bind(row.points)
                    .bind(&row.entry_id);
                Ok($insert_once(&mut **tx, insert).await?)
            }

            async fn ledger_row(
                tx: &mut Transaction<'_, Self>,
                statements: &Statements,
                order_no: &str,
            ) -> Result<Option<LedgerRow>, PointsError> {
                let row: Option<(String, i64, i64, String)> =
                    sqlx::query_as(AssertSqlSafe(statements.ledger_row.clone()))
                        .bind(order_no)
                        .fetch_optional(&mut **tx)
                        .await?;
                Ok(row.map(LedgerRow::from))
            }

            async fn add_to_balance(
                tx: &mut Transaction<'_, Self>,
                statements: &Statements,
                user_id: i64,
                points: i64,
            ) -> Result<i64, PointsError> {
                sqlx::query(AssertSqlSafe(statements.add_to_balance.clone()))
                    .bind(user_id)
                    .bind(points)
                    .execute(&mut **tx)
                    .await?;
                // The row is locked by this transaction now: this reads what it wrote.
                Ok(
                    sqlx::query_scalar(AssertSqlSafe(statements.balance.clone()))
                        .bind(user_id)
                        .fetch_one(&mut **tx)
                        .await?,
                )
            }

            async fn balance(
                pool: &Pool<Self>,
                statements: &Statements,
                user_id: i64,
            ) -> Result<i64, PointsError> {
                let balance: Option<i64> =
                    sqlx::query_scalar(AssertSqlSafe(statements.balance.clone()))
                        .bind(user_id)
                        .fetch_optional(pool)
                        .await?;
                Ok(balance.unwrap_or(0))
            }

            async fn ledger(
                pool: &Pool<Self>,
                statements: &Statements,
                user_id: i64,
            ) -> Result<Vec<LedgerRow>, PointsError> {
                let rows: Vec<(String, i64, i64, String)> =
                    sqlx::query_as(AssertSqlSafe(statements.ledger.clone()))
                        .bind(user_id)
                        .fetch_all(pool)
                        .await?;
                Ok(rows.into_iter().map(LedgerRow::from).collect())
            }
        }
    };
}

points_db!(
    Sqlite,
    SqliteStore,
    idem_runtime::sqlite::insert_once,
    connect = |url| Ok(SqliteStore::connect(url).await?),
    statements = |tables| {
        let (ledger, balances) = (tables.ledger(), tables.balances());
        Statements::common(
            tables,
            numbered_question_mark,
            format!(
                "CREATE TABLE IF NOT EXISTS {ledger} (
    order_no TEXT NOT NULL PRIMARY KEY,
    user_id INTEGER NOT NULL,
    points INTEGER NOT NULL,
    entry_id TEXT NOT NULL,
    credited_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS {balances} (
    user_id INTEGER NOT NULL PRIMARY KEY,
    points INTEGER NOT NULL
);"
            ),
            // ON CONFLICT DO NOTHING skips a duplicate order only (not a NOT NULL failure).
            format!(
                "INSERT INTO {ledger} (order_no, user_id, points, entry_id) VALUES (?1, ?2, ?3, ?4)
ON CONFLICT (order_no) DO NOTHING"
            ),
            format!(
                "INSERT INTO {balances} (user_id, points) VALUES (?1, ?2)
ON CONFLICT (user_id) DO UPDATE SET points = {balances}.points + excluded.points"
            ),
        )
    }
);

points_db!(
    Postgres,
    PostgresStore,
    idem_runtime::postgres::insert_once,
    connect = |url| {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|error| idem_runtime::Error::Store(StoreError::new("postgres", error)))?;
        Ok(PostgresStore::new(pool))
    },
    statements = |tables| {
        let (ledger, balances) = (tables.ledger(), tables.balances());
        Statements::common(
            tables,
            numbered,
            // One simple query runs as one transaction, which holds the lock.
            format!(
                "SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK});
CREATE TABLE IF NOT EXISTS {ledger} (
    order_no TEXT NOT NULL PRIMARY KEY,
    user_id BIGINT NOT NULL,
    points BIGINT NOT NULL,
    entry_id TEXT NOT NULL,
    credited_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {balances} (
    user_id BIGINT NOT NULL PRIMARY KEY,
    points BIGINT NOT NULL
);"
            ),
            // A failed statement would abort the transaction: skip the duplicate instead.
            format!(
                "INSERT INTO {ledger} (order_no, user_id, points, entry_id) VALUES ($1, $2, $3, $4)
ON CONFLICT (order_no) DO NOTHING"
            ),
            format!(
                "INSERT INTO {balances} (user_id, points) VALUES ($1, $2)
ON CONFLICT (user_id) DO UPDATE SET points = {balances}.points + EXCLUDED.points"
            ),
        )
    }
);

points_db!(
    MySql,
    MySqlStore,
    idem_runtime::mysql::insert_once,
    connect = |url| {
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|error| idem_runtime::Error::Store(StoreError::new("mysql", error)))?;
        Ok(MySqlStore::new(pool))
    },
    statements = |tables| {
        let (ledger, balances) = (tables.ledger(), tables.balances());
        Statements::common(
            tables,
            question_mark,
            // Order numbers compare byte for byte, as idem's keys do: the default collation
            // would take `A-1` and `a-1` for one order.
            format!(
                "CREATE TABLE IF NOT EXISTS {ledger} (
    order_no VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    user_id BIGINT NOT NULL,
    points BIGINT NOT NULL,
    entry_id VARCHAR(64) NOT NULL,
    credited_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
) ENGINE = InnoDB;
CREATE TABLE IF NOT EXISTS {balances} (
    user_id BIGINT NOT NULL PRIMARY KEY,
    points BIGINT NOT NULL
) ENGINE = InnoDB;"
            ),
            // A plain INSERT: its duplicate-key error leaves the transaction usable, and
            // INSERT IGNORE would hide other errors.
            format!(
                "INSERT INTO {ledger} (order_no, user_id, points, entry_id) VALUES (?, ?, ?, ?)"
            ),
            format!(
                "INSERT INTO {balances} (user_id, points) VALUES (?, ?)
ON DUPLICATE KEY UPDATE points = points + VALUES(points)"
            ),
        )
    }
);
