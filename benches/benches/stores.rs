//! Claim / complete / replay on every store, in one run: through the `#[idempotent]` handler,
//! through the store's methods without the macro, written by hand on sqlx / redis with idem's
//! own statements, the raw primitive alone, and the peer crate `idempotent`; at 1, 8 and 64
//! concurrent tasks; with results of 16 B, 1 KiB and 64 KiB.
//!
//! Every benchmark reports the time per operation (criterion's `time`) and operations per
//! second (`thrpt`); with N tasks, the time is the wall time of all of them divided by the
//! operations they did together. Run with
//! `cargo bench -p idem-benches --bench stores -- --warm-up-time 1 --measurement-time 3
//! --sample-size 10` (see `docs/PERFORMANCE.md`). A server that does not answer leaves its
//! groups out, with a `SKIPPED` line.

use std::future::Future;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use idem_benches::hand_memory::HandMemory;
use idem_benches::hand_redis::HandRedis;
use idem_benches::hand_sql::HandSql;
use idem_benches::{LEASE, Paid, Receipt, SCOPE, TTL, credit, credit_unchecked, peer, servers};
use idem_runtime::cache::CachedStore;
use idem_runtime::mysql::MySqlStore;
use idem_runtime::postgres::PostgresStore;
use idem_runtime::redis::RedisStore;
use idem_runtime::sqlite::SqliteStore;
use idem_runtime::{Claim, MemoryStore, RecordKey, Store};
use sqlx::AssertSqlSafe;
use tokio::runtime::Runtime;

/// One measured operation; its argument numbers the call (for fresh keys).
type Op = Arc<dyn Fn(u64) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

fn op<F, Fut>(f: F) -> Op
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |n| Box::pin(f(n)))
}

/// The run's own key prefix: new keys are never reused, across benchmarks and runs.
static RUN: LazyLock<String> = LazyLock::new(|| idem_benches::unique_name("run"));

fn fresh(bench: &str, n: u64) -> String {
    format!("{}-{bench}-{n}", *RUN)
}

/// Numbers the calls of every benchmark: a fresh key is never used twice in a run.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// How many completed keys the replay benchmarks cycle through.
const REPLAY_KEYS: u64 = 256;

fn replay_key(size: usize, n: u64) -> String {
    format!("{}-replay-{size}-{}", *RUN, n % REPLAY_KEYS)
}

/// The completed keys the replays through the result cache read.
fn cached_key(n: u64) -> String {
    format!("{}-cached-{}", *RUN, n % REPLAY_KEYS)
}

/// The result sizes measured (the receipt's note; the stored JSON is about 60 bytes more).
const SIZES: [(usize, &str); 3] = [(16, "16B"), (1024, "1KiB"), (64 * 1024, "64KiB")];

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Measures `op` as `id`, run by `tasks` concurrent tasks sharing the iterations.
fn bench(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, id: &str, tasks: u64, op: Op) {
    let counter = &NEXT;
    group.bench_function(id, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let op = op.clone();
            async move {
                let start = Instant::now();
                if tasks == 1 {
                    for _ in 0..iters {
                        op(counter.fetch_add(1, Ordering::Relaxed)).await;
                    }
                } else {
                    let workers: Vec<_> = (0..tasks)
                        .map(|task| {
                            let share = iters / tasks + u64::from(task < iters % tasks);
                            let op = op.clone();
                            tokio::spawn(async move {
                                for _ in 0..share {
                                    op(counter.fetch_add(1, Ordering::Relaxed)).await;
                                }
                            })
                        })
                        .collect();
                    for worker in workers {
                        worker.await.expect("a benchmark task panicked");
                    }
                }
                start.elapsed()
            }
        });
    });
}

