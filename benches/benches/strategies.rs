//! The strategies against the business transaction without them, on PostgreSQL, MariaDB and
//! a SQLite file, one task, new keys (or new versions, or rows still to move):
//!
//! * `bare` — `BEGIN; UPDATE accounts SET money = money - 1 WHERE id = ?; COMMIT`;
//! * `claim` — the default strategy around that transaction: the claim and the completion are
//!   each their own commit, so a new key pays three commits;
//! * `tx` — `strategy = "tx"`: the claim and the result ride in the business transaction
//!   (one commit), with a savepoint around them;
//! * `bare_version` / `version` — the versioned `UPDATE … SET money = money - ?, version =
//!   version + 1 WHERE id = ? AND version = ?` in a transaction, by hand and through
//!   `strategy = "version"` (which adds its savepoint);
//! * `bare_state` / `state` — the guarded `UPDATE orders SET status = 'Paid' WHERE id = ? AND
//!   status = 'Created'` in a transaction, by hand and through `strategy = "state"`.
//!
//! Run with `cargo bench -p idem-benches --bench strategies -- --warm-up-time 1
//! --measurement-time 3 --sample-size 10`. A server that does not answer is left out with a
//! `SKIPPED` line.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use idem_benches::servers;
use idem_runtime::StateMachine;
use sqlx::AssertSqlSafe;
use tokio::runtime::Runtime;

/// The states of an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, StateMachine)]
enum OrderStatus {
    #[state(to(Paid))]
    Created,
    Paid,
}

/// Accounts the debits cycle through (one task: no two debits wait on one row).
const ACCOUNTS: i64 = 64;

static RUN: LazyLock<String> = LazyLock::new(|| idem_benches::unique_name("run"));
static NEXT: AtomicU64 = AtomicU64::new(0);
/// The next order id to create in `Created`.
static NEXT_ORDER: AtomicI64 = AtomicI64::new(1);

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A debit written against a version of the account.
#[derive(Clone, Debug)]
struct Debit {
    id: i64,
    money: i64,
    version: i64,
}

