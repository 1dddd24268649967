//! The store conformance suite against PostgreSQL, and the checks only PostgreSQL needs:
//! concurrent migrations, table names, the one-statement claim under concurrency on a pool of
//! connections, and records edited by hand.
//!
//! Every test works on a table of its own, dropped when the test ends. Without a server at
//! `IDEM_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`) the tests are
//! skipped, unless `IDEM_REQUIRE_SERVERS=1`.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::clock::ManualClock;
use idem_runtime::postgres::{DEFAULT_TABLE, PostgresStore};
use idem_runtime::testing::START_MILLIS;
use idem_runtime::{Claim, Error, Fingerprint, RecordKey, Store};
use idem_tests::checks::{self, LEASE, STORED, TTL, assert_decode_error};
use idem_tests::servers;
use idem_tests::sql_servers::{DropTable, Server, postgres_pool, postgres_store};
use sqlx::AssertSqlSafe;
use tokio::sync::Barrier;

mod conformance {
    use idem_runtime::clock::ManualClock;
    use idem_tests::sql_servers::{postgres_pool, postgres_store};

    idem_runtime::conformance_tests!(optional |clock: ManualClock| async move {
        Some(postgres_store(postgres_pool().await?, clock).await)
    });
}

const SCOPE: &str = "stores::postgres";

fn key(name: &str) -> RecordKey {
    RecordKey::new(SCOPE, name).expect("a non-empty key is valid")
}

/// A key of `store` completed with [`STORED`].
async fn completed_key(
    store: &PostgresStore,
    name: &str,
    fingerprint: Option<&Fingerprint>,
) -> RecordKey {
    let key = key(name);
    checks::complete_key(store, &key, fingerprint).await;
    key
}

/// Runs `set` (an assignment) on the record of `key`, by hand.
async fn tamper(store: &PostgresStore, key: &RecordKey, set: &str) {
    let statement = format!(
        "UPDATE {} SET {set} WHERE scope = $1 AND business_key = $2",
        store.table()
    );
    let done = sqlx::query(AssertSqlSafe(statement.clone()))
        .bind(key.scope())
        .bind(key.key())
        .execute(store.pool())
        .await
        .unwrap_or_else(|error| panic!("{statement}: {error}"));
    assert_eq!(done.rows_affected(), 1, "{statement} changed no row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn table_names_that_are_not_plain_identifiers_are_rejected() {
    let Some(pool) = postgres_pool().await else {
        return;
    };
    let store = PostgresStore::new(pool);
    assert_eq!(store.table(), DEFAULT_TABLE);
    let too_long = "t".repeat(64);
    for bad in [
        "",
        "1x",
        "idem; DROP TABLE idem_records",
        "a.b",
        "\"q\"",
        "tablé",
        "a b",
        too_long.as_str(),
    ] {
        let rejected = store.clone().with_table(bad);
        assert!(
            matches!(
                rejected,
                Err(Error::InvalidName {
                    what: "table name",
                    ..
                })
            ),
            "{bad:?} was accepted"
        );
    }
}

/// `migrate` runs twice on one table, and 8 tasks migrating a new table at once all succeed
/// (a bare `CREATE TABLE IF NOT EXISTS` fails with a unique violation in that race).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_runs_twice_and_from_8_tasks_at_once() {
    let Some(pool) = postgres_pool().await else {
        return;
    };
    let store = postgres_store(pool.clone(), ManualClock::new(START_MILLIS)).await;
    store.store.migrate().await.expect("the second migrate");
    let key = completed_key(&store.store, "after-two-migrations", None).await;
    store.store.migrate().await.expect("a migrate over records");
    assert_eq!(
        store.claim(&key, None, LEASE).await.expect("claim"),
        Claim::Completed(STORED.to_vec()),
        "a migrate keeps the records"
    );

    for round in 0..2 {
        let table = servers::unique_name("idem_migrate");
        let _drop = DropTable {
            server: Server::Postgres,
            table: table.clone(),
        };
        let start = Arc::new(Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (pool, table, start) = (pool.clone(), table.clone(), start.clone());
                tokio::spawn(async move {
                    let store = PostgresStore::new(pool)
                        .with_table(&table)
                        .expect("a plain name");
                    start.wait().await;
                    store.migrate().await.unwrap_or_else(|error| {
                        panic!("round {round}, task {i}: migrate: {error}")
                    });
                    store
                })
            })
            .collect();
        let mut stores = Vec::new();
        for task in tasks {
            stores.push(task.await.expect("a migrating task panicked"));
        }
        let indexes: Vec<(String,)> = sqlx::query_as(
            "SELECT indexname::TEXT FROM pg_indexes WHERE tablename = $1 ORDER BY indexname",
        )
        .bind(&table)
        .fetch_all(&pool)
        .await
        .expect("read the indexes");
        assert_eq!(
            indexes,
            [(format!("{table}_expires_at"),), (format!("{table}_pkey"),)],
            "8 concurrent migrations create the table, its key and its index once"
        );
        let key = completed_key(&stores[3], "after-concurrent-migrations", None).await;
        assert_eq!(
            stores[7].claim(&key, None, LEASE).await.expect("claim"),
            Claim::Completed(STORED.to_vec()),
        );
    }
}