/// The `#[idempotent]` handler and the store's own methods on `store`.
fn idem_ops<S: Store + 'static>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    store: Arc<S>,
) {
    // The completed keys the replays read, for every size.
    rt.block_on(async {
        for (size, _) in SIZES {
            for n in 0..REPLAY_KEYS {
                credit(&*store, size, Paid::new(replay_key(size, n)))
                    .await
                    .expect("complete a replay key");
            }
        }
    });
    let handler_new = |store: &Arc<S>, name: &'static str, size: usize| {
        let store = store.clone();
        op(move |n| {
            let store = store.clone();
            async move {
                credit(&*store, size, Paid::new(fresh(name, n)))
                    .await
                    .expect("a new key through the handler");
            }
        })
    };
    let handler_replay = |store: &Arc<S>, size: usize| {
        let store = store.clone();
        op(move |n| {
            let store = store.clone();
            async move {
                let receipt = credit(&*store, size, Paid::new(replay_key(size, n)))
                    .await
                    .expect("a replay through the handler");
                std::hint::black_box(receipt);
            }
        })
    };

    bench(
        group,
        rt,
        "new_key/idem",
        1,
        handler_new(&store, "idem", 16),
    );
    bench(group, rt, "new_key/idem_no_fingerprint", 1, {
        let store = store.clone();
        op(move |n| {
            let store = store.clone();
            async move {
                credit_unchecked(&*store, 16, Paid::new(fresh("nofp", n)))
                    .await
                    .expect("a new key through the handler");
            }
        })
    });
    bench(group, rt, "new_key/store_api", 1, {
        let store = store.clone();
        op(move |n| {
            let store = store.clone();
            async move {
                let msg = Paid::new(fresh("api", n));
                let key = RecordKey::new(SCOPE, &msg.order_no).expect("a valid key");
                let Claim::Acquired(lease) = store.claim(&key, None, LEASE).await.expect("claim")
                else {
                    panic!("a new key is acquired");
                };
                let receipt = Receipt::for_message(&msg, 16);
                let stored = serde_json::to_vec(&receipt).expect("a receipt serializes");
                store
                    .complete(&key, &lease, &stored, TTL)
                    .await
                    .expect("complete");
            }
        })
    });
    bench(group, rt, "replay/idem", 1, handler_replay(&store, 16));
    bench(group, rt, "replay/store_api", 1, {
        let store = store.clone();
        op(move |n| {
            let store = store.clone();
            async move {
                let key = RecordKey::new(SCOPE, &replay_key(16, n)).expect("a valid key");
                let Claim::Completed(stored) = store.claim(&key, None, LEASE).await.expect("claim")
                else {
                    panic!("a completed key replays");
                };
                let receipt: Receipt = serde_json::from_slice(&stored).expect("a receipt");
                std::hint::black_box(receipt);
            }
        })
    });
    // The handler over the in-process result cache (`CachedStore`) in front of the store: its
    // replay keys are completed through the cache, so that it holds their results.
    let cached = Arc::new(CachedStore::new(
        store.clone(),
        NonZeroUsize::new(4 * REPLAY_KEYS as usize).expect("not 0"),
    ));
    rt.block_on(async {
        for n in 0..REPLAY_KEYS {
            credit(&*cached, 16, Paid::new(cached_key(n)))
                .await
                .expect("complete a replay key through the cache");
        }
    });
    let cached_replay = {
        let cached = cached.clone();
        op(move |n| {
            let cached = cached.clone();
            async move {
                let receipt = credit(&*cached, 16, Paid::new(cached_key(n)))
                    .await
                    .expect("a replay through the cache");
                std::hint::black_box(receipt);
            }
        })
    };
    bench(group, rt, "replay/idem_cached", 1, cached_replay.clone());
    bench(group, rt, "tasks64/replay/idem_cached", 64, cached_replay);
    for tasks in [8, 64] {
        bench(
            group,
            rt,
            &format!("tasks{tasks}/new_key/idem"),
            tasks,
            handler_new(&store, "idem", 16),
        );
        bench(
            group,
            rt,
            &format!("tasks{tasks}/replay/idem"),
            tasks,
            handler_replay(&store, 16),
        );
    }
    for (size, label) in &SIZES[1..] {
        bench(
            group,
            rt,
            &format!("size{label}/new_key/idem"),
            1,
            handler_new(&store, "idem", *size),
        );
        bench(
            group,
            rt,
            &format!("size{label}/replay/idem"),
            1,
            handler_replay(&store, *size),
        );
    }
}