macro_rules! strategies {
    ($module:ident, $db:ty, $store:ty, $p1:literal, $p2:literal, $p3:literal) => {
        mod $module {
            use super::*;
            use idem_benches::BenchError;
            use idem_runtime::idempotent;
            use idem_runtime::state::Transitioned;
            use idem_runtime::version::Versioned;

            type Db = $db;
            type Pool = sqlx::Pool<Db>;

            const DEBIT: &str = concat!("UPDATE idem_bench_accounts SET money = money - 1 WHERE id = ", $p1);
            const VERSIONED: &str = concat!(
                "UPDATE idem_bench_accounts SET money = money - ", $p1,
                ", version = version + 1 WHERE id = ", $p2, " AND version = ", $p3
            );
            const PAY: &str = concat!(
                "UPDATE idem_bench_orders SET status = 'Paid' WHERE id = ", $p1,
                " AND status = 'Created'"
            );

            async fn debit(tx: &mut sqlx::Transaction<'_, Db>, account: i64) -> Result<(), BenchError> {
                sqlx::query(DEBIT).bind(account).execute(&mut **tx).await?;
                Ok(())
            }

            /// The business transaction alone.
            pub async fn bare(pool: &Pool, account: i64) -> Result<(), BenchError> {
                let mut tx = pool.begin().await?;
                debit(&mut tx, account).await?;
                tx.commit().await?;
                Ok(())
            }

            /// The default strategy around the business transaction.
            #[idempotent(key = order_no, store = store, scope = "bench.claim")]
            pub async fn claim(store: &$store, pool: &Pool, account: i64, order_no: &str) -> Result<(), BenchError> {
                bare(pool, account).await
            }

            /// The claim and the result in the business transaction.
            #[idempotent(key = order_no, store = store, strategy = "tx", tx = tx, scope = "bench.tx")]
            pub async fn in_tx(
                store: &$store,
                tx: &mut sqlx::Transaction<'_, Db>,
                account: i64,
                order_no: &str,
            ) -> Result<(), BenchError> {
                debit(tx, account).await
            }

            /// The versioned update by hand.
            pub async fn bare_version(pool: &Pool, msg: Debit) -> Result<(), BenchError> {
                let mut tx = pool.begin().await?;
                let done = sqlx::query(VERSIONED)
                    .bind(msg.money)
                    .bind(msg.id)
                    .bind(msg.version)
                    .execute(&mut *tx)
                    .await?;
                assert_eq!(done.rows_affected(), 1, "the versioned update applies");
                tx.commit().await?;
                Ok(())
            }

            /// The versioned update through the attribute (the body writes nothing more).
            #[idempotent(key = "id", strategy = "version", table = "idem_bench_accounts", set(money -= msg.money), tx = tx)]
            pub async fn version(tx: &mut sqlx::Transaction<'_, Db>, msg: Debit) -> Result<Versioned<()>, BenchError> {
                Ok(())
            }

            /// The guarded transition by hand.
            pub async fn bare_state(pool: &Pool, order: i64) -> Result<(), BenchError> {
                let mut tx = pool.begin().await?;
                let done = sqlx::query(PAY).bind(order).execute(&mut *tx).await?;
                assert_eq!(done.rows_affected(), 1, "the order moves");
                tx.commit().await?;
                Ok(())
            }

            /// The guarded transition through the attribute (the body writes nothing more).
            #[idempotent(strategy = "state", machine = OrderStatus, from = Created, to = Paid, table = "idem_bench_orders", id = order, tx = tx)]
            pub async fn state(tx: &mut sqlx::Transaction<'_, Db>, order: i64) -> Result<Transitioned<(), OrderStatus>, BenchError> {
                Ok(())
            }

            /// Creates `count` orders in `Created` and returns the first id.
            pub async fn create_orders(pool: &Pool, count: u64) -> i64 {
                let count = i64::try_from(count).expect("a count of orders");
                let first = NEXT_ORDER.fetch_add(count, Ordering::Relaxed);
                let mut id = first;
                while id < first + count {
                    let end = (id + 500).min(first + count);
                    let values: Vec<String> = (id..end).map(|id| format!("({id}, 'Created')")).collect();
                    let insert = format!("INSERT INTO idem_bench_orders (id, status) VALUES {}", values.join(", "));
                    sqlx::raw_sql(AssertSqlSafe(insert)).execute(pool).await.expect("create orders");
                    id = end;
                }
                first
            }

            /// Every benchmark of this database, in the group `group`.
            pub fn run(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, pool: &Pool, store: &$store) {
                let versions: Arc<Vec<AtomicI64>> = Arc::new((0..ACCOUNTS).map(|_| AtomicI64::new(1)).collect());
                group.bench_function("bare", |b| {
                    b.to_async(rt).iter(|| async {
                        let n = NEXT.fetch_add(1, Ordering::Relaxed);
                        bare(pool, (n % ACCOUNTS as u64) as i64).await.expect("bare");
                    })
                });
                group.bench_function("claim", |b| {
                    b.to_async(rt).iter(|| async {
                        let n = NEXT.fetch_add(1, Ordering::Relaxed);
                        let key = format!("{}-{n}", *RUN);
                        claim(store, pool, (n % ACCOUNTS as u64) as i64, &key).await.expect("claim");
                    })
                });
                group.bench_function("tx", |b| {
                    b.to_async(rt).iter(|| async {
                        let n = NEXT.fetch_add(1, Ordering::Relaxed);
                        let key = format!("{}-{n}", *RUN);
                        let mut tx = pool.begin().await.expect("begin");
                        in_tx(store, &mut tx, (n % ACCOUNTS as u64) as i64, &key).await.expect("tx");
                        tx.commit().await.expect("commit");
                    })
                });
                let next_debit = |versions: &Vec<AtomicI64>| {
                    let n = NEXT.fetch_add(1, Ordering::Relaxed);
                    let id = (n % ACCOUNTS as u64) as i64;
                    let version = versions[id as usize].fetch_add(1, Ordering::Relaxed);
                    Debit { id, money: 1, version }
                };
                group.bench_function("bare_version", |b| {
                    b.to_async(rt).iter(|| async {
                        bare_version(pool, next_debit(&versions)).await.expect("bare_version");
                    })
                });
                group.bench_function("version", |b| {
                    b.to_async(rt).iter(|| async {
                        let mut tx = pool.begin().await.expect("begin");
                        let applied = version(&mut tx, next_debit(&versions)).await.expect("version");
                        assert!(matches!(applied, Versioned::Applied(())), "{applied:?}");
                        tx.commit().await.expect("commit");
                    })
                });
                group.bench_function("bare_state", |b| {
                    b.to_async(rt).iter_custom(|iters| async move {
                        let first = create_orders(pool, iters).await;
                        let start = Instant::now();
                        for order in first..first + iters as i64 {
                            bare_state(pool, order).await.expect("bare_state");
                        }
                        start.elapsed()
                    })
                });
                group.bench_function("state", |b| {
                    b.to_async(rt).iter_custom(|iters| async move {
                        let first = create_orders(pool, iters).await;
                        let start = Instant::now();
                        for order in first..first + iters as i64 {
                            let mut tx = pool.begin().await.expect("begin");
                            let moved = state(&mut tx, order).await.expect("state");
                            assert!(matches!(moved, Transitioned::Applied(())), "{moved:?}");
                            tx.commit().await.expect("commit");
                        }
                        start.elapsed()
                    })
                });
            }
        }
    };
}