/// 64 claimers of one key at once over 8 pools of 16 connections (as 8 processes would):
/// exactly one acquires. The conformance suite races them over one pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claimers_on_8_pools_acquire_once() {
    let Some(pool) = postgres_pool().await else {
        return;
    };
    let shared = postgres_store(pool, ManualClock::new(START_MILLIS)).await;
    let mut stores = Vec::new();
    for _ in 0..8 {
        let Some(own) = postgres_pool().await else {
            return;
        };
        stores.push(Arc::new(
            PostgresStore::new(own)
                .with_table(shared.store.table())
                .expect("a plain name")
                .with_clock(ManualClock::new(START_MILLIS)),
        ));
    }
    checks::one_of_64_claimers_acquires(&stores).await;
}

/// Records outlive the pool that wrote them: a new pool (a restarted process) replays the
/// completed ones and sees the held ones in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_survive_a_new_pool() {
    let Some(pool) = postgres_pool().await else {
        return;
    };
    let clock = ManualClock::new(START_MILLIS);
    let first = postgres_store(pool, clock.clone()).await;
    let done = completed_key(&first.store, "done", None).await;
    let busy = key("busy");
    let Claim::Acquired(lease) = first.claim(&busy, None, LEASE).await.expect("claim") else {
        panic!("a new key is acquired");
    };
    let Some(other) = postgres_pool().await else {
        return;
    };
    let second = PostgresStore::new(other)
        .with_table(first.store.table())
        .expect("a plain name")
        .with_clock(clock);
    first.store.pool().close().await;
    assert_eq!(
        second.claim(&done, None, LEASE).await.expect("claim"),
        Claim::Completed(STORED.to_vec())
    );
    assert_eq!(
        second.claim(&busy, None, LEASE).await.expect("claim"),
        Claim::InProgress { retry_after: LEASE }
    );
    second
        .complete(&busy, &lease, b"1", TTL)
        .await
        .expect("the holder completes through the new pool");
}

/// A server that does not answer is a store error, not a panic or a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_server_is_a_store_error() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .expect("a well-formed URL");
    let store = PostgresStore::new(pool);
    match store.claim(&key("nowhere"), None, LEASE).await {
        Err(Error::Store(error)) => assert_eq!(error.backend(), "postgres"),
        other => panic!("expected Err(Store), got {other:?}"),
    }
}

/// The store hands stored bytes back as they are; decoding them is the handler's job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_result_is_replayed_raw_and_fails_to_decode_in_run() {
    let Some(pool) = postgres_pool().await else {
        return;
    };
    let store = postgres_store(pool, ManualClock::new(START_MILLIS)).await;
    let key = completed_key(&store.store, "garbage-result", None).await;
    tamper(&store.store, &key, r"result = '\xff00'::BYTEA").await;
    checks::garbage_result_fails_to_decode_in_run(&store, &key, &[0xff, 0x00]).await;
}

/// Values no claim writes, put there by hand, are decode errors naming the column.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hand_edited_records_are_decode_errors() {
    let Some(pool) = postgres_pool().await else {
        return;
    };
    let store = postgres_store(pool, ManualClock::new(START_MILLIS)).await;
    let fingerprint = Fingerprint::of("payload").expect("a string serializes");

    let no_result = completed_key(&store.store, "no-result", None).await;
    tamper(&store.store, &no_result, "result = NULL").await;
    assert_decode_error(
        store.claim(&no_result, None, LEASE).await,
        &no_result,
        "no result",
    );

    let short = completed_key(&store.store, "short-fingerprint", Some(&fingerprint)).await;
    tamper(&store.store, &short, r"fingerprint = '\x01'::BYTEA").await;
    assert_decode_error(
        store.claim(&short, Some(&fingerprint), LEASE).await,
        &short,
        "fingerprint",
    );
    assert_eq!(
        store.claim(&short, None, LEASE).await.expect("claim"),
        Claim::Completed(STORED.to_vec()),
        "a claim without a fingerprint does not read the stored one"
    );

    for fence in ["0", "-5"] {
        let name = format!("fence{fence}");
        let held = key(&name);
        let Claim::Acquired(_) = store.claim(&held, None, LEASE).await.expect("claim") else {
            panic!("a new key is acquired");
        };
        tamper(&store.store, &held, &format!("fence = {fence}")).await;
        assert_decode_error(store.claim(&held, None, LEASE).await, &held, "fence");
    }
}

/// The statements go to the table the store was built with, and two tables are two key
/// spaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tables_are_separate_key_spaces() {
    let Some(pool) = postgres_pool().await else {
        return;
    };
    let clock = ManualClock::new(START_MILLIS);
    let one = postgres_store(pool.clone(), clock.clone()).await;
    let two = postgres_store(pool, clock).await;
    let key = completed_key(&one.store, "k", None).await;
    assert!(matches!(
        two.claim(&key, None, LEASE).await,
        Ok(Claim::Acquired(_))
    ));
    let rows: (i64,) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        one.store.table()
    )))
    .fetch_one(one.store.pool())
    .await
    .expect("count");
    assert_eq!(rows.0, 1);
}

/// The background sweeper purges expired records in bounded batches and leaves live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sweeper_works_off_a_backlog() {
    let Some(pool) = postgres_pool().await else {
        return;
    };
    let clock = ManualClock::new(START_MILLIS);
    let store = Arc::new(postgres_store(pool, clock.clone()).await);
    idem_tests::sweeping::sweeper_works_off_a_backlog(store, clock).await;
}
