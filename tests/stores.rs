//! The store conformance suite (`idem_runtime::testing`) against every store, and the checks
//! only SQLite needs: migrations and records edited by hand.

use std::time::Duration;

use idem_runtime::clock::ManualClock;
use idem_runtime::sqlite::SqliteStore;
use idem_runtime::testing::START_MILLIS;
use idem_runtime::{Claim, Error, Fingerprint, Policy, RecordKey, Store};
use idem_tests::sqlite_file::TempDb;

mod memory {
    use idem_runtime::MemoryStore;
    use idem_runtime::clock::ManualClock;

    idem_runtime::conformance_tests!(
        |clock: ManualClock| async move { MemoryStore::with_clock(clock) }
    );
}

/// The in-process result cache in front of a store answers as the store does (tiny capacity,
/// so evictions happen during the suite too).
mod cached_memory {
    use std::num::NonZeroUsize;

    use idem_runtime::MemoryStore;
    use idem_runtime::cache::CachedStore;
    use idem_runtime::clock::ManualClock;

    idem_runtime::conformance_tests!(|clock: ManualClock| async move {
        CachedStore::new(
            MemoryStore::with_clock(clock.clone()),
            NonZeroUsize::new(2).expect("2 is not 0"),
        )
        .with_clock(clock)
    });
}

/// The same in front of SQLite (in memory), with room for every record.
mod cached_sqlite {
    use std::num::NonZeroUsize;

    use idem_runtime::cache::CachedStore;
    use idem_runtime::clock::ManualClock;

    idem_runtime::conformance_tests!(|clock: ManualClock| async move {
        CachedStore::new(
            super::in_memory_store(clock.clone()).await,
            NonZeroUsize::new(1024).expect("1024 is not 0"),
        )
        .with_clock(clock)
    });
}

mod sqlite_memory {
    use idem_runtime::clock::ManualClock;

    idem_runtime::conformance_tests!(|clock: ManualClock| super::in_memory_store(clock));
}

mod sqlite_file {
    use idem_runtime::clock::ManualClock;

    idem_runtime::conformance_tests!(|clock: ManualClock| async move {
        idem_tests::sqlite_file::FileStore::open("conformance", clock).await
    });
}

mod sqlite_custom_table {
    use idem_runtime::clock::ManualClock;
    use idem_runtime::sqlite::SqliteStore;

    idem_runtime::conformance_tests!(|clock: ManualClock| async move {
        let store = SqliteStore::in_memory()
            .await
            .expect("open an in-memory SQLite database")
            .with_table("points_dedup")
            .expect("a plain table name")
            .with_clock(clock);
        store.migrate().await.expect("create the table");
        store
    });
}