strategies!(
    pg,
    sqlx::Postgres,
    idem_runtime::postgres::PostgresStore,
    "$1",
    "$2",
    "$3"
);
strategies!(
    my,
    sqlx::MySql,
    idem_runtime::mysql::MySqlStore,
    "?",
    "?",
    "?"
);
strategies!(
    lite,
    sqlx::Sqlite,
    idem_runtime::sqlite::SqliteStore,
    "?",
    "?",
    "?"
);

/// The business tables, created afresh (their names are literals in the attributes).
async fn create_tables<DB>(pool: &sqlx::Pool<DB>)
where
    DB: sqlx::Database,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
{
    let mut statements = vec![
        "DROP TABLE IF EXISTS idem_bench_accounts".to_owned(),
        "DROP TABLE IF EXISTS idem_bench_orders".to_owned(),
        "CREATE TABLE idem_bench_accounts (id BIGINT PRIMARY KEY, money BIGINT NOT NULL, version BIGINT NOT NULL)".to_owned(),
        "CREATE TABLE idem_bench_orders (id BIGINT PRIMARY KEY, status VARCHAR(16) NOT NULL)".to_owned(),
    ];
    let accounts: Vec<String> = (0..ACCOUNTS)
        .map(|id| format!("({id}, 1000000000, 1)"))
        .collect();
    statements.push(format!(
        "INSERT INTO idem_bench_accounts (id, money, version) VALUES {}",
        accounts.join(", ")
    ));
    for statement in statements {
        sqlx::raw_sql(AssertSqlSafe(statement))
            .execute(pool)
            .await
            .expect("create the business tables");
    }
}

/// Drops the business tables and the store's table.
async fn drop_tables<DB>(pool: &sqlx::Pool<DB>, store_table: &str)
where
    DB: sqlx::Database,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
{
    for table in ["idem_bench_accounts", "idem_bench_orders", store_table] {
        let statement = AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}"));
        if let Err(error) = sqlx::raw_sql(statement).execute(pool).await {
            eprintln!("could not drop {table}: {error}");
        }
    }
}

fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    group
}

fn postgres(c: &mut Criterion) {
    let rt = runtime();
    let url = servers::postgres_url();
    let Some(pool) = rt.block_on(servers::pool::<sqlx::Postgres>("PostgreSQL", &url, true)) else {
        return;
    };
    let table = idem_benches::unique_name("idem_bench_tx");
    let store = idem_runtime::postgres::PostgresStore::new(pool.clone())
        .with_table(&table)
        .expect("a valid table name");
    rt.block_on(async {
        store.migrate().await.expect("create the store's table");
        create_tables(&pool).await;
    });
    let mut group = group(c, "postgres_strategies");
    pg::run(&mut group, &rt, &pool, &store);
    group.finish();
    rt.block_on(drop_tables(&pool, &table));
}

fn mysql(c: &mut Criterion) {
    let rt = runtime();
    let url = servers::mysql_url();
    let Some(pool) = rt.block_on(servers::pool::<sqlx::MySql>("MariaDB", &url, true)) else {
        return;
    };
    let table = idem_benches::unique_name("idem_bench_tx");
    let store = idem_runtime::mysql::MySqlStore::new(pool.clone())
        .with_table(&table)
        .expect("a valid table name");
    rt.block_on(async {
        store.migrate().await.expect("create the store's table");
        create_tables(&pool).await;
    });
    let mut group = group(c, "mysql_strategies");
    my::run(&mut group, &rt, &pool, &store);
    group.finish();
    rt.block_on(drop_tables(&pool, &table));
}

fn sqlite(c: &mut Criterion) {
    let rt = runtime();
    let path = std::env::temp_dir().join(format!("{}.db", idem_benches::unique_name("idem_bench")));
    let url = format!("sqlite://{}", path.display());
    let store = rt.block_on(async {
        let store = idem_runtime::sqlite::SqliteStore::connect(&url)
            .await
            .expect("open the SQLite file");
        store.migrate().await.expect("create the store's table");
        create_tables(store.pool()).await;
        store
    });
    let pool = store.pool().clone();
    let mut group = group(c, "sqlite_strategies");
    lite::run(&mut group, &rt, &pool, &store);
    group.finish();
    rt.block_on(pool.close());
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}

criterion_group!(benches, postgres, mysql, sqlite);
criterion_main!(benches);
