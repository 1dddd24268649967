//! The store conformance suite against MySQL / MariaDB, and the checks only it needs:
//! concurrent migrations, table names, byte-exact keys, claims racing over many connections,
//! and records edited by hand.
//!
//! Every test works on a table of its own, dropped when the test ends. Without a server at
//! `IDEM_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/test`) the tests are skipped, unless
//! `IDEM_REQUIRE_SERVERS=1`.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::clock::ManualClock;
use idem_runtime::mysql::{DEFAULT_TABLE, MySqlStore};
use idem_runtime::testing::START_MILLIS;
use idem_runtime::{Claim, Error, Fingerprint, RecordKey, Store};
use idem_tests::Guarded;
use idem_tests::checks::{self, LEASE, STORED, TTL, assert_decode_error};
use idem_tests::servers;
use idem_tests::sql_servers::{
    DropTable, Server, mysql_pool, mysql_store, mysql_store_as_on_mysql,
};
use sqlx::AssertSqlSafe;
use tokio::sync::Barrier;

mod conformance {
    use idem_runtime::clock::ManualClock;
    use idem_tests::sql_servers::{mysql_pool, mysql_store};

    idem_runtime::conformance_tests!(optional |clock: ManualClock| async move {
        Some(mysql_store(mysql_pool().await?, clock).await)
    });
}

/// The suite again with MariaDB's `SIMULTANEOUS_ASSIGNMENT` mode, in which the assignments of
/// an `ON DUPLICATE KEY UPDATE` all read the old row instead of the columns assigned before
/// them. Skipped (saying so) on servers without that mode (MySQL).
mod conformance_simultaneous_assignment {
    use idem_runtime::clock::ManualClock;
    use idem_tests::sql_servers::mysql_store;

    idem_runtime::conformance_tests!(optional |clock: ManualClock| async move {
        Some(mysql_store(super::simultaneous_assignment_pool().await?, clock).await)
    });
}

/// The suite with claims as MySQL runs them, without `INSERT … RETURNING` (MariaDB takes it,
/// MySQL does not): a claim that changed nothing is followed by a locking read.
mod conformance_as_on_mysql {
    use idem_runtime::clock::ManualClock;
    use idem_tests::sql_servers::{mysql_pool, mysql_store_as_on_mysql};

    idem_runtime::conformance_tests!(optional |clock: ManualClock| async move {
        Some(mysql_store_as_on_mysql(mysql_pool().await?, clock).await)
    });
}

/// Both: `SIMULTANEOUS_ASSIGNMENT` and claims as on MySQL.
mod conformance_simultaneous_assignment_as_on_mysql {
    use idem_runtime::clock::ManualClock;
    use idem_tests::sql_servers::mysql_store_as_on_mysql;

    idem_runtime::conformance_tests!(optional |clock: ManualClock| async move {
        Some(mysql_store_as_on_mysql(super::simultaneous_assignment_pool().await?, clock).await)
    });
}

/// A pool whose connections run in `SIMULTANEOUS_ASSIGNMENT` mode, or `None` when the server
/// is unreachable or does not know the mode.
async fn simultaneous_assignment_pool() -> Option<sqlx::MySqlPool> {
    use sqlx::Executor;
    const SET_MODE: &str = "SET SESSION sql_mode = CONCAT(@@sql_mode, ',SIMULTANEOUS_ASSIGNMENT')";
    let probe = mysql_pool().await?;
    if let Err(error) = probe.execute(SET_MODE).await {
        eprintln!("SKIPPED: the server has no SIMULTANEOUS_ASSIGNMENT mode ({error})");
        return None;
    }
    probe.close().await;
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(idem_tests::sql_servers::POOL_SIZE)
        .after_connect(|connection, _| {
            Box::pin(async move {
                connection.execute(SET_MODE).await?;
                Ok(())
            })
        })
        .connect(&idem_tests::sql_servers::mysql_url())
        .await
        .expect("connect in SIMULTANEOUS_ASSIGNMENT mode");
    let mode: String = sqlx::query_scalar("SELECT @@SESSION.sql_mode")
        .fetch_one(&pool)
        .await
        .expect("read the session's sql_mode");
    assert!(mode.contains("SIMULTANEOUS_ASSIGNMENT"), "{mode}");
    Some(pool)
}

const SCOPE: &str = "stores::mysql";

fn key(name: &str) -> RecordKey {
    RecordKey::new(SCOPE, name).expect("a non-empty key is valid")
}

