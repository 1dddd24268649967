//! What the chaos consumers do to the database, one handler per strategy, and how the run is
//! reconciled afterwards: everything that names a database's types is here, stamped for
//! PostgreSQL and MySQL / MariaDB by one macro (an `#[idempotent]` handler names its
//! database's transaction type).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use idem_runtime::mysql::MySqlStore;
use idem_runtime::postgres::PostgresStore;
use idem_runtime::redis::RedisStore;
use idem_runtime::state::Transitioned;
use idem_runtime::version::Versioned;
use idem_runtime::{
    Claim, Error, Fingerprint, Lease, RecordKey, StateMachine, Store, StoreError, idempotent,
};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, MySql, Pool, Postgres};

use super::{ChaosError, Task};
use crate::orders::sql;
use crate::points::{PointsDb, Tables};

/// The idem table of a chaos run (the `tx`, `version` and `state` handlers' database).
pub const IDEM_TABLE: &str = "chaos_idem";

/// The prefix of the points tables of a chaos run: `chaos_points_ledger` and
/// `chaos_points_balances`.
pub const POINTS_PREFIX: &str = "chaos_points";

/// The tables of a run, dropped and created again by [`ChaosDb::reset`]. `chaos_effects` has
/// no unique key on purpose: a doubled effect shows as a second row instead of an error.
const SCHEMA: [&str; 3] = [
    "CREATE TABLE chaos_accounts (
        id VARCHAR(64) PRIMARY KEY,
        amount BIGINT NOT NULL,
        version BIGINT NOT NULL
    )",
    "CREATE TABLE chaos_orders (
        id VARCHAR(64) PRIMARY KEY,
        status VARCHAR(16) NOT NULL
    )",
    "CREATE TABLE chaos_effects (
        id {ID},
        strategy VARCHAR(8) NOT NULL,
        business_key VARCHAR(64) NOT NULL,
        amount BIGINT NOT NULL
    )",
];

/// The tables [`ChaosDb::reset`] drops.
const TABLES: [&str; 6] = [
    "chaos_accounts",
    "chaos_orders",
    "chaos_effects",
    "chaos_points_ledger",
    "chaos_points_balances",
    IDEM_TABLE,
];

/// An order of the `state` handler: paid once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, StateMachine)]
pub enum ChaosOrder {
    /// Seeded so.
    #[state(to(Paid))]
    Created,
    /// Moved here by the handler, once.
    Paid,
}

/// The message of the `version` handler: move account `id` from `version` on by `amount`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionTask {
    /// The account (its row's `id`).
    pub id: String,
    /// The version the producer saw: 0, as seeded.
    pub version: i64,
    /// What to add.
    pub amount: i64,
}

/// What one handler call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Done {
    /// The body ran and its effect is in.
    Applied,
    /// A duplicate: nothing was written.
    Duplicate,
}

/// A store that says when a claim takes a key over from a holder whose lease ran out (the
/// lease's fence is above 1): the `claim` handler's stores are wrapped in it so the consumers
/// can count takeovers.
#[derive(Clone, Debug)]
pub struct Watched<S> {
    inner: S,
}

impl<S> Watched<S> {
    /// Watches `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: Store> Store for Watched<S> {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, Error> {
        let claim = self.inner.claim(key, fingerprint, lease).await?;
        if let Claim::Acquired(lease) = &claim
            && lease.fence() > 1
        {
            super::child::say(&format!("T {}", lease.fence()));
        }
        Ok(claim)
    }

    async fn complete(
        &self,
        key: &RecordKey,
        lease: &Lease,
        result: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        self.inner.complete(key, lease, result, ttl).await
    }

    async fn release(&self, key: &RecordKey, lease: &Lease) -> Result<(), Error> {
        self.inner.release(key, lease).await
    }

    async fn extend(
        &self,
        key: &RecordKey,
        lease: &Lease,
        duration: Duration,
    ) -> Result<Lease, Error> {
        self.inner.extend(key, lease, duration).await
    }

    async fn purge_expired(&self, limit: u32) -> Result<u64, Error> {
        self.inner.purge_expired(limit).await
    }
}