/// The hand-written floor: `new_key(name, n, size)` and `replay(n)` as ops.
fn hand_ops(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    new_key: impl Fn(usize) -> Op,
    replay: Op,
) {
    bench(group, rt, "new_key/hand_written", 1, new_key(16));
    bench(group, rt, "replay/hand_written", 1, replay);
    for tasks in [8, 64] {
        bench(
            group,
            rt,
            &format!("tasks{tasks}/new_key/hand_written"),
            tasks,
            new_key(16),
        );
    }
    for (size, label) in &SIZES[1..] {
        bench(
            group,
            rt,
            &format!("size{label}/new_key/hand_written"),
            1,
            new_key(*size),
        );
    }
}

fn configure<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    group
}

fn memory(c: &mut Criterion) {
    let rt = runtime();
    let mut group = configure(c, "memory");
    idem_ops(&mut group, &rt, Arc::new(MemoryStore::new()));

    let hand = Arc::new(HandMemory::default());
    rt.block_on(async {
        for n in 0..REPLAY_KEYS {
            hand.new_key(replay_key(16, n), 16);
        }
    });
    let new_key = |size: usize| {
        let hand = hand.clone();
        op(move |n| {
            let hand = hand.clone();
            async move {
                std::hint::black_box(hand.new_key(fresh("hand", n), size));
            }
        })
    };
    let replay = {
        let hand = hand.clone();
        op(move |n| {
            let hand = hand.clone();
            async move {
                std::hint::black_box(hand.replay(&replay_key(16, n)));
            }
        })
    };
    hand_ops(&mut group, &rt, new_key, replay);

    // The raw primitive: an insert into, and a read from, a map under a mutex.
    let map = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        Vec<u8>,
    >::new()));
    bench(&mut group, &rt, "raw/insert", 1, {
        let map = map.clone();
        op(move |n| {
            let map = map.clone();
            async move {
                let mut map = map
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                map.insert(fresh("raw", n), b"{}".to_vec());
            }
        })
    });
    bench(&mut group, &rt, "raw/get", 1, {
        let map = map.clone();
        op(move |n| {
            let map = map.clone();
            async move {
                let map = map
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                std::hint::black_box(map.get(&fresh("raw", n % 1024)).cloned());
            }
        })
    });

    // The peer's in-memory store (an actor task behind a channel).
    let store = Arc::new(rt.block_on(async {
        idempotent::store::memory::MemoryStore::new(1024, Duration::from_secs(60))
    }));
    peer_ops(&mut group, &rt, store);
    group.finish();
}

/// The peer crate on `store`: new keys and replays, serial and concurrent.
fn peer_ops<S: idempotent::store::IdempotencyStore>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    store: Arc<S>,
) {
    rt.block_on(async {
        for n in 0..REPLAY_KEYS {
            peer::handle(&*store, replay_key(16, n), 16).await;
        }
    });
    let new_key = || {
        let store = store.clone();
        op(move |n| {
            let store = store.clone();
            async move {
                std::hint::black_box(peer::handle(&*store, fresh("peer", n), 16).await);
            }
        })
    };
    let replay = || {
        let store = store.clone();
        op(move |n| {
            let store = store.clone();
            async move {
                std::hint::black_box(peer::handle(&*store, replay_key(16, n), 16).await);
            }
        })
    };
    bench(group, rt, "new_key/peer", 1, new_key());
    bench(group, rt, "replay/peer", 1, replay());
    for tasks in [8, 64] {
        bench(
            group,
            rt,
            &format!("tasks{tasks}/new_key/peer"),
            tasks,
            new_key(),
        );
        bench(
            group,
            rt,
            &format!("tasks{tasks}/replay/peer"),
            tasks,
            replay(),
        );
    }
}

/// A raw table `(k, v)` with `REPLAY_KEYS` rows, and the three primitives on it.
struct RawSql {
    create: String,
    seed: String,
    insert: String,
    update: String,
    select: String,
}

