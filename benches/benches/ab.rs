//! The wrapper's overhead as ratios measured **interleaved**: in each round, every variant of
//! the same work runs a batch of operations back to back, in a rotating order, so that a
//! slow spell of the machine (a disk flush, another process's build) falls on all of them
//! alike. Criterion measures one benchmark after another, so on the durable databases, whose
//! commits wait for the disk, its ratios between variants can swing with the moment each was
//! measured; these cannot. For each store and for new keys and replays it prints the median
//! time per operation of each variant over the rounds, and the median of the per-round ratios.
//!
//! Variants: `idem` (the `#[idempotent]` handler), `store_api` (the store's `claim` and
//! `complete` without the macro), `hand` (idem's statements on sqlx / redis by hand), `raw`
//! (the primitive alone: a new key is `INSERT … ON CONFLICT DO NOTHING` / `INSERT IGNORE`
//! then a plain `UPDATE`, or `SET NX PX`; a replay is a `SELECT` by key, or `GET`), and for
//! replays `idem_cached` (the handler over `CachedStore`, the opt-in in-process result cache,
//! in front of the store).
//!
//! Run with `cargo bench -p idem-benches --bench ab` (`IDEM_AB_ROUNDS` sets the rounds, 15 by
//! default). A server that does not answer is left out with a `SKIPPED` line.

use std::future::Future;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use idem_benches::hand_memory::HandMemory;
use idem_benches::hand_redis::HandRedis;
use idem_benches::hand_sql::HandSql;
use idem_benches::{LEASE, Paid, Receipt, SCOPE, TTL, credit, servers};
use idem_runtime::cache::CachedStore;
use idem_runtime::{Claim, MemoryStore, RecordKey, Store};
use sqlx::AssertSqlSafe;

type Op = Arc<dyn Fn(u64) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

fn op<F, Fut>(f: F) -> Op
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |n| Box::pin(f(n)))
}

static RUN: LazyLock<String> = LazyLock::new(|| idem_benches::unique_name("ab"));
static NEXT: AtomicU64 = AtomicU64::new(0);
const REPLAY_KEYS: u64 = 256;

fn fresh(n: u64) -> String {
    format!("{}-{n}", *RUN)
}

fn replay_key(n: u64) -> String {
    format!("{}-replay-{}", *RUN, n % REPLAY_KEYS)
}

fn cached_key(n: u64) -> String {
    format!("{}-cached-{}", *RUN, n % REPLAY_KEYS)
}

/// The handler's replay over the in-process result cache (`CachedStore`) in front of `store`,
/// whose keys are completed through the cache first, so that it holds their results.
async fn cached_replay<S: Store + 'static>(store: Arc<S>) -> (&'static str, Op) {
    let cached = Arc::new(CachedStore::new(
        store,
        NonZeroUsize::new(4 * REPLAY_KEYS as usize).expect("not 0"),
    ));
    for n in 0..REPLAY_KEYS {
        credit(&*cached, 16, Paid::new(cached_key(n)))
            .await
            .expect("complete a replay key through the cache");
    }
    let replay = op(move |n| {
        let cached = cached.clone();
        async move {
            std::hint::black_box(
                credit(&*cached, 16, Paid::new(cached_key(n)))
                    .await
                    .expect("a replay through the cache"),
            );
        }
    });
    ("idem_cached", replay)
}