/// The `claim` handler's store: Redis, watched for takeovers.
pub type ClaimStore = Watched<RedisStore<ConnectionManager>>;

/// What the database holds after a run, read for the reconciliation.
#[derive(Clone, Debug, Default)]
pub struct Holdings {
    /// `(strategy, business key)` → effect rows.
    pub effects: BTreeMap<(String, String), i64>,
    /// Account id → `(amount, version)`.
    pub accounts: BTreeMap<String, (i64, i64)>,
    /// Order id → status.
    pub orders: BTreeMap<String, String>,
    /// Points ledger: order number → `(user, points)`.
    pub ledger: BTreeMap<String, (i64, i64)>,
    /// Points balances: user → points.
    pub balances: BTreeMap<i64, i64>,
}

/// A database the chaos run works on: PostgreSQL or MySQL / MariaDB.
pub trait ChaosDb: PointsDb {
    /// Opens a small pool on `url` (each consumer process has its own).
    fn connect_pool(url: &str) -> impl Future<Output = Result<Pool<Self>, ChaosError>> + Send;

    /// idem's store of the run, in [`IDEM_TABLE`].
    fn idem_store(pool: Pool<Self>) -> Result<Self::Store, ChaosError>;

    /// Drops the run's tables and creates them again (idem's and the points service's too).
    fn reset(pool: &Pool<Self>) -> impl Future<Output = Result<(), ChaosError>> + Send;

    /// Inserts the accounts (amount 0, version 0) and orders (`Created`) the tasks need.
    fn seed(
        pool: &Pool<Self>,
        accounts: &[String],
        orders: &[String],
    ) -> impl Future<Output = Result<(), ChaosError>> + Send;

    /// `strategy = "version"`: adds the amount to the account once, with an effect row in the
    /// same transaction.
    fn apply_version(
        pool: &Pool<Self>,
        task: &Task,
        pause: Duration,
    ) -> impl Future<Output = Result<Done, ChaosError>> + Send;

    /// `strategy = "state"`: moves the order `Created → Paid` once, with an effect row in
    /// the same transaction.
    fn apply_state(
        pool: &Pool<Self>,
        task: &Task,
        pause: Duration,
    ) -> impl Future<Output = Result<Done, ChaosError>> + Send;

    /// The plain claim strategy on Redis: the body writes its effect row outside any
    /// transaction (autocommit), as a call to another service would be.
    fn apply_claim(
        store: &ClaimStore,
        pool: &Pool<Self>,
        task: &Task,
        pause: Duration,
    ) -> impl Future<Output = Result<Done, ChaosError>> + Send;

    /// Reads what the run left in the database.
    fn holdings(pool: &Pool<Self>) -> impl Future<Output = Result<Holdings, ChaosError>> + Send;
}

/// Rows per seeding statement.
const SEED_BATCH: usize = 500;

/// Writes an effect row of `strategy` for `key` in `executor`.
fn effect<'q, DB: PointsDb>(
    strategy: &'q str,
    key: &'q str,
    amount: i64,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>
where
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sqlx::query(sql::<DB>(
        "INSERT INTO chaos_effects (strategy, business_key, amount) VALUES (?, ?, ?)",
    ))
    .bind(strategy)
    .bind(key)
    .bind(amount)
}

/// Says that a body has written its effect, then goes on for `pause` (as a body that calls
/// another service would): the window the orchestrator's kills and freezes land in.
async fn body_running(task: &Task, pause: Duration) {
    super::child::say(&format!("B {}", task.kind.name()));
    tokio::time::sleep(pause).await;
}