fn raw_sql<DB>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    pool: &sqlx::Pool<DB>,
    raw: RawSql,
) where
    DB: sqlx::Database,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    rt.block_on(async {
        sqlx::raw_sql(AssertSqlSafe(raw.create.clone()))
            .execute(pool)
            .await
            .expect("create the raw table");
        for n in 0..REPLAY_KEYS {
            sqlx::query::<DB>(AssertSqlSafe(raw.seed.clone()))
                .bind(fresh("rawrow", n))
                .bind(&b"{}"[..])
                .execute(pool)
                .await
                .expect("seed the raw table");
        }
    });
    let statement = |sql: &str, name: &'static str, modulo: Option<u64>| {
        let (pool, sql): (sqlx::Pool<DB>, Arc<str>) = (pool.clone(), sql.into());
        op(move |n| {
            let (pool, sql) = (pool.clone(), sql.clone());
            async move {
                let key = match modulo {
                    Some(m) => fresh("rawrow", n % m),
                    None => fresh(name, n),
                };
                sqlx::query::<DB>(AssertSqlSafe(sql))
                    .bind(key)
                    .bind(&br#"{"points":25}"#[..])
                    .execute(&pool)
                    .await
                    .expect("a raw statement");
            }
        })
    };
    bench(
        group,
        rt,
        "raw/insert",
        1,
        statement(&raw.insert, "raw", None),
    );
    bench(
        group,
        rt,
        "raw/update",
        1,
        statement(&raw.update, "raw", Some(REPLAY_KEYS)),
    );
    bench(
        group,
        rt,
        "raw/select",
        1,
        statement(&raw.select, "raw", Some(REPLAY_KEYS)),
    );
}

fn sqlite(c: &mut Criterion) {
    let rt = runtime();
    let path = std::env::temp_dir().join(format!("{}.db", idem_benches::unique_name("idem_bench")));
    let url = format!("sqlite://{}", path.display());
    let store = rt.block_on(async {
        let store = SqliteStore::connect(&url)
            .await
            .expect("open the SQLite file");
        store.migrate().await.expect("create the table");
        store
    });
    let pool = store.pool().clone();
    let mut group = configure(c, "sqlite");
    idem_ops(&mut group, &rt, Arc::new(store.clone()));
    let hand = Arc::new(HandSql::<sqlx::Sqlite>::new(pool.clone(), store.table()));
    hand_sql_ops(&mut group, &rt, hand);
    raw_sql(
        &mut group,
        &rt,
        &pool,
        RawSql {
            create: "CREATE TABLE IF NOT EXISTS bench_raw (k TEXT PRIMARY KEY, v BLOB)".into(),
            seed: "INSERT INTO bench_raw (k, v) VALUES (?1, ?2)".into(),
            insert: "INSERT INTO bench_raw (k, v) VALUES (?1, ?2) ON CONFLICT DO NOTHING".into(),
            update: "UPDATE bench_raw SET v = ?2 WHERE k = ?1".into(),
            select: "SELECT v FROM bench_raw WHERE k = ?1 AND ?2 IS NOT NULL".into(),
        },
    );
    group.finish();
    rt.block_on(pool.close());
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}

macro_rules! hand_sql_ops_fn {
    ($name:ident, $db:ty) => {
        fn $name(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, hand: Arc<HandSql<$db>>) {
            let new_key = |size: usize| {
                let hand = hand.clone();
                op(move |n| {
                    let hand = hand.clone();
                    async move {
                        let receipt = hand
                            .new_key(fresh("hand", n), size)
                            .await
                            .expect("a new key by hand");
                        std::hint::black_box(receipt);
                    }
                })
            };
            let replay = {
                let hand = hand.clone();
                op(move |n| {
                    let hand = hand.clone();
                    async move {
                        let receipt = hand
                            .replay(&replay_key(16, n))
                            .await
                            .expect("a replay by hand");
                        std::hint::black_box(receipt);
                    }
                })
            };
            hand_ops(group, rt, new_key, replay);
        }
    };
}

hand_sql_ops_fn!(hand_sql_ops, sqlx::Sqlite);
hand_sql_ops_fn!(hand_pg_ops, sqlx::Postgres);
hand_sql_ops_fn!(hand_mysql_ops, sqlx::MySql);