/// Runs the variants interleaved and prints one table row per variant.
async fn compare(store: &str, work: &str, batch: u64, variants: &[(&str, Op)]) {
    let rounds: usize = std::env::var("IDEM_AB_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(15);
    // Warm-up: a batch of each.
    for (_, op) in variants {
        for _ in 0..batch {
            op(NEXT.fetch_add(1, Ordering::Relaxed)).await;
        }
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for round in 0..rounds {
        for i in 0..variants.len() {
            let at = (i + round) % variants.len();
            let op = &variants[at].1;
            let start = Instant::now();
            for _ in 0..batch {
                op(NEXT.fetch_add(1, Ordering::Relaxed)).await;
            }
            times[at].push(start.elapsed().as_secs_f64() / batch as f64);
        }
    }
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let base = variants
        .iter()
        .position(|(name, _)| *name == "hand")
        .expect("a hand-written variant");
    let idem = variants
        .iter()
        .position(|(name, _)| *name == "idem")
        .expect("an idem variant");
    for (i, (name, _)) in variants.iter().enumerate() {
        let per_op = median(times[i].clone());
        let vs_hand = median(
            times[i]
                .iter()
                .zip(&times[base])
                .map(|(a, b)| a / b)
                .collect(),
        );
        let idem_vs = median(
            times[idem]
                .iter()
                .zip(&times[i])
                .map(|(a, b)| a / b)
                .collect(),
        );
        println!(
            "| {store} | {work} | {name} | {} | {:.0} | {vs_hand:.2}× | {idem_vs:.2}× |",
            show(per_op),
            1.0 / per_op
        );
    }
}

fn show(seconds: f64) -> String {
    if seconds >= 1e-3 {
        format!("{:.2} ms", seconds * 1e3)
    } else if seconds >= 1e-6 {
        format!("{:.1} µs", seconds * 1e6)
    } else {
        format!("{:.0} ns", seconds * 1e9)
    }
}

/// The handler and the store API, named.
type Pair = [(&'static str, Op); 2];

/// The handler and the store API on `store`: (new key ops, replay ops).
fn idem_ops<S: Store + 'static>(store: Arc<S>) -> (Pair, Pair) {
    let handler_new = {
        let store = store.clone();
        op(move |n| {
            let store = store.clone();
            async move {
                credit(&*store, 16, Paid::new(fresh(n)))
                    .await
                    .expect("a new key through the handler");
            }
        })
    };
    let api_new = {
        let store = store.clone();
        op(move |n| {
            let store = store.clone();
            async move {
                let msg = Paid::new(fresh(n));
                let key = RecordKey::new(SCOPE, &msg.order_no).expect("a valid key");
                let Claim::Acquired(lease) = store.claim(&key, None, LEASE).await.expect("claim")
                else {
                    panic!("a new key is acquired");
                };
                let stored = serde_json::to_vec(&Receipt::for_message(&msg, 16))
                    .expect("a receipt serializes");
                store
                    .complete(&key, &lease, &stored, TTL)
                    .await
                    .expect("complete");
            }
        })
    };
    let handler_replay = {
        let store = store.clone();
        op(move |n| {
            let store = store.clone();
            async move {
                std::hint::black_box(
                    credit(&*store, 16, Paid::new(replay_key(n)))
                        .await
                        .expect("a replay"),
                );
            }
        })
    };
    let api_replay = {
        let store = store.clone();
        op(move |n| {
            let store = store.clone();
            async move {
                let key = RecordKey::new(SCOPE, &replay_key(n)).expect("a valid key");
                let Claim::Completed(stored) = store.claim(&key, None, LEASE).await.expect("claim")
                else {
                    panic!("a completed key replays");
                };
                let receipt: Receipt = serde_json::from_slice(&stored).expect("a receipt");
                std::hint::black_box(receipt);
            }
        })
    };
    (
        [("idem", handler_new), ("store_api", api_new)],
        [("idem", handler_replay), ("store_api", api_replay)],
    )
}

async fn seed<S: Store>(store: &S) {
    for n in 0..REPLAY_KEYS {
        credit(store, 16, Paid::new(replay_key(n)))
            .await
            .expect("complete a replay key");
    }
}

/// Raw SQL ops: a new key (insert then update) and a replay (select), on table `raw`.
fn raw_sql_ops<DB>(pool: sqlx::Pool<DB>, insert: String, update: String, select: String) -> (Op, Op)
where
    DB: sqlx::Database,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    let (insert, update, select): (Arc<str>, Arc<str>, Arc<str>) =
        (insert.into(), update.into(), select.into());
    let new_key = {
        let pool = pool.clone();
        op(move |n| {
            let (pool, insert, update) = (pool.clone(), insert.clone(), update.clone());
            async move {
                for statement in [insert, update] {
                    sqlx::query::<DB>(AssertSqlSafe(statement))
                        .bind(fresh(n))
                        .bind(&br#"{"points":25}"#[..])
                        .execute(&pool)
                        .await
                        .expect("a raw statement");
                }
            }
        })
    };
    let replay = op(move |n| {
        let (pool, select) = (pool.clone(), select.clone());
        async move {
            sqlx::query::<DB>(AssertSqlSafe(select))
                .bind(fresh(n % REPLAY_KEYS))
                .bind(&br#"{"points":25}"#[..])
                .execute(&pool)
                .await
                .expect("a raw select");
        }
    });
    (new_key, replay)
}

async fn memory() {
    let store = Arc::new(MemoryStore::new());
    seed(&*store).await;
    let hand = Arc::new(HandMemory::default());
    for n in 0..REPLAY_KEYS {
        hand.new_key(replay_key(n), 16);
    }
    let cached = cached_replay(store.clone()).await;
    let ([idem_new, api_new], [idem_replay, api_replay]) = idem_ops(store);
    let hand_new = {
        let hand = hand.clone();
        op(move |n| {
            let hand = hand.clone();
            async move {
                std::hint::black_box(hand.new_key(fresh(n), 16));
            }
        })
    };
    let hand_replay = op(move |n| {
        let hand = hand.clone();
        async move {
            std::hint::black_box(hand.replay(&replay_key(n)));
        }
    });
    compare(
        "memory",
        "new key",
        2000,
        &[idem_new, api_new, ("hand", hand_new)],
    )
    .await;
    compare(
        "memory",
        "replay",
        2000,
        &[idem_replay, api_replay, ("hand", hand_replay), cached],
    )
    .await;
}

macro_rules! sql_store {
    ($fn:ident, $label:literal, $server:literal, $db:ty, $store:ty, $url:expr, $raw:expr) => {
        async fn $fn() {
            let url = $url;
            let Some(pool) = servers::pool::<$db>($server, &url, true).await else {
                return;
            };
            let table = idem_benches::unique_name("idem_ab");
            let raw = idem_benches::unique_name("idem_ab_raw");
            let store = <$store>::new(pool.clone())
                .with_table(&table)
                .expect("a valid table name");
            store.migrate().await.expect("create the table");
            let (create, insert, update, select): (String, String, String, String) = ($raw)(&raw);
            sqlx::raw_sql(AssertSqlSafe(create))
                .execute(&pool)
                .await
                .expect("create the raw table");
            for n in 0..REPLAY_KEYS {
                let seed = insert.clone();
                sqlx::query::<$db>(AssertSqlSafe(seed))
                    .bind(fresh(n))
                    .bind(&b"{}"[..])
                    .execute(&pool)
                    .await
                    .expect("seed the raw table");
            }
            seed(&store).await;
            let hand = Arc::new(HandSql::<$db>::new(pool.clone(), &table));
            let store = Arc::new(store);
            let cached = cached_replay(store.clone()).await;
            let ([idem_new, api_new], [idem_replay, api_replay]) = idem_ops(store);
            let hand_new = {
                let hand = hand.clone();
                op(move |n| {
                    let hand = hand.clone();
                    async move {
                        std::hint::black_box(hand.new_key(fresh(n), 16).await.expect("by hand"));
                    }
                })
            };
            let hand_replay = op(move |n| {
                let hand = hand.clone();
                async move {
                    std::hint::black_box(hand.replay(&replay_key(n)).await.expect("by hand"));
                }
            });
            let (raw_new, raw_replay) = raw_sql_ops(pool.clone(), insert, update, select);
            compare(
                $label,
                "new key",
                100,
                &[idem_new, api_new, ("hand", hand_new), ("raw", raw_new)],
            )
            .await;
            compare(
                $label,
                "replay",
                100,
                &[
                    idem_replay,
                    api_replay,
                    ("hand", hand_replay),
                    ("raw", raw_replay),
                    cached,
                ],
            )
            .await;
            for table in [table, raw] {
                let _ = sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
                    .execute(&pool)
                    .await;
            }
            pool.close().await;
        }
    };
}

sql_store!(
    postgres,
    "postgres",
    "PostgreSQL",
    sqlx::Postgres,
    idem_runtime::postgres::PostgresStore,
    servers::postgres_url(),
    |raw: &str| (
        format!("CREATE TABLE {raw} (k TEXT PRIMARY KEY, v BYTEA)"),
        format!("INSERT INTO {raw} (k, v) VALUES ($1, $2) ON CONFLICT DO NOTHING"),
        format!("UPDATE {raw} SET v = $2 WHERE k = $1"),
        format!("SELECT v FROM {raw} WHERE k = $1 AND $2::BYTEA IS NOT NULL"),
    )
);

sql_store!(
    mysql,
    "mysql",
    "MariaDB",
    sqlx::MySql,
    idem_runtime::mysql::MySqlStore,
    servers::mysql_url(),
    |raw: &str| (
        format!("CREATE TABLE {raw} (k VARBINARY(255) PRIMARY KEY, v LONGBLOB) ENGINE = InnoDB"),
        format!("INSERT IGNORE INTO {raw} (k, v) VALUES (?, ?)"),
        format!("UPDATE {raw} SET v = ? WHERE k = ?"),
        format!("SELECT v FROM {raw} WHERE k = ? AND ? IS NOT NULL"),
    )
);

async fn sqlite() {
    let path = std::env::temp_dir().join(format!("{}.db", idem_benches::unique_name("idem_ab")));
    let url = format!("sqlite://{}", path.display());
    let store = idem_runtime::sqlite::SqliteStore::connect(&url)
        .await
        .expect("open the SQLite file");
    store.migrate().await.expect("create the table");
    let pool = store.pool().clone();
    sqlx::raw_sql("CREATE TABLE raw (k TEXT PRIMARY KEY, v BLOB)")
        .execute(&pool)
        .await
        .expect("create the raw table");
    for n in 0..REPLAY_KEYS {
        sqlx::query("INSERT INTO raw (k, v) VALUES (?1, ?2)")
            .bind(fresh(n))
            .bind(&b"{}"[..])
            .execute(&pool)
            .await
            .expect("seed the raw table");
    }
    seed(&store).await;
    let hand = Arc::new(HandSql::<sqlx::Sqlite>::new(pool.clone(), store.table()));
    let store = Arc::new(store);
    let cached = cached_replay(store.clone()).await;
    let ([idem_new, api_new], [idem_replay, api_replay]) = idem_ops(store);
    let hand_new = {
        let hand = hand.clone();
        op(move |n| {
            let hand = hand.clone();
            async move {
                std::hint::black_box(hand.new_key(fresh(n), 16).await.expect("by hand"));
            }
        })
    };
    let hand_replay = op(move |n| {
        let hand = hand.clone();
        async move {
            std::hint::black_box(hand.replay(&replay_key(n)).await.expect("by hand"));
        }
    });
    let (raw_new, raw_replay) = raw_sql_ops(
        pool.clone(),
        "INSERT INTO raw (k, v) VALUES (?1, ?2) ON CONFLICT DO NOTHING".into(),
        "UPDATE raw SET v = ?2 WHERE k = ?1".into(),
        "SELECT v FROM raw WHERE k = ?1 AND ?2 IS NOT NULL".into(),
    );
    compare(
        "sqlite",
        "new key",
        100,
        &[idem_new, api_new, ("hand", hand_new), ("raw", raw_new)],
    )
    .await;
    compare(
        "sqlite",
        "replay",
        200,
        &[
            idem_replay,
            api_replay,
            ("hand", hand_replay),
            ("raw", raw_replay),
            cached,
        ],
    )
    .await;
    pool.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}

async fn redis_store() {
    let Some(manager) = servers::redis().await else {
        return;
    };
    let prefix = idem_benches::unique_name("idem_ab");
    let store = idem_runtime::redis::RedisStore::new(manager.clone())
        .with_prefix(&prefix)
        .expect("a valid prefix");
    seed(&store).await;
    let hand = Arc::new(HandRedis::new(manager.clone(), &prefix));
    let store = Arc::new(store);
    let cached = cached_replay(store.clone()).await;
    let ([idem_new, api_new], [idem_replay, api_replay]) = idem_ops(store);
    let hand_new = {
        let hand = hand.clone();
        op(move |n| {
            let hand = hand.clone();
            async move {
                std::hint::black_box(hand.new_key(fresh(n), 16).await.expect("by hand"));
            }
        })
    };
    let hand_replay = op(move |n| {
        let hand = hand.clone();
        async move {
            std::hint::black_box(hand.replay(&replay_key(n)).await.expect("by hand"));
        }
    });
    let raw = format!("{prefix}:raw");
    let raw_new = {
        let (manager, raw) = (manager.clone(), raw.clone());
        op(move |n| {
            let (mut manager, raw) = (manager.clone(), raw.clone());
            async move {
                let set: Option<String> = redis::cmd("SET")
                    .arg(format!("{raw}:{}", fresh(n)))
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
    };
    let raw_replay = {
        let (manager, raw) = (manager.clone(), raw.clone());
        op(move |n| {
            let (mut manager, raw) = (manager.clone(), raw.clone());
            async move {
                let got: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(format!("{raw}:{}", fresh(n % REPLAY_KEYS)))
                    .query_async(&mut manager)
                    .await
                    .expect("GET");
                std::hint::black_box(got);
            }
        })
    };
    compare(
        "redis",
        "new key",
        500,
        &[idem_new, api_new, ("hand", hand_new), ("raw", raw_new)],
    )
    .await;
    compare(
        "redis",
        "replay",
        500,
        &[
            idem_replay,
            api_replay,
            ("hand", hand_replay),
            ("raw", raw_replay),
            cached,
        ],
    )
    .await;
    // The run's keys expire by themselves (leases and the ttl); delete them now.
    let mut manager = manager;
    let mut cursor: u64 = 0;
    loop {
        let scanned: redis::RedisResult<(u64, Vec<Vec<u8>>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut manager)
            .await;
        let Ok((next, keys)) = scanned else { break };
        if !keys.is_empty() {
            let _: redis::RedisResult<()> =
                redis::cmd("DEL").arg(keys).query_async(&mut manager).await;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

fn main() {
    // `cargo bench` passes `--bench`; this target takes no other arguments.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    println!(
        "| store | work | variant | time per op (median) | ops/s | / hand (median of rounds) | idem / this |"
    );
    println!("|---|---|---|---|---|---|---|");
    runtime.block_on(async {
        memory().await;
        sqlite().await;
        postgres().await;
        mysql().await;
        redis_store().await;
    });
    // Leave the runtime's tasks (the pools' reapers) a moment to stop.
    runtime.shutdown_timeout(Duration::from_secs(1));
}