macro_rules! chaos_db {
    ($db:ty, $store:ty, $options:ty, $id:literal, $handlers:ident) => {
        /// The handlers of one database. (Their attributes are written on one line: rustfmt
        /// indents a multi-line attribute in this macro further on every run.)
        mod $handlers {
            use super::*;

            /// `UPDATE chaos_accounts SET amount = amount + ?, version = version + 1
            /// WHERE id = ? AND version = ?`, then the effect row.
            #[idempotent(key = "id", strategy = "version", table = "chaos_accounts", set(amount += msg.amount), tx = tx)]
            pub(super) async fn credited(
                tx: &mut sqlx::Transaction<'_, $db>,
                task: &Task,
                pause: Duration,
                msg: VersionTask,
            ) -> Result<Versioned<()>, ChaosError> {
                effect::<$db>("version", &msg.id, msg.amount)
                    .execute(&mut **tx)
                    .await?;
                body_running(task, pause).await;
                Ok(())
            }

            /// `UPDATE chaos_orders SET status = 'Paid' WHERE id = ? AND status =
            /// 'Created'`, then the effect row.
            #[idempotent(strategy = "state", machine = ChaosOrder, from = Created, to = Paid, table = "chaos_orders", id = id, tx = tx)]
            pub(super) async fn paid(
                tx: &mut sqlx::Transaction<'_, $db>,
                task: &Task,
                pause: Duration,
                id: &str,
            ) -> Result<Transitioned<(), ChaosOrder>, ChaosError> {
                effect::<$db>("state", id, task.amount)
                    .execute(&mut **tx)
                    .await?;
                body_running(task, pause).await;
                Ok(())
            }

            /// Claim the key in Redis, write the effect (autocommit), complete.
            #[idempotent(key = "key", store = store, scope = "chaos.claim", lease = "2s")]
            pub(super) async fn called(
                store: &ClaimStore,
                pool: &Pool<$db>,
                ran: &AtomicBool,
                pause: Duration,
                task: &Task,
            ) -> Result<i64, ChaosError> {
                effect::<$db>("claim", &task.key, task.amount)
                    .execute(pool)
                    .await?;
                ran.store(true, Ordering::SeqCst);
                body_running(task, pause).await;
                Ok(task.amount)
            }
        }

        impl ChaosDb for $db {
            async fn connect_pool(url: &str) -> Result<Pool<Self>, ChaosError> {
                Ok(<$options>::new()
                    .max_connections(4)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect(url)
                    .await?)
            }

            fn idem_store(pool: Pool<Self>) -> Result<Self::Store, ChaosError> {
                Ok(<$store>::new(pool).with_table(IDEM_TABLE)?)
            }

            async fn reset(pool: &Pool<Self>) -> Result<(), ChaosError> {
                for table in TABLES {
                    sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
                        .execute(pool)
                        .await?;
                }
                for statement in SCHEMA {
                    sqlx::raw_sql(AssertSqlSafe(statement.replace("{ID}", $id)))
                        .execute(pool)
                        .await?;
                }
                let store = Self::idem_store(pool.clone())?;
                let points = crate::points::Points::<$db>::with_tables(
                    store,
                    Tables::with_prefix(POINTS_PREFIX)?,
                );
                points.migrate().await?;
                Ok(())
            }

            async fn seed(
                pool: &Pool<Self>,
                accounts: &[String],
                orders: &[String],
            ) -> Result<(), ChaosError> {
                for batch in accounts.chunks(SEED_BATCH) {
                    let rows = vec!["(?, 0, 0)"; batch.len()].join(", ");
                    let statement =
                        format!("INSERT INTO chaos_accounts (id, amount, version) VALUES {rows}");
                    let mut query = sqlx::query(sql::<$db>(&statement));
                    for id in batch {
                        query = query.bind(id);
                    }
                    query.execute(pool).await?;
                }
                for batch in orders.chunks(SEED_BATCH) {
                    let rows = vec!["(?, 'Created')"; batch.len()].join(", ");
                    let statement = format!("INSERT INTO chaos_orders (id, status) VALUES {rows}");
                    let mut query = sqlx::query(sql::<$db>(&statement));
                    for id in batch {
                        query = query.bind(id);
                    }
                    query.execute(pool).await?;
                }
                Ok(())
            }

            async fn apply_version(
                pool: &Pool<Self>,
                task: &Task,
                pause: Duration,
            ) -> Result<Done, ChaosError> {
                let msg = VersionTask {
                    id: task.key.clone(),
                    version: 0,
                    amount: task.amount,
                };
                let mut tx = pool.begin().await?;
                let done = $handlers::credited(&mut tx, task, pause, msg).await?;
                tx.commit().await?;
                Ok(match done {
                    Versioned::Applied(()) => Done::Applied,
                    Versioned::AlreadyApplied { .. } => Done::Duplicate,
                })
            }

            async fn apply_state(
                pool: &Pool<Self>,
                task: &Task,
                pause: Duration,
            ) -> Result<Done, ChaosError> {
                let mut tx = pool.begin().await?;
                let done = $handlers::paid(&mut tx, task, pause, &task.key).await?;
                tx.commit().await?;
                Ok(match done {
                    Transitioned::Applied(()) => Done::Applied,
                    Transitioned::Duplicate(_) => Done::Duplicate,
                })
            }

            async fn apply_claim(
                store: &ClaimStore,
                pool: &Pool<Self>,
                task: &Task,
                pause: Duration,
            ) -> Result<Done, ChaosError> {
                let ran = AtomicBool::new(false);
                $handlers::called(store, pool, &ran, pause, task).await?;
                Ok(if ran.load(Ordering::SeqCst) {
                    Done::Applied
                } else {
                    Done::Duplicate
                })
            }

            async fn holdings(pool: &Pool<Self>) -> Result<Holdings, ChaosError> {
                let mut holdings = Holdings::default();
                let effects: Vec<(String, String, i64)> = sqlx::query_as(sql::<$db>(
                    "SELECT strategy, business_key, COUNT(*) FROM chaos_effects \
                     GROUP BY strategy, business_key",
                ))
                .fetch_all(pool)
                .await?;
                for (strategy, key, rows) in effects {
                    holdings.effects.insert((strategy, key), rows);
                }
                let accounts: Vec<(String, i64, i64)> =
                    sqlx::query_as(sql::<$db>("SELECT id, amount, version FROM chaos_accounts"))
                        .fetch_all(pool)
                        .await?;
                for (id, amount, version) in accounts {
                    holdings.accounts.insert(id, (amount, version));
                }
                let orders: Vec<(String, String)> =
                    sqlx::query_as(sql::<$db>("SELECT id, status FROM chaos_orders"))
                        .fetch_all(pool)
                        .await?;
                holdings.orders.extend(orders);
                let ledger: Vec<(String, i64, i64)> = sqlx::query_as(sql::<$db>(
                    "SELECT order_no, user_id, points FROM chaos_points_ledger",
                ))
                .fetch_all(pool)
                .await?;
                for (order_no, user, points) in ledger {
                    holdings.ledger.insert(order_no, (user, points));
                }
                let balances: Vec<(i64, i64)> = sqlx::query_as(sql::<$db>(
                    "SELECT user_id, points FROM chaos_points_balances",
                ))
                .fetch_all(pool)
                .await?;
                holdings.balances.extend(balances);
                Ok(holdings)
            }
        }
    };
}

chaos_db!(
    Postgres,
    PostgresStore,
    sqlx::postgres::PgPoolOptions,
    "BIGSERIAL PRIMARY KEY",
    postgres_handlers
);
chaos_db!(
    MySql,
    MySqlStore,
    sqlx::mysql::MySqlPoolOptions,
    "BIGINT AUTO_INCREMENT PRIMARY KEY",
    mysql_handlers
);

/// Builds the `claim` handler's store: Redis at `url`, under `prefix`.
///
/// # Errors
///
/// When Redis cannot be reached or `prefix` is not plain.
pub async fn claim_store(url: &str, prefix: &str) -> Result<ClaimStore, ChaosError> {
    let client =
        redis::Client::open(url).map_err(|error| Error::Store(StoreError::new("redis", error)))?;
    let connection = ConnectionManager::new(client)
        .await
        .map_err(|error| Error::Store(StoreError::new("redis", error)))?;
    Ok(Watched::new(
        RedisStore::new(connection).with_prefix(prefix)?,
    ))
}
