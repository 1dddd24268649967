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

/// A claim that finds the key completed or in progress writes nothing: no row lock, no
/// transaction id, so its commit has nothing to flush. (An `INSERT … ON CONFLICT DO UPDATE …
/// WHERE false` locks the row it skips and makes the replay a writing transaction.) Checked
/// in a transaction with `txid_current_if_assigned()`, which stays NULL until a statement
/// writes or locks; a new key and a takeover, which do write, are the contrast.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replays_and_held_keys_write_nothing() {
    use idem_runtime::tx::{TxClaim, TxStore};
    let Some(pool) = postgres_pool().await else {
        return;
    };
    let clock = ManualClock::new(START_MILLIS);
    let store = postgres_store(pool.clone(), clock.clone()).await;
    let fingerprint = Fingerprint::of("payload").expect("a string serializes");
    let done = completed_key(&store.store, "written-once", Some(&fingerprint)).await;
    let held = key("held-elsewhere");
    let Claim::Acquired(_) = store.claim(&held, None, LEASE).await.expect("claim") else {
        panic!("a new key is acquired");
    };

    // Claims inside a transaction, then whether it got a transaction id.
    let claim_and_see = |key: RecordKey, fingerprint: Option<Fingerprint>| {
        let (pool, store) = (pool.clone(), &store.store);
        async move {
            let mut tx = pool.begin().await.expect("begin");
            let claimed = store
                .claim_in(&mut tx, &key, fingerprint.as_ref(), LEASE)
                .await;
            let xid: Option<i64> = sqlx::query_scalar("SELECT txid_current_if_assigned()")
                .fetch_one(&mut *tx)
                .await
                .expect("read the transaction id");
            tx.rollback().await.expect("roll back");
            (claimed, xid)
        }
    };

    let (replay, xid) = claim_and_see(done.clone(), Some(fingerprint)).await;
    assert_eq!(replay.expect("replay"), TxClaim::Completed(STORED.to_vec()));
    assert_eq!(xid, None, "a replay wrote");

    let other = Fingerprint::of("another payload").expect("a string serializes");
    let (mismatch, xid) = claim_and_see(done, Some(other)).await;
    assert!(
        matches!(mismatch, Err(Error::FingerprintMismatch { .. })),
        "{mismatch:?}"
    );
    assert_eq!(xid, None, "a mismatch wrote");

    let (busy, xid) = claim_and_see(held.clone(), None).await;
    assert!(matches!(busy, Err(Error::InProgress { .. })), "{busy:?}");
    assert_eq!(xid, None, "a claim of a key in progress wrote");

    let (new, xid) = claim_and_see(key("brand-new"), None).await;
    assert!(matches!(new, Ok(TxClaim::Run(_))), "{new:?}");
    assert!(xid.is_some(), "a new key was claimed without a write");

    clock.advance(LEASE);
    let (takeover, xid) = claim_and_see(held, None).await;
    assert!(matches!(takeover, Ok(TxClaim::Run(_))), "{takeover:?}");
    assert!(
        xid.is_some(),
        "a dead record was taken over without a write"
    );
}