/// Drops `tables` through `pool`.
async fn drop_tables<DB>(pool: &sqlx::Pool<DB>, tables: &[&str])
where
    DB: sqlx::Database,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
{
    for table in tables {
        let statement = AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}"));
        if let Err(error) = sqlx::raw_sql(statement).execute(pool).await {
            eprintln!("could not drop the benchmark table {table}: {error}");
        }
    }
}

fn postgres(c: &mut Criterion) {
    let rt = runtime();
    let url = servers::postgres_url();
    let Some(pool) = rt.block_on(servers::pool::<sqlx::Postgres>("PostgreSQL", &url, true)) else {
        return;
    };
    let table = idem_benches::unique_name("idem_bench");
    let raw = idem_benches::unique_name("idem_bench_raw");
    let store = PostgresStore::new(pool.clone())
        .with_table(&table)
        .expect("a valid table name");
    rt.block_on(store.migrate()).expect("create the table");
    let mut group = configure(c, "postgres");
    idem_ops(&mut group, &rt, Arc::new(store.clone()));
    // The same handler on a pool that does not ping before each checkout.
    let quiet = rt
        .block_on(servers::pool::<sqlx::Postgres>("PostgreSQL", &url, false))
        .expect("a second pool");
    let quiet_store = Arc::new(
        PostgresStore::new(quiet.clone())
            .with_table(&table)
            .expect("a valid table name"),
    );
    bench(&mut group, &rt, "new_key/idem_no_checkout_ping", 1, {
        let store = quiet_store.clone();
        op(move |n| {
            let store = store.clone();
            async move {
                credit(&*store, 16, Paid::new(fresh("quiet", n)))
                    .await
                    .expect("a new key through the handler");
            }
        })
    });
    bench(&mut group, &rt, "replay/idem_no_checkout_ping", 1, {
        let store = quiet_store.clone();
        op(move |n| {
            let store = store.clone();
            async move {
                std::hint::black_box(
                    credit(&*store, 16, Paid::new(replay_key(16, n)))
                        .await
                        .expect("a replay through the handler"),
                );
            }
        })
    });
    hand_pg_ops(
        &mut group,
        &rt,
        Arc::new(HandSql::<sqlx::Postgres>::new(pool.clone(), &table)),
    );
    raw_sql(
        &mut group,
        &rt,
        &pool,
        RawSql {
            create: format!("CREATE TABLE {raw} (k TEXT PRIMARY KEY, v BYTEA)"),
            seed: format!("INSERT INTO {raw} (k, v) VALUES ($1, $2)"),
            insert: format!("INSERT INTO {raw} (k, v) VALUES ($1, $2) ON CONFLICT DO NOTHING"),
            update: format!("UPDATE {raw} SET v = $2 WHERE k = $1"),
            select: format!("SELECT v FROM {raw} WHERE k = $1 AND $2::BYTEA IS NOT NULL"),
        },
    );
    group.finish();
    rt.block_on(async {
        drop_tables(&pool, &[&table, &raw]).await;
        quiet.close().await;
        pool.close().await;
    });
}

fn mysql(c: &mut Criterion) {
    let rt = runtime();
    let url = servers::mysql_url();
    let Some(pool) = rt.block_on(servers::pool::<sqlx::MySql>("MariaDB", &url, true)) else {
        return;
    };
    let table = idem_benches::unique_name("idem_bench");
    let raw = idem_benches::unique_name("idem_bench_raw");
    let store = MySqlStore::new(pool.clone())
        .with_table(&table)
        .expect("a valid table name");
    rt.block_on(store.migrate()).expect("create the table");
    let mut group = configure(c, "mysql");
    idem_ops(&mut group, &rt, Arc::new(store.clone()));
    hand_mysql_ops(
        &mut group,
        &rt,
        Arc::new(HandSql::<sqlx::MySql>::new(pool.clone(), &table)),
    );
    raw_sql(
        &mut group,
        &rt,
        &pool,
        RawSql {
            create: format!(
                "CREATE TABLE {raw} (k VARBINARY(255) PRIMARY KEY, v LONGBLOB) ENGINE = InnoDB"
            ),
            seed: format!("INSERT INTO {raw} (k, v) VALUES (?, ?)"),
            insert: format!("INSERT IGNORE INTO {raw} (k, v) VALUES (?, ?)"),
            update: format!("UPDATE {raw} SET v = ? WHERE k = ?"),
            select: format!("SELECT v FROM {raw} WHERE k = ? AND ? IS NOT NULL"),
        },
    );
    group.finish();
    rt.block_on(async {
        drop_tables(&pool, &[&table, &raw]).await;
        pool.close().await;
    });
}