/// A key of `store` completed with [`STORED`].
async fn completed_key(
    store: &MySqlStore,
    name: &str,
    fingerprint: Option<&Fingerprint>,
) -> RecordKey {
    let key = key(name);
    checks::complete_key(store, &key, fingerprint).await;
    key
}

/// Runs `set` (an assignment) on the record of `key`, by hand.
async fn tamper(store: &MySqlStore, key: &RecordKey, set: &str) {
    let statement = format!(
        "UPDATE {} SET {set} WHERE scope = ? AND business_key = ?",
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
    let Some(pool) = mysql_pool().await else {
        return;
    };
    let store = MySqlStore::new(pool);
    assert_eq!(store.table(), DEFAULT_TABLE);
    let too_long = "t".repeat(64);
    for bad in [
        "",
        "1x",
        "idem; DROP TABLE idem_records",
        "a.b",
        "`q`",
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

/// `migrate` runs twice on one table, and 8 tasks migrating a new table at once all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_runs_twice_and_from_8_tasks_at_once() {
    let Some(pool) = mysql_pool().await else {
        return;
    };
    let store = mysql_store(pool.clone(), ManualClock::new(START_MILLIS)).await;
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
            server: Server::Mysql,
            table: table.clone(),
        };
        let start = Arc::new(Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (pool, table, start) = (pool.clone(), table.clone(), start.clone());
                tokio::spawn(async move {
                    let store = MySqlStore::new(pool)
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
        let mut indexes: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT CAST(index_name AS CHAR) FROM information_schema.statistics
             WHERE table_schema = DATABASE() AND table_name = ?",
        )
        .bind(&table)
        .fetch_all(&pool)
        .await
        .expect("read the indexes");
        indexes.sort();
        assert_eq!(
            indexes,
            [("PRIMARY".to_owned(),), (format!("{table}_expires_at"),)],
            "8 concurrent migrations create the table, its key and its index once"
        );
        let key = completed_key(&stores[3], "after-concurrent-migrations", None).await;
        assert_eq!(
            stores[7].claim(&key, None, LEASE).await.expect("claim"),
            Claim::Completed(STORED.to_vec()),
        );
    }
}

/// Keys differing only in case, accents or trailing spaces are different keys: the columns
/// compare bytes, not collation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_compare_byte_for_byte() {
    let Some(pool) = mysql_pool().await else {
        return;
    };
    let store = mysql_store(pool, ManualClock::new(START_MILLIS)).await;
    let names = ["a-1", "A-1", "a-1 ", "á-1", "a-1\t", "ß", "ss"];
    for name in names {
        let Claim::Acquired(lease) = store.claim(&key(name), None, LEASE).await.expect("claim")
        else {
            panic!("{name:?} collided with an earlier key");
        };
        store
            .complete(&key(name), &lease, name.as_bytes(), TTL)
            .await
            .expect("complete");
    }
    for name in names {
        assert_eq!(
            store.claim(&key(name), None, LEASE).await.expect("claim"),
            Claim::Completed(name.as_bytes().to_vec()),
            "{name:?} replays its own result"
        );
    }
}

/// 64 claimers of one key at once over 8 pools of 16 connections (as 8 processes would):
/// exactly one acquires, and no deadlock reaches the caller. The conformance suite races them
/// over one pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claimers_on_8_pools_acquire_once() {
    let Some(pool) = mysql_pool().await else {
        return;
    };
    let shared = mysql_store(pool, ManualClock::new(START_MILLIS)).await;
    let mut stores = Vec::new();
    for _ in 0..8 {
        let Some(own) = mysql_pool().await else {
            return;
        };
        stores.push(Arc::new(
            MySqlStore::new(own)
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
    let Some(pool) = mysql_pool().await else {
        return;
    };
    let clock = ManualClock::new(START_MILLIS);
    let first = mysql_store(pool, clock.clone()).await;
    let done = completed_key(&first.store, "done", None).await;
    let busy = key("busy");
    let Claim::Acquired(lease) = first.claim(&busy, None, LEASE).await.expect("claim") else {
        panic!("a new key is acquired");
    };
    let Some(other) = mysql_pool().await else {
        return;
    };
    let second = MySqlStore::new(other)
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
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy("mysql://root@127.0.0.1:1/test")
        .expect("a well-formed URL");
    let store = MySqlStore::new(pool);
    match store.claim(&key("nowhere"), None, LEASE).await {
        Err(Error::Store(error)) => assert_eq!(error.backend(), "mysql"),
        other => panic!("expected Err(Store), got {other:?}"),
    }
}

/// The store hands stored bytes back as they are; decoding them is the handler's job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_result_is_replayed_raw_and_fails_to_decode_in_run() {
    let Some(pool) = mysql_pool().await else {
        return;
    };
    let store = mysql_store(pool, ManualClock::new(START_MILLIS)).await;
    let key = completed_key(&store.store, "garbage-result", None).await;
    tamper(&store.store, &key, "result = x'ff00'").await;
    checks::garbage_result_fails_to_decode_in_run(&store, &key, &[0xff, 0x00]).await;
}

/// Values no claim writes, put there by hand, are decode errors naming the column, on both
/// claim paths (with `INSERT … RETURNING` and as on MySQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hand_edited_records_are_decode_errors() {
    let Some(pool) = mysql_pool().await else {
        return;
    };
    for store in [
        mysql_store(pool.clone(), ManualClock::new(START_MILLIS)).await,
        mysql_store_as_on_mysql(pool, ManualClock::new(START_MILLIS)).await,
    ] {
        hand_edited_records_in(store).await;
    }
}

async fn hand_edited_records_in(store: Guarded<MySqlStore>) {
    let fingerprint = Fingerprint::of("payload").expect("a string serializes");

    let seven = completed_key(&store.store, "completed-7", None).await;
    tamper(&store.store, &seven, "completed = 7").await;
    assert_decode_error(store.claim(&seven, None, LEASE).await, &seven, "completed");

    let no_result = completed_key(&store.store, "no-result", None).await;
    tamper(&store.store, &no_result, "result = NULL").await;
    assert_decode_error(
        store.claim(&no_result, None, LEASE).await,
        &no_result,
        "no result",
    );

    let short = completed_key(&store.store, "short-fingerprint", Some(&fingerprint)).await;
    tamper(&store.store, &short, "fingerprint = x'01'").await;
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
        let held = key(&format!("fence{fence}"));
        let Claim::Acquired(_) = store.claim(&held, None, LEASE).await.expect("claim") else {
            panic!("a new key is acquired");
        };
        tamper(&store.store, &held, &format!("fence = {fence}")).await;
        // An in-progress record whose fence was edited: the claim reads it back.
        match store.claim(&held, None, LEASE).await {
            Ok(Claim::InProgress { .. }) | Err(Error::Decode { .. }) => {}
            other => panic!("fence {fence}: {other:?}"),
        }
    }
}