/// What a claim meets while another transaction has changed the record but not committed.
/// Its `ON CONFLICT` waits for that transaction; the snapshot of its read, taken before, does
/// not show the outcome, so the claim must look again rather than answer from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_racing_uncommitted_transactions_see_their_outcome() {
    let Some(pool) = postgres_pool().await else {
        return;
    };
    let store = postgres_store(pool, ManualClock::new(START_MILLIS)).await;
    let table = store.store.table().to_owned();
    let live = START_MILLIS + 30_000;
    let insert = format!(
        "INSERT INTO {table} (scope, business_key, completed, owner, fence, lease_until, expires_at)
         VALUES ($1, $2, FALSE, 'other', 1, {live}, {live})"
    );
    let dead = format!(
        "INSERT INTO {table} (scope, business_key, completed, owner, fence, lease_until, expires_at)
         VALUES ($1, $2, FALSE, 'crashed', 1, {START_MILLIS}, {START_MILLIS})"
    );
    let take_over = format!(
        "UPDATE {table} SET owner = 'other', fence = fence + 1, lease_until = {live},
         expires_at = {live} WHERE scope = $1 AND business_key = $2"
    );
    let delete = format!("DELETE FROM {table} WHERE scope = $1 AND business_key = $2");

    // (case, committed first, left uncommitted while the claim runs, then committed?, expected)
    let cases = [
        ("insert-committed", None, &insert, true, "in progress"),
        ("insert-rolled-back", None, &insert, false, "fence 1"),
        (
            "takeover-committed",
            Some(&dead),
            &take_over,
            true,
            "in progress",
        ),
        (
            "takeover-rolled-back",
            Some(&dead),
            &take_over,
            false,
            "fence 2",
        ),
        ("purge-committed", Some(&dead), &delete, true, "fence 1"),
    ];
    for (name, before, during, commit, expected) in cases {
        let key = key(name);
        let run = |statement: &String| AssertSqlSafe(statement.clone());
        if let Some(before) = before {
            sqlx::query(run(before))
                .bind(key.scope())
                .bind(key.key())
                .execute(store.store.pool())
                .await
                .expect("the record before");
        }
        let mut other = store.store.pool().begin().await.expect("begin");
        let done = sqlx::query(run(during))
            .bind(key.scope())
            .bind(key.key())
            .execute(&mut *other)
            .await
            .expect("the other transaction's statement");
        assert_eq!(done.rows_affected(), 1, "{name}: {during}");

        let claimer = tokio::spawn({
            let (store, key) = (store.store.clone(), key.clone());
            async move { store.claim(&key, None, LEASE).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !claimer.is_finished(),
            "{name}: the claim did not wait for the uncommitted transaction"
        );
        if commit {
            other.commit().await.expect("commit");
        } else {
            other.rollback().await.expect("roll back");
        }
        let found = tokio::time::timeout(Duration::from_secs(20), claimer)
            .await
            .unwrap_or_else(|_| panic!("{name}: the claim hung"))
            .expect("the claiming task panicked")
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        match (expected, &found) {
            ("in progress", Claim::InProgress { retry_after }) if *retry_after == LEASE => {}
            ("fence 1", Claim::Acquired(lease)) if lease.fence() == 1 => {}
            ("fence 2", Claim::Acquired(lease)) if lease.fence() == 2 => {}
            _ => panic!("{name}: expected {expected}, got {found:?}"),
        }
    }
}

/// A purge skips records another transaction has locked instead of waiting for it, and
/// deletes them on a later run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purge_skips_locked_records_without_waiting() {
    let Some(pool) = postgres_pool().await else {
        return;
    };
    let clock = ManualClock::new(START_MILLIS);
    let store = postgres_store(pool, clock.clone()).await;
    for i in 0..3 {
        let key = key(&format!("expired-{i}"));
        let Claim::Acquired(lease) = store.claim(&key, None, LEASE).await.expect("claim") else {
            panic!("a new key is acquired");
        };
        store.release(&key, &lease).await.expect("release");
    }
    let mut locker = store.store.pool().begin().await.expect("begin");
    let locked = key("expired-1");
    sqlx::query(AssertSqlSafe(format!(
        "SELECT 1 FROM {} WHERE scope = $1 AND business_key = $2 FOR UPDATE",
        store.store.table()
    )))
    .bind(locked.scope())
    .bind(locked.key())
    .fetch_one(&mut *locker)
    .await
    .expect("lock one record");

    clock.advance(Duration::from_secs(1));
    let purged = tokio::time::timeout(Duration::from_secs(10), store.purge_expired(100))
        .await
        .expect("the purge waited for a locked record");
    assert_eq!(purged.expect("purge"), 2, "the 2 unlocked expired records");
    locker.commit().await.expect("commit");
    assert_eq!(store.purge_expired(100).await.expect("purge"), 1);
    assert_eq!(store.purge_expired(100).await.expect("purge"), 0);
}