/// Deletes every key matching `pattern`.
async fn delete_keys(connection: &mut redis::aio::ConnectionManager, pattern: &str) {
    let mut cursor: u64 = 0;
    loop {
        let scanned: redis::RedisResult<(u64, Vec<Vec<u8>>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(connection)
            .await;
        let Ok((next, keys)) = scanned else {
            eprintln!("could not clean the benchmark keys {pattern}");
            return;
        };
        if !keys.is_empty() {
            let _: redis::RedisResult<()> =
                redis::cmd("DEL").arg(keys).query_async(connection).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

fn redis_store(c: &mut Criterion) {
    let rt = runtime();
    let Some(manager) = rt.block_on(servers::redis()) else {
        return;
    };
    let prefix = idem_benches::unique_name("idem_bench");
    let store = RedisStore::new(manager.clone())
        .with_prefix(&prefix)
        .expect("a valid prefix");
    let mut group = configure(c, "redis");
    idem_ops(&mut group, &rt, Arc::new(store));
    let hand = Arc::new(HandRedis::new(manager.clone(), &prefix));
    let new_key = |size: usize| {
        let hand = hand.clone();
        op(move |n| {
            let hand = hand.clone();
            async move {
                std::hint::black_box(
                    hand.new_key(fresh("hand", n), size)
                        .await
                        .expect("a new key by hand"),
                );
            }
        })
    };
    let replay = {
        let hand = hand.clone();
        op(move |n| {
            let hand = hand.clone();
            async move {
                std::hint::black_box(
                    hand.replay(&replay_key(16, n))
                        .await
                        .expect("a replay by hand"),
                );
            }
        })
    };
    hand_ops(&mut group, &rt, new_key, replay);

    // The raw primitives: SET NX PX and GET.
    let raw = format!("{prefix}:raw");
    bench(&mut group, &rt, "raw/set_nx_px", 1, {
        let (manager, raw) = (manager.clone(), raw.clone());
        op(move |n| {
            let (mut manager, raw) = (manager.clone(), raw.clone());
            async move {
                let set: Option<String> = redis::cmd("SET")
                    .arg(format!("{raw}:{}", fresh("nx", n)))
                    .arg(r#"{"points":25}"#)
                    .arg("NX")
                    .arg("PX")
                    .arg(30_000)
                    .query_async(&mut manager)
                    .await
                    .expect("SET NX PX");
                std::hint::black_box(set);
            }
        })
    });
    bench(&mut group, &rt, "raw/get", 1, {
        let (manager, raw) = (manager.clone(), raw.clone());
        op(move |n| {
            let (mut manager, raw) = (manager.clone(), raw.clone());
            async move {
                let got: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(format!("{raw}:{}", fresh("nx", n % REPLAY_KEYS)))
                    .query_async(&mut manager)
                    .await
                    .expect("GET");
                std::hint::black_box(got);
            }
        })
    });

    // The peer's Valkey / Redis store.
    let peer_prefix = idem_benches::unique_name("idem_bench_peer");
    let peer_store = rt.block_on(async {
        let client = redis::Client::open(servers::redis_url().as_str()).expect("the Redis URL");
        idempotent::store::valkey::ValkeyStore::with_prefix(client, Some(&peer_prefix)).await
    });
    match peer_store {
        Ok(peer_store) => peer_ops(&mut group, &rt, Arc::new(peer_store)),
        Err(error) => eprintln!("SKIPPED: the peer's Valkey store: {error}"),
    }
    group.finish();
    rt.block_on(async {
        let mut manager = manager;
        delete_keys(&mut manager, &format!("{prefix}:*")).await;
        delete_keys(&mut manager, &format!("{peer_prefix}-*")).await;
    });
}

criterion_group!(benches, memory, sqlite, postgres, mysql, redis_store);
criterion_main!(benches);