/// The background sweeper purges expired records in bounded batches and leaves live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sweeper_works_off_a_backlog() {
    let Some(pool) = mysql_pool().await else {
        return;
    };
    let clock = ManualClock::new(START_MILLIS);
    let store = Arc::new(mysql_store(pool, clock.clone()).await);
    idem_tests::sweeping::sweeper_works_off_a_backlog(store, clock).await;
}

/// A fence at `i64::MAX` cannot rise: the takeover fails as a record that does not decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fence_at_its_maximum_is_a_decode_error() {
    let Some(pool) = mysql_pool().await else {
        return;
    };
    for as_on_mysql in [false, true] {
        let clock = ManualClock::new(START_MILLIS);
        let store = if as_on_mysql {
            mysql_store_as_on_mysql(pool.clone(), clock.clone()).await
        } else {
            mysql_store(pool.clone(), clock.clone()).await
        };
        let key = key("max-fence");
        let Claim::Acquired(_) = store.claim(&key, None, LEASE).await.expect("claim") else {
            panic!("a new key is acquired");
        };
        tamper(&store.store, &key, "fence = 9223372036854775807").await;
        clock.advance(LEASE);
        assert_decode_error(store.claim(&key, None, LEASE).await, &key, "fence");
    }
}

/// A 63-byte table name, the longest there is, gets its table and its expiry index (MySQL
/// refuses index names over 64 bytes, so `<table>_expires_at` cannot be used as is).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn longest_table_names_get_their_own_expiry_index() {
    let Some(pool) = mysql_pool().await else {
        return;
    };
    let base = servers::unique_name("idem_long");
    let table = format!("{base}{}", "x".repeat(63 - base.len()));
    let _drop = DropTable {
        server: Server::Mysql,
        table: table.clone(),
    };
    let store = MySqlStore::new(pool.clone())
        .with_table(&table)
        .expect("63 bytes is a valid name");
    store.migrate().await.expect("migrate");
    store.migrate().await.expect("migrate again");
    let indexes: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT CAST(index_name AS CHAR) FROM information_schema.statistics
         WHERE table_schema = DATABASE() AND table_name = ?",
    )
    .bind(&table)
    .fetch_all(&pool)
    .await
    .expect("read the indexes");
    assert_eq!(
        indexes.len(),
        2,
        "the key and the expiry index: {indexes:?}"
    );
}