/// Keys and scopes that look like SQL, or hold quotes, backslashes, placeholders or NUL, are
/// values: each is its own record and the table survives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_that_look_like_sql_are_bound_values() {
    let Some(pool) = postgres_pool().await else {
        return;
    };
    let store = postgres_store(pool, ManualClock::new(START_MILLIS)).await;
    let keys = [
        RecordKey::new(SCOPE, "'; DROP TABLE idem_records; --").expect("key"),
        RecordKey::new(SCOPE, "x' OR '1'='1").expect("key"),
        RecordKey::new(SCOPE, "$1 $2 \\ \\x00 E'\\n'").expect("key"),
        RecordKey::new(SCOPE, "nul\0inside").expect("key"),
        RecordKey::new(SCOPE, "nul\0inside!").expect("key"),
        RecordKey::new("scope'; --", "plain").expect("key"),
        RecordKey::new(SCOPE, " padded ").expect("key"),
        RecordKey::new(SCOPE, "padded").expect("key"),
    ];
    assert!(keys[3].key().starts_with(idem_runtime::HASHED_PREFIX));
    for (i, key) in keys.iter().enumerate() {
        let Claim::Acquired(lease) = store.claim(key, None, LEASE).await.expect("claim") else {
            panic!("key {i} ({key}) collided with an earlier one");
        };
        store
            .complete(key, &lease, format!("{i}").as_bytes(), TTL)
            .await
            .expect("complete");
    }
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(
            store.claim(key, None, LEASE).await.expect("claim"),
            Claim::Completed(format!("{i}").into_bytes()),
            "key {i} ({key}) replays its own result"
        );
    }
}

/// A fence at `i64::MAX` cannot rise: the takeover fails as a record that does not decode, and
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fence_at_its_maximum_is_a_decode_error() {
    let Some(pool) = postgres_pool().await else {
        return;
    };
    let clock = ManualClock::new(START_MILLIS);
    let store = postgres_store(pool, clock.clone()).await;
    let key = key("max-fence");
    let Claim::Acquired(_) = store.claim(&key, None, LEASE).await.expect("claim") else {
        panic!("a new key is acquired");
    };
    tamper(&store.store, &key, "fence = 9223372036854775807").await;
    clock.advance(LEASE);
    assert_decode_error(store.claim(&key, None, LEASE).await, &key, "fence");
    let fence: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT fence FROM {} WHERE scope = $1 AND business_key = $2",
        store.store.table()
    )))
    .bind(key.scope())
    .bind(key.key())
    .fetch_one(store.store.pool())
    .await
    .expect("read the fence");
    assert_eq!(fence, i64::MAX, "the failed takeover changed the record");
}

/// A 63-byte table name, the longest there is, gets its table and its own expiry index.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn longest_table_names_get_their_own_expiry_index() {
    let Some(pool) = postgres_pool().await else {
        return;
    };
    let base = servers::unique_name("idem_long");
    let table = format!("{base}{}", "x".repeat(63 - base.len()));
    let _drop = DropTable {
        server: Server::Postgres,
        table: table.clone(),
    };
    let store = PostgresStore::new(pool.clone())
        .with_table(&table)
        .expect("63 bytes is a valid name");
    store.migrate().await.expect("migrate");
    store.migrate().await.expect("migrate again");
    let indexes: Vec<(String,)> = sqlx::query_as(
        "SELECT indexname::TEXT FROM pg_indexes WHERE tablename = $1 ORDER BY indexname",
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
    assert!(
        indexes.iter().any(|(name,)| name.ends_with("_expires_at")),
        "{indexes:?}"
    );
}