/// A table name that is not a plain identifier is rejected when the store is built.
#[tokio::test]
async fn table_names_that_are_not_plain_identifiers_are_rejected() {
    let store = SqliteStore::in_memory().await.expect("open SQLite");
    for bad in [
        "",
        "1x",
        "idem; DROP TABLE idem_records",
        "a.b",
        "\"q\"",
        "tablé",
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
    let custom = store
        .clone()
        .with_table("custom_records")
        .expect("plain name");
    assert_eq!(custom.table(), "custom_records");
    custom.migrate().await.expect("migrate the custom table");
    store.migrate().await.expect("migrate the default table");
    let tables: Vec<(String,)> =
        sqlx::query_as("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(store.pool())
            .await
            .expect("list tables");
    assert_eq!(
        tables,
        vec![("custom_records".to_owned(),), ("idem_records".to_owned(),)]
    );

    // The two tables are separate key spaces.
    let key = RecordKey::new("scope", "k").expect("key");
    let held = custom.claim(&key, None, Duration::from_secs(30)).await;
    assert!(matches!(held, Ok(Claim::Acquired(_))), "{held:?}");
    let other = store.claim(&key, None, Duration::from_secs(30)).await;
    assert!(matches!(other, Ok(Claim::Acquired(_))), "{other:?}");
}

/// A migrated store in a private in-memory SQLite database on `clock`.
async fn in_memory_store(clock: ManualClock) -> SqliteStore {
    let store = SqliteStore::in_memory()
        .await
        .expect("open an in-memory SQLite database")
        .with_clock(clock);
    store
        .migrate()
        .await
        .expect("create the idem_records table");
    store
}

// ---------------------------------------------------------------------------------------------
// SQLite only
// ---------------------------------------------------------------------------------------------

const SCOPE: &str = "stores::sqlite";
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);
const STORED: &[u8] = br#"{"points":25}"#;

fn key(name: &str) -> RecordKey {
    RecordKey::new(SCOPE, name).expect("a non-empty key is valid")
}

/// Claims and completes `name` with [`STORED`] under `fingerprint`.
async fn completed_key(
    store: &impl Store,
    name: &str,
    fingerprint: Option<&Fingerprint>,
) -> RecordKey {
    let key = key(name);
    let Claim::Acquired(lease) = store
        .claim(&key, fingerprint, LEASE)
        .await
        .expect("claim a new key")
    else {
        panic!("a new key is acquired");
    };
    store
        .complete(&key, &lease, STORED, TTL)
        .await
        .expect("complete with the live lease");
    key
}

/// Runs `statement` (which binds the scope as `?1` and the business key as `?2`) on the row of
/// `key`, as someone editing the database by hand.
async fn tamper(store: &SqliteStore, key: &RecordKey, statement: &'static str) {
    let done = sqlx::query(statement)
        .bind(key.scope())
        .bind(key.key())
        .execute(store.pool())
        .await
        .unwrap_or_else(|error| panic!("{statement}: {error}"));
    assert_eq!(done.rows_affected(), 1, "{statement} changed no row");
}

#[track_caller]
fn assert_decode_error(result: Result<Claim, Error>, expected_key: &RecordKey, mentions: &str) {
    match result {
        Err(Error::Decode { scope, key, source })
            if scope == expected_key.scope() && key == expected_key.key() =>
        {
            let reason = source.to_string();
            assert!(
                reason.contains(mentions),
                "the decode error for {expected_key} should name `{mentions}`: {reason}"
            );
        }
        other => panic!("expected Err(Decode) for {expected_key}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_runs_twice_and_from_8_tasks_at_once() {
    let file = TempDb::new("migrate-twice");
    let store = SqliteStore::connect(&file.url())
        .await
        .expect("open a new database file");
    store.migrate().await.expect("the first migrate");
    store
        .migrate()
        .await
        .expect("the second migrate of the same file");
    let key = completed_key(&store, "after-two-migrations", None).await;
    store
        .migrate()
        .await
        .expect("a migrate over existing records");
    assert_eq!(
        store.claim(&key, None, LEASE).await.expect("claim"),
        Claim::Completed(STORED.to_vec()),
        "a migrate keeps the records"
    );

    let file = TempDb::new("migrate-concurrently");
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let url = file.url();
            tokio::spawn(async move {
                let store = SqliteStore::connect(&url)
                    .await
                    .unwrap_or_else(|error| panic!("task {i}: open the file: {error}"));
                store
                    .migrate()
                    .await
                    .unwrap_or_else(|error| panic!("task {i}: migrate: {error}"));
                store
            })
        })
        .collect();
    let mut stores = Vec::new();
    for task in tasks {
        stores.push(task.await.expect("a migrating task panicked"));
    }

    let objects: Vec<(String, String)> = sqlx::query_as(
        "SELECT type, name FROM sqlite_master WHERE tbl_name = 'idem_records' ORDER BY name",
    )
    .fetch_all(stores[0].pool())
    .await
    .expect("read the schema");
    assert_eq!(
        objects,
        [
            ("table".to_owned(), "idem_records".to_owned()),
            ("index".to_owned(), "idem_records_expires_at".to_owned()),
            (
                "index".to_owned(),
                "sqlite_autoindex_idem_records_1".to_owned()
            ),
        ],
        "8 concurrent migrations create the table, its key and its index once"
    );
    let key = completed_key(&stores[3], "after-concurrent-migrations", None).await;
    assert_eq!(
        stores[7].claim(&key, None, LEASE).await.expect("claim"),
        Claim::Completed(STORED.to_vec()),
        "a record written through one pool replays through another"
    );
}

/// Many pools opening the same new file at once all switch it to WAL, which takes a lock
/// SQLite's busy timeout does not wait for: every open must still succeed (the store tries a
/// locked open again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_pools_open_a_new_file_at_once() {
    for round in 0..4 {
        let file = TempDb::new(&format!("open-at-once-{round}"));
        let opens: Vec<_> = (0..32)
            .map(|_| {
                let url = file.url();
                tokio::spawn(async move { SqliteStore::connect(&url).await })
            })
            .collect();
        for (i, open) in opens.into_iter().enumerate() {
            let store = open
                .await
                .expect("an opening task panicked")
                .unwrap_or_else(|error| panic!("round {round}, pool {i}: {error}"));
            store.pool().close().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_survive_reopening_the_file() {
    let file = TempDb::new("reopen");
    let clock = ManualClock::new(START_MILLIS);
    let first = SqliteStore::connect(&file.url())
        .await
        .expect("open a new database file")
        .with_clock(clock.clone());
    first.migrate().await.expect("migrate");
    let done = completed_key(&first, "done", None).await;
    let busy = key("busy");
    let Claim::Acquired(lease) = first.claim(&busy, None, LEASE).await.expect("claim") else {
        panic!("a new key is acquired");
    };
    first.pool().close().await;
    drop(first);

    let second = SqliteStore::connect(&file.url())
        .await
        .expect("reopen the database file")
        .with_clock(clock.clone());
    second.migrate().await.expect("migrate an existing file");
    assert_eq!(
        second.claim(&done, None, LEASE).await.expect("claim"),
        Claim::Completed(STORED.to_vec()),
        "a completed record replays after reopening"
    );
    assert_eq!(
        second.claim(&busy, None, LEASE).await.expect("claim"),
        Claim::InProgress { retry_after: LEASE },
        "an in-progress record is still held after reopening"
    );
    second
        .complete(&busy, &lease, b"1", TTL)
        .await
        .expect("the holder completes through the reopened store");
    assert_eq!(
        second.claim(&busy, None, LEASE).await.expect("claim"),
        Claim::Completed(b"1".to_vec())
    );
}

/// A replay, and a duplicate of a key in progress, answer while another connection holds the
/// database's write lock: the claim reads a live record before it writes anything, so it
/// neither waits for the writer nor fails with "database is locked" when the busy timeout
/// runs out. A new key does need the lock, and gets it once the writer is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replays_do_not_wait_for_a_writer() {
    use sqlx::Connection;
    let file = TempDb::new("writer");
    let store = SqliteStore::connect(&file.url())
        .await
        .expect("open a new database file");
    store.migrate().await.expect("migrate");
    let done = completed_key(&store, "done", None).await;
    let busy = key("busy");
    let Claim::Acquired(_) = store.claim(&busy, None, LEASE).await.expect("claim") else {
        panic!("a new key is acquired");
    };

    // Another connection takes the write lock and keeps it.
    let mut writer = sqlx::SqliteConnection::connect(&file.url())
        .await
        .expect("a second connection");
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut writer)
        .await
        .expect("take the write lock");

    // Far below the store's 5 s busy timeout: the claims must not wait for the lock at all.
    let bound = Duration::from_secs(3);
    let replay = tokio::time::timeout(bound, store.claim(&done, None, LEASE))
        .await
        .expect("a replay waited for the writer");
    assert_eq!(replay.expect("replay"), Claim::Completed(STORED.to_vec()));
    let held = tokio::time::timeout(bound, store.claim(&busy, None, LEASE))
        .await
        .expect("a duplicate of a key in progress waited for the writer");
    assert!(matches!(held, Ok(Claim::InProgress { .. })), "{held:?}");

    // A new key waits for the lock; it gets it when the writer commits.
    let new = tokio::spawn({
        let store = store.clone();
        async move { store.claim(&key("new"), None, LEASE).await }
    });
    sqlx::raw_sql("COMMIT")
        .execute(&mut writer)
        .await
        .expect("release the write lock");
    let new = new.await.expect("the claim task");
    assert!(matches!(new, Ok(Claim::Acquired(_))), "{new:?}");
}

/// The store hands stored bytes back as they are: decoding them is the handler's job, and
/// there garbage becomes `Error::Decode` without running the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_result_is_replayed_raw_and_fails_to_decode_in_run() {
    let store = in_memory_store(ManualClock::new(START_MILLIS)).await;
    let key = completed_key(&store, "garbage-result", None).await;
    tamper(
        &store,
        &key,
        "UPDATE idem_records SET result = x'ff00' WHERE scope = ?1 AND business_key = ?2",
    )
    .await;

    assert_eq!(
        store.claim(&key, None, LEASE).await.expect("claim"),
        Claim::Completed(vec![0xff, 0x00]),
        "the store returns the stored bytes undecoded"
    );

    let mut ran = false;
    let outcome: Result<serde_json::Value, Error> =
        idem_runtime::run(&store, key.clone(), None, Policy::new(), async {
            ran = true;
            Ok(serde_json::Value::Null)
        })
        .await;
    assert!(!ran, "the body ran although the key was completed");
    match outcome {
        Err(Error::Decode { scope, key: k, .. }) if scope == key.scope() && k == key.key() => {}
        other => panic!("run over a garbage result: expected Err(Decode), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completed_flag_out_of_range_is_a_decode_error() {
    let store = in_memory_store(ManualClock::new(START_MILLIS)).await;
    let key = completed_key(&store, "completed-7", None).await;
    tamper(
        &store,
        &key,
        "UPDATE idem_records SET completed = 7 WHERE scope = ?1 AND business_key = ?2",
    )
    .await;
    assert_decode_error(store.claim(&key, None, LEASE).await, &key, "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_fingerprint_is_a_decode_error_when_compared() {
    let store = in_memory_store(ManualClock::new(START_MILLIS)).await;
    let fingerprint = Fingerprint::of("payload").expect("a string serializes");
    let key = completed_key(&store, "fingerprint-1-byte", Some(&fingerprint)).await;
    tamper(
        &store,
        &key,
        "UPDATE idem_records SET fingerprint = x'01' WHERE scope = ?1 AND business_key = ?2",
    )
    .await;
    assert_decode_error(
        store.claim(&key, Some(&fingerprint), LEASE).await,
        &key,
        "fingerprint",
    );
    assert_eq!(
        store.claim(&key, None, LEASE).await.expect("claim"),
        Claim::Completed(STORED.to_vec()),
        "a claim without a fingerprint does not read the stored one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completed_record_without_result_is_a_decode_error() {
    let store = in_memory_store(ManualClock::new(START_MILLIS)).await;
    let key = completed_key(&store, "no-result", None).await;
    tamper(
        &store,
        &key,
        "UPDATE idem_records SET result = NULL WHERE scope = ?1 AND business_key = ?2",
    )
    .await;
    assert_decode_error(store.claim(&key, None, LEASE).await, &key, "no result");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn text_in_a_time_column_is_a_decode_error() {
    let store = in_memory_store(ManualClock::new(START_MILLIS)).await;
    let key = key("text-lease");
    let Claim::Acquired(_) = store.claim(&key, None, LEASE).await.expect("claim") else {
        panic!("a new key is acquired");
    };
    tamper(
        &store,
        &key,
        "UPDATE idem_records SET lease_until = 'soon' WHERE scope = ?1 AND business_key = ?2",
    )
    .await;
    match store.claim(&key, None, LEASE).await {
        Err(Error::Decode { .. }) => {}
        other => panic!("a text lease_until: expected Err(Decode), got {other:?}"),
    }
}
