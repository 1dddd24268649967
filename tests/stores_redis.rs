//! The store conformance suite against Redis (through a `ConnectionManager` and through a
//! `MultiplexedConnection`), and the checks only Redis needs: key prefixes, hash tags, TTLs
//! set relative to the store's clock, purges confined to one prefix, and records edited by
//! hand.
//!
//! Every test works under its own key prefix and deletes its keys when done. Without a Redis
//! server at `IDEM_REDIS_URL` (default `redis://127.0.0.1:6379/`) the tests are skipped, unless
//! `IDEM_REQUIRE_SERVERS=1`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use idem_runtime::clock::{Clock, ManualClock};
use idem_runtime::redis::{DEFAULT_PREFIX, IN_PROGRESS_GRACE, RedisStore};
use idem_runtime::testing::START_MILLIS;
use idem_runtime::{Claim, Error, Fingerprint, Lease, Policy, RecordKey, Store};
use idem_tests::redis_server::{self, Cleanup, client, manager, multiplexed, url};
use idem_tests::{OrderPaid, Runs, credit_points};
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use tokio::sync::Barrier;

mod manager {
    use idem_runtime::clock::ManualClock;

    idem_runtime::conformance_tests!(optional |clock: ManualClock| async move {
        let connection = idem_tests::redis_server::manager().await?;
        Some(idem_tests::redis_server::store(connection, clock))
    });
}

mod multiplexed {
    use idem_runtime::clock::ManualClock;

    idem_runtime::conformance_tests!(optional |clock: ManualClock| async move {
        let connection = idem_tests::redis_server::multiplexed().await?;
        Some(idem_tests::redis_server::store(connection, clock))
    });
}

// ---------------------------------------------------------------------------------------------
// Connections and test stores
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const SCOPE: &str = "stores::redis";
const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);
const STORED: &[u8] = br#"{"points":25}"#;

fn key(name: &str) -> RecordKey {
    RecordKey::new(SCOPE, name).expect("a non-empty key is valid")
}

async fn acquire(store: &impl Store, key: &RecordKey, fingerprint: Option<&Fingerprint>) -> Lease {
    match store.claim(key, fingerprint, LEASE).await {
        Ok(Claim::Acquired(lease)) => lease,
        other => panic!("claiming the new key {key}: expected Acquired, got {other:?}"),
    }
}

/// Claims and completes `name` with [`STORED`] under `fingerprint`; returns the key and lease.
async fn completed_key(
    store: &impl Store,
    name: &str,
    fingerprint: Option<&Fingerprint>,
) -> (RecordKey, Lease) {
    let key = key(name);
    let lease = acquire(store, &key, fingerprint).await;
    store
        .complete(&key, &lease, STORED, TTL)
        .await
        .expect("complete with the live lease");
    (key, lease)
}

/// Runs a plain Redis command, as someone editing the data by hand.
async fn command<T: redis::FromRedisValue>(
    connection: &mut MultiplexedConnection,
    args: &[&[u8]],
) -> T {
    let mut cmd = redis::cmd(&String::from_utf8_lossy(args[0]));
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(connection)
        .await
        .unwrap_or_else(|error| panic!("{:?}: {error}", String::from_utf8_lossy(args[0])))
}

async fn fields(
    connection: &mut MultiplexedConnection,
    redis_key: &str,
) -> HashMap<String, Vec<u8>> {
    command(connection, &[b"HGETALL", redis_key.as_bytes()]).await
}

async fn pttl(connection: &mut MultiplexedConnection, redis_key: &str) -> i64 {
    command(connection, &[b"PTTL", redis_key.as_bytes()]).await
}

#[track_caller]
fn assert_decode_error<T: std::fmt::Debug>(
    result: Result<T, Error>,
    expected_key: &RecordKey,
    mentions: &str,
    what: &str,
) {
    match result {
        Err(Error::Decode { scope, key, source })
            if scope == expected_key.scope() && key == expected_key.key() =>
        {
            let reason = source.to_string();
            assert!(
                reason.contains(mentions),
                "{what}: the decode error for {expected_key} should name `{mentions}`: {reason}"
            );
        }
        other => panic!("{what}: expected Err(Decode) for {expected_key}, got {other:?}"),
    }
}

/// The hash slot Redis Cluster gives `key` (`CLUSTER KEYSLOT`, which a standalone server does
/// not answer): CRC16/XMODEM of the hash tag (the text between the first `{` and the first `}`
/// after it, when not empty) or of the whole key, modulo 16384.
fn key_hash_slot(key: &[u8]) -> u16 {
    fn crc16(data: &[u8]) -> u16 {
        let mut crc: u16 = 0;
        for &byte in data {
            crc ^= u16::from(byte) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 == 0 {
                    crc << 1
                } else {
                    (crc << 1) ^ 0x1021
                };
            }
        }
        crc
    }
    crc16(hash_tag(key).unwrap_or(key)) & 0x3fff
}

/// The hash tag of `key` by Redis Cluster's rule, if it has one.
fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let close = key[open + 1..].iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &key[open + 1..open + 1 + close])
}

// ---------------------------------------------------------------------------------------------
// Redis only
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn prefixes_that_are_not_plain_are_rejected() {
    let Some(connection) = multiplexed().await else {
        return;
    };
    let store = RedisStore::new(connection);
    assert_eq!(store.prefix(), DEFAULT_PREFIX);
    let too_long = "p".repeat(65);
    for bad in [
        "",
        "a b",
        "{tag}",
        "x}",
        "x{",
        "a*",
        "a?",
        "[ab]",
        "a\\b",
        "préfixe",
        "p\n",
        "a; FLUSHALL",
        too_long.as_str(),
    ] {
        assert!(
            matches!(
                store.clone().with_prefix(bad),
                Err(Error::InvalidName {
                    what: "key prefix",
                    ..
                })
            ),
            "{bad:?} was accepted"
        );
    }
    let longest = "p".repeat(64);
    for good in ["orders", "orders:idem.v1-2_x", longest.as_str()] {
        let store = store.clone().with_prefix(good).expect("a plain prefix");
        assert_eq!(store.prefix(), good);
        assert!(
            format!("{store:?}").contains(good),
            "Debug shows the prefix: {store:?}"
        );
    }
}

#[test]
fn key_hash_slot_matches_redis_cluster() {
    // Values from the Redis Cluster specification and the `CLUSTER KEYSLOT` documentation.
    assert_eq!(key_hash_slot(b"123456789"), 0x31c3 & 0x3fff);
    assert_eq!(key_hash_slot(b"foo"), 12182);
    assert_eq!(key_hash_slot(b"somekey"), 11058);
    assert_eq!(key_hash_slot(b"foo{hash_tag}"), 2515);
    assert_eq!(
        key_hash_slot(b"{user1000}.following"),
        key_hash_slot(b"user1000")
    );
    assert_eq!(
        hash_tag(b"foo{}{bar}"),
        None,
        "an empty tag hashes the whole key"
    );
    assert_eq!(hash_tag(b"foo{{bar}}zap"), Some(b"{bar".as_slice()));
    assert_eq!(hash_tag(b"foo{bar}{zap}"), Some(b"bar".as_slice()));
    assert_eq!(
        hash_tag(b"foo{bar"),
        None,
        "an unclosed tag hashes the whole key"
    );
}

/// Whatever the scope and key hold (`{`, `}`, `:`, `%`, unicode), the record's Redis key is
/// `<prefix>:{tag}` with exactly one `{` and one `}`, its cluster hash tag is the whole braced
/// part, and different records get different keys: checked on the text, then by storing every
/// record and reading each one back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_keys_have_one_well_formed_hash_tag_and_stay_distinct() {
    let Some(connection) = multiplexed().await else {
        return;
    };
    let store = redis_server::store(connection, ManualClock::new(START_MILLIS));
    let prefix = store.store.prefix().to_owned();

    let documented = RedisStore::new(store.store.connection().clone())
        .redis_key(&RecordKey::new("orders::pay", "A-1{7}").expect("key"));
    assert_eq!(documented, "idem:{11:orders::pay:A-1%7B7%7D}");

    let pairs: &[(&str, &str)] = &[
        ("s", "plain"),
        ("s", "{"),
        ("s", "}"),
        ("s", "{}"),
        ("s", "}{"),
        ("s", "{{a}}"),
        ("s", "%7B"),
        ("s", "%"),
        ("s", "%25"),
        ("s", "a:b"),
        ("s:a", "b"),
        ("s", "a:b:c"),
        ("s:a:b", "c"),
        ("s{", "x"),
        ("s", "{x"),
        ("s}", "x"),
        ("s", "}x"),
        ("1:s", "x"),
        ("1", "s:x"),
        ("3:s{", "x"),
        ("s", "x}y{z"),
        ("订单::支付", "键-{🔑}"),
        ("订单::支付", "键-%7B🔑%7D"),
        ("scope with spaces", "key with spaces"),
    ];
    let mut seen = HashSet::new();
    for (scope, name) in pairs {
        let record = RecordKey::new(scope, name).expect("a non-empty key is valid");
        let redis_key = store.store.redis_key(&record);
        let bytes = redis_key.as_bytes();
        assert!(
            redis_key.starts_with(&format!("{prefix}:{{")),
            "{redis_key} starts with the prefix and the tag"
        );
        assert_eq!(
            (
                redis_key.matches('{').count(),
                redis_key.matches('}').count()
            ),
            (1, 1),
            "{redis_key} has one `{{` and one `}}`"
        );
        let tag = hash_tag(bytes).expect("every record key has a hash tag");
        assert_eq!(
            bytes.len(),
            prefix.len() + 2 + tag.len() + 1,
            "the hash tag of {redis_key} runs to its end"
        );
        let tagged = [b"{", tag, b"}"].concat();
        assert_eq!(
            key_hash_slot(bytes),
            key_hash_slot(&tagged),
            "{redis_key} hashes by its tag"
        );
        let tag = String::from_utf8(tag.to_vec()).expect("the tag is text");
        assert!(
            tag.contains(scope.replace('{', "%7B").replace('}', "%7D").as_str()),
            "the tag {tag} holds the scope"
        );
        assert!(seen.insert(redis_key.clone()), "{redis_key} is used twice");
    }

    for (i, (scope, name)) in pairs.iter().enumerate() {
        let record = RecordKey::new(scope, name).expect("a non-empty key is valid");
        let lease = acquire(&store, &record, None).await;
        assert_eq!(lease.fence(), 1, "{record} is a new record");
        store
            .complete(&record, &lease, i.to_string().as_bytes(), TTL)
            .await
            .expect("complete");
    }
    for (i, (scope, name)) in pairs.iter().enumerate() {
        let record = RecordKey::new(scope, name).expect("a non-empty key is valid");
        assert_eq!(
            store.claim(&record, None, LEASE).await.expect("claim"),
            Claim::Completed(i.to_string().into_bytes()),
            "{record} replays its own result"
        );
    }
}

/// The hash holds the documented fields, and Redis expires it after the lease or ttl counted
/// from the store's clock (here years before the server's): the TTLs are relative.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_are_hashes_with_ttls_relative_to_the_store_clock() {
    let Some(mut connection) = multiplexed().await else {
        return;
    };
    let clock = ManualClock::new(START_MILLIS);
    let store = redis_server::store(connection.clone(), clock.clone());
    let fingerprint = Fingerprint::of("payload").expect("a string serializes");
    let held = key("held");
    let redis_key = store.store.redis_key(&held);

    let lease = acquire(&store, &held, Some(&fingerprint)).await;
    let ttl = pttl(&mut connection, &redis_key).await;
    let grace = i64::try_from(IN_PROGRESS_GRACE.as_millis()).expect("grace in ms");
    assert!(
        (grace + 25_000..=grace + 30_000).contains(&ttl),
        "PTTL {ttl} after a 30 s claim: the lease and the grace"
    );
    let stored = fields(&mut connection, &redis_key).await;
    let until = (START_MILLIS + 30_000).to_string().into_bytes();
    assert_eq!(
        stored,
        HashMap::from([
            ("completed".to_owned(), b"0".to_vec()),
            ("owner".to_owned(), lease.owner().as_bytes().to_vec()),
            ("fence".to_owned(), b"1".to_vec()),
            ("lease_until".to_owned(), until.clone()),
            ("expires_at".to_owned(), until),
            ("fingerprint".to_owned(), fingerprint.as_bytes().to_vec()),
        ]),
        "an in-progress record"
    );

    clock.advance(Duration::from_secs(10));
    let lease = store
        .extend(&held, &lease, Duration::from_secs(120))
        .await
        .expect("extend");
    let ttl = pttl(&mut connection, &redis_key).await;
    assert!(
        (grace + 115_000..=grace + 120_000).contains(&ttl),
        "PTTL {ttl} after extending by 120 s"
    );

    store
        .complete(&held, &lease, STORED, TTL)
        .await
        .expect("complete");
    let ttl = pttl(&mut connection, &redis_key).await;
    assert!(
        (3_595_000..=3_600_000).contains(&ttl),
        "PTTL {ttl} after completing with a 1 h ttl"
    );
    let stored = fields(&mut connection, &redis_key).await;
    assert_eq!(stored["completed"], b"1");
    assert_eq!(stored["result"], STORED);
    assert_eq!(
        stored["expires_at"],
        (START_MILLIS + 10_000 + 3_600_000).to_string().into_bytes()
    );

    // A release marks the record free at once but leaves its Redis TTL as it was.
    let released = key("released");
    let redis_key = store.store.redis_key(&released);
    let lease = acquire(&store, &released, None).await;
    store.release(&released, &lease).await.expect("release");
    let ttl = pttl(&mut connection, &redis_key).await;
    assert!(
        (grace + 25_000..=grace + 30_000).contains(&ttl),
        "PTTL {ttl} after a release"
    );
    assert_eq!(
        fields(&mut connection, &redis_key).await["expires_at"],
        clock.now_millis().to_string().into_bytes()
    );

    // An expiry already passed by the store's clock still gives Redis a positive TTL.
    let short = key("short");
    let lease = acquire(&store, &short, None).await;
    store
        .complete(&short, &lease, STORED, Duration::ZERO)
        .await
        .expect("complete with a zero ttl");
    let ttl = pttl(&mut connection, &store.store.redis_key(&short)).await;
    assert!(ttl == -2 || (0..=1).contains(&ttl), "PTTL {ttl}");
}

/// With the system clock Redis deletes a completed record when its ttl has run out in real
/// time (the next claim starts a new record at fence 1), and keeps an in-progress record for
/// the grace after its lease: a slow holder nobody took over still completes, one that was
/// taken over is fenced off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_expires_records_in_real_time() {
    let Some(mut connection) = multiplexed().await else {
        return;
    };
    let cleanup = Cleanup::fresh();
    let store = RedisStore::new(connection.clone())
        .with_prefix(&cleanup.prefix)
        .expect("a unique name is a valid prefix");
    let key = key("real-time");
    let short = Duration::from_millis(150);

    // A holder that outlives its lease, with nobody taking the key over, still completes:
    // Redis keeps the record for the grace after the lease.
    let Claim::Acquired(slow) = store.claim(&key, None, short).await.expect("claim") else {
        panic!("a new key is acquired");
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    store
        .complete(&key, &slow, STORED, short)
        .await
        .expect("a late complete without a takeover is recorded");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let exists: i64 = command(
        &mut connection,
        &[b"EXISTS", store.redis_key(&key).as_bytes()],
    )
    .await;
    assert_eq!(
        exists, 0,
        "Redis deleted the completed record after its ttl"
    );

    // A holder whose lease ran out and was taken over is fenced off.
    let Claim::Acquired(old) = store.claim(&key, None, short).await.expect("claim") else {
        panic!("a deleted key is acquired");
    };
    assert_eq!(old.fence(), 1, "a record Redis deleted starts again at 1");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let Claim::Acquired(taker) = store.claim(&key, None, short).await.expect("claim") else {
        panic!("a key whose lease ran out is taken over");
    };
    assert_eq!(taker.fence(), 2);
    match store.complete(&key, &old, b"late", TTL).await {
        Err(Error::LeaseLost { fence: 1, .. }) => {}
        other => panic!("complete after a takeover: {other:?}"),
    }
    store.release(&key, &taker).await.expect("release");

    let Claim::Acquired(new) = store.claim(&key, None, LEASE).await.expect("claim") else {
        panic!("a released key is acquired");
    };
    assert_eq!(
        new.fence(),
        3,
        "a released record is kept and its fence rises"
    );
    store
        .complete(&key, &new, STORED, short)
        .await
        .expect("complete");
    assert_eq!(
        store.claim(&key, None, LEASE).await.expect("claim"),
        Claim::Completed(STORED.to_vec())
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        matches!(
            store.claim(&key, None, LEASE).await,
            Ok(Claim::Acquired(ref lease)) if lease.fence() == 1
        ),
        "the completed record is gone after its ttl"
    );
}

/// 64 claimers spread over 8 stores, each on its own connection (4 connection managers, 4
/// multiplexed connections): exactly one acquires; after it completes, all 64 replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claimers_on_8_connections_acquire_once() {
    const CLAIMERS: usize = 64;
    let Some(client) = client().await else {
        return;
    };
    let cleanup = Cleanup::fresh();
    let mut stores: Vec<Arc<dyn DynClaim>> = Vec::new();
    for i in 0..8 {
        if i % 2 == 0 {
            let connection = ConnectionManager::new(client.clone())
                .await
                .expect("a connection manager");
            stores.push(Arc::new(
                RedisStore::new(connection)
                    .with_prefix(&cleanup.prefix)
                    .expect("prefix"),
            ));
        } else {
            let connection = client
                .get_multiplexed_async_connection()
                .await
                .expect("a multiplexed connection");
            stores.push(Arc::new(
                RedisStore::new(connection)
                    .with_prefix(&cleanup.prefix)
                    .expect("prefix"),
            ));
        }
    }
    let key = key("contended");
    let fingerprint = Fingerprint::of("payload").expect("a string serializes");

    let claim_all = |stores: Vec<Arc<dyn DynClaim>>| {
        let key = key.clone();
        async move {
            let start = Arc::new(Barrier::new(CLAIMERS));
            let tasks: Vec<_> = (0..CLAIMERS)
                .map(|i| {
                    let store = Arc::clone(&stores[i % stores.len()]);
                    let start = Arc::clone(&start);
                    let key = key.clone();
                    tokio::spawn(async move {
                        start.wait().await;
                        store.claim_dyn(key, fingerprint).await
                    })
                })
                .collect();
            let mut claims = Vec::new();
            for task in tasks {
                claims.push(task.await.expect("a claiming task panicked"));
            }
            claims
        }
    };

    let claims = claim_all(stores.clone()).await;
    let leases: Vec<_> = claims
        .iter()
        .filter_map(|found| match found {
            Claim::Acquired(lease) => Some(lease.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(leases.len(), 1, "claims that acquired: {claims:?}");
    assert_eq!(leases[0].fence(), 1);
    assert_eq!(
        claims
            .iter()
            .filter(|found| matches!(found, Claim::InProgress { .. }))
            .count(),
        CLAIMERS - 1,
        "the others see the key in progress"
    );

    stores[3].complete_dyn(key.clone(), leases[0].clone()).await;
    for found in claim_all(stores).await {
        assert_eq!(found, Claim::Completed(STORED.to_vec()));
    }
}

/// Object-safe access to stores on different connection types, for spreading claims.
trait DynClaim: Send + Sync {
    fn claim_dyn(
        &self,
        key: RecordKey,
        fingerprint: Fingerprint,
    ) -> std::pin::Pin<Box<dyn Future<Output = Claim> + Send + '_>>;
    fn complete_dyn(
        &self,
        key: RecordKey,
        lease: Lease,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

impl<C> DynClaim for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn claim_dyn(
        &self,
        key: RecordKey,
        fingerprint: Fingerprint,
    ) -> std::pin::Pin<Box<dyn Future<Output = Claim> + Send + '_>> {
        Box::pin(async move {
            self.claim(&key, Some(&fingerprint), LEASE)
                .await
                .expect("claim")
        })
    }

    fn complete_dyn(
        &self,
        key: RecordKey,
        lease: Lease,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            self.complete(&key, &lease, STORED, TTL)
                .await
                .expect("complete");
        })
    }
}

/// A store built with `connect`, one on a `ConnectionManager` and one on a
/// `MultiplexedConnection` share their records when they share a prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_manager_and_multiplexed_connection_share_records() {
    let (Some(manager), Some(multiplexed)) = (manager().await, multiplexed().await) else {
        return;
    };
    let cleanup = Cleanup::fresh();
    let connected = RedisStore::connect(&url())
        .await
        .expect("connect")
        .with_prefix(&cleanup.prefix)
        .expect("prefix");
    let on_manager: RedisStore<ConnectionManager> = RedisStore::new(manager)
        .with_prefix(&cleanup.prefix)
        .expect("prefix");
    let on_multiplexed = RedisStore::new(multiplexed)
        .with_prefix(&cleanup.prefix)
        .expect("prefix");

    let (first, _) = completed_key(&connected, "via-connect", None).await;
    let (second, _) = completed_key(&on_manager, "via-manager", None).await;
    let (third, _) = completed_key(&on_multiplexed, "via-multiplexed", None).await;
    for key in [&first, &second, &third] {
        for (name, found) in [
            ("connect", connected.claim(key, None, LEASE).await),
            ("manager", on_manager.claim(key, None, LEASE).await),
            ("multiplexed", on_multiplexed.claim(key, None, LEASE).await),
        ] {
            assert_eq!(
                found.expect("claim"),
                Claim::Completed(STORED.to_vec()),
                "{key} through the {name} store"
            );
        }
    }
}

/// A server that does not answer is a store error, not a panic or a hang.
#[tokio::test]
async fn unreachable_server_is_a_store_error() {
    for url in ["redis://127.0.0.1:1/", "not a url"] {
        let connecting = tokio::time::timeout(Duration::from_secs(60), RedisStore::connect(url));
        match connecting.await {
            Ok(Err(Error::Store(error))) => assert_eq!(error.backend(), "redis"),
            Ok(other) => panic!("connect to {url}: expected Err(Store), got {other:?}"),
            Err(_) => panic!("connect to {url} did not give up within 60 s"),
        }
    }
}

/// A purge deletes expired records under its own prefix only: not those of a prefix that
/// extends it (`p:sub`) or shares its start (`px`), not other keys under `p:`, and not records
/// it cannot read. Batches larger than one `SCAN` page count exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purge_stays_inside_its_prefix_and_counts_exactly_across_scan_pages() {
    let Some(mut connection) = multiplexed().await else {
        return;
    };
    let cleanup = Cleanup::fresh();
    let clock = ManualClock::new(START_MILLIS);
    let store = |prefix: &str| {
        RedisStore::new(connection.clone())
            .with_prefix(prefix)
            .expect("prefix")
            .with_clock(clock.clone())
    };
    let own = store(&cleanup.prefix);
    let nested = store(&format!("{}:sub", cleanup.prefix));
    let longer = store(&format!("{}x", cleanup.prefix));
    let _longer_cleanup = Cleanup {
        prefix: longer.prefix().to_owned(),
    };

    for i in 0..2_500 {
        acquire(&own, &key(&format!("own-{i}")), None).await;
    }
    for other in [&nested, &longer] {
        for i in 0..3 {
            acquire(other, &key(&format!("other-{i}")), None).await;
        }
    }
    let plain = format!("{}:not-a-record", cleanup.prefix);
    command::<()>(&mut connection, &[b"SET", plain.as_bytes(), b"x"]).await;
    let (corrupt, _) = completed_key(&own, "corrupt", None).await;
    command::<()>(
        &mut connection,
        &[
            b"HSET",
            own.redis_key(&corrupt).as_bytes(),
            b"expires_at",
            b"soon",
        ],
    )
    .await;
    let wrong_type = own.redis_key(&key("wrong-type"));
    command::<()>(&mut connection, &[b"SET", wrong_type.as_bytes(), b"x"]).await;

    clock.advance(LEASE + Duration::from_secs(1));
    assert_eq!(own.purge_expired(1_000).await.expect("purge"), 1_000);
    assert_eq!(own.purge_expired(1_200).await.expect("purge"), 1_200);
    assert_eq!(own.purge_expired(1_000).await.expect("purge"), 300);
    assert_eq!(own.purge_expired(1_000).await.expect("purge"), 0);

    for other in [&nested, &longer] {
        for i in 0..3 {
            let exists: i64 = command(
                &mut connection,
                &[
                    b"EXISTS",
                    other.redis_key(&key(&format!("other-{i}"))).as_bytes(),
                ],
            )
            .await;
            assert_eq!(
                exists,
                1,
                "{} lost a record to another prefix's purge",
                other.prefix()
            );
        }
    }
    for untouched in [plain, own.redis_key(&corrupt), wrong_type] {
        let exists: i64 = command(&mut connection, &[b"EXISTS", untouched.as_bytes()]).await;
        assert_eq!(exists, 1, "the purge deleted {untouched}");
    }
    assert_eq!(nested.purge_expired(100).await.expect("purge"), 3);
    assert_eq!(longer.purge_expired(100).await.expect("purge"), 3);
}

/// Hand-edited hashes: every unreadable field is a decode error naming it, for claim and for
/// the holder's complete, release and extend, and the record is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hand_edited_fields_are_decode_errors() {
    let Some(mut connection) = multiplexed().await else {
        return;
    };
    let store = redis_server::store(connection.clone(), ManualClock::new(START_MILLIS));
    let cases: &[(&str, &[&[u8]], &str)] = &[
        ("fence-text", &[b"HSET", b"fence", b"abc"], "fence"),
        ("fence-zero", &[b"HSET", b"fence", b"0"], "fence"),
        ("fence-float", &[b"HSET", b"fence", b"1.5"], "fence"),
        (
            "fence-huge",
            &[b"HSET", b"fence", b"99999999999999999999"],
            "fence",
        ),
        ("fence-missing", &[b"HDEL", b"fence"], "fence"),
        ("owner-missing", &[b"HDEL", b"owner"], "owner"),
        ("completed-7", &[b"HSET", b"completed", b"7"], "completed"),
        ("completed-missing", &[b"HDEL", b"completed"], "completed"),
        (
            "lease-text",
            &[b"HSET", b"lease_until", b"soon"],
            "lease_until",
        ),
        (
            "lease-exponent",
            &[b"HSET", b"lease_until", b"1e13"],
            "lease_until",
        ),
        ("expires-missing", &[b"HDEL", b"expires_at"], "expires_at"),
        (
            "expires-space",
            &[b"HSET", b"expires_at", b" 1"],
            "expires_at",
        ),
    ];
    for (name, edit, mentions) in cases {
        let key = key(name);
        let lease = acquire(&store, &key, None).await;
        let redis_key = store.store.redis_key(&key);
        let mut args = vec![edit[0], redis_key.as_bytes()];
        args.extend_from_slice(&edit[1..]);
        command::<()>(&mut connection, &args).await;
        let before = fields(&mut connection, &redis_key).await;

        let what = format!("{name}: claim");
        assert_decode_error(store.claim(&key, None, LEASE).await, &key, mentions, &what);
        let what = format!("{name}: complete");
        let done = store.complete(&key, &lease, STORED, TTL).await;
        assert_decode_error(done, &key, mentions, &what);
        let what = format!("{name}: release");
        assert_decode_error(store.release(&key, &lease).await, &key, mentions, &what);
        let what = format!("{name}: extend");
        let extended = store.extend(&key, &lease, LEASE).await;
        assert_decode_error(extended, &key, mentions, &what);
        assert_eq!(
            fields(&mut connection, &redis_key).await,
            before,
            "{name}: a failed operation changed the record"
        );
    }

    let (no_result, lease) = completed_key(&store, "no-result", None).await;
    let redis_key = store.store.redis_key(&no_result);
    command::<()>(&mut connection, &[b"HDEL", redis_key.as_bytes(), b"result"]).await;
    assert_decode_error(
        store.claim(&no_result, None, LEASE).await,
        &no_result,
        "no result",
        "a completed record without a result",
    );
    assert_decode_error(
        store.complete(&no_result, &lease, STORED, TTL).await,
        &no_result,
        "no result",
        "complete of a completed record without a result",
    );
}

/// A key that holds a string, list or set is `WRONGTYPE`: a decode error for every operation,
/// never a store error, and the key is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_of_the_wrong_type_is_a_decode_error() {
    let Some(mut connection) = multiplexed().await else {
        return;
    };
    let store = redis_server::store(connection.clone(), ManualClock::new(START_MILLIS));
    let writes: [(&str, &[&[u8]]); 3] = [
        ("string", &[b"SET", b"x"]),
        ("list", &[b"RPUSH", b"a", b"b"]),
        ("set", &[b"SADD", b"m"]),
    ];
    for (kind, write) in writes {
        let key = key(&format!("wrong-type-{kind}"));
        let lease = acquire(&store, &key, None).await;
        let redis_key = store.store.redis_key(&key);
        command::<()>(&mut connection, &[b"DEL", redis_key.as_bytes()]).await;
        let mut args = vec![write[0], redis_key.as_bytes()];
        args.extend_from_slice(&write[1..]);
        command::<()>(&mut connection, &args).await;

        let what = format!("a {kind}");
        assert_decode_error(
            store.claim(&key, None, LEASE).await,
            &key,
            "WRONGTYPE",
            &what,
        );
        assert_decode_error(
            store.complete(&key, &lease, STORED, TTL).await,
            &key,
            "WRONGTYPE",
            &what,
        );
        assert_decode_error(store.release(&key, &lease).await, &key, "WRONGTYPE", &what);
        assert_decode_error(
            store.extend(&key, &lease, LEASE).await,
            &key,
            "WRONGTYPE",
            &what,
        );
        let kind_now: String = command(&mut connection, &[b"TYPE", redis_key.as_bytes()]).await;
        assert_eq!(kind_now, kind, "the {kind} was changed");
    }
    assert_eq!(
        store
            .purge_expired(100)
            .await
            .expect("purge skips keys of another type"),
        0
    );
}

/// A hash under a record's key that holds none of the record's fields is not taken for a free
/// key (the scripts tell "no key" from "no `completed` field"): a decode error for every
/// operation, and the hash is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hash_without_record_fields_is_a_decode_error() {
    let Some(mut connection) = multiplexed().await else {
        return;
    };
    let store = redis_server::store(connection.clone(), ManualClock::new(START_MILLIS));
    let key = key("foreign-hash");
    let lease = acquire(&store, &key, None).await;
    let redis_key = store.store.redis_key(&key);
    command::<()>(&mut connection, &[b"DEL", redis_key.as_bytes()]).await;
    command::<()>(
        &mut connection,
        &[b"HSET", redis_key.as_bytes(), b"theirs", b"1"],
    )
    .await;
    let before = fields(&mut connection, &redis_key).await;

    let what = "a hash without the record's fields";
    assert_decode_error(
        store.claim(&key, None, LEASE).await,
        &key,
        "completed",
        what,
    );
    let done = store.complete(&key, &lease, STORED, TTL).await;
    assert_decode_error(done, &key, "completed", what);
    assert_decode_error(store.release(&key, &lease).await, &key, "completed", what);
    let extended = store.extend(&key, &lease, LEASE).await;
    assert_decode_error(extended, &key, "completed", what);
    assert_eq!(fields(&mut connection, &redis_key).await, before);
}

/// Forwards every command, but sends the first `EVALSHA` with the SHA-1 of no script: the
/// server answers `NOSCRIPT`, as one that never saw the script (restarted, flushed, a promoted
/// replica) would. Records the name of every command it sent.
#[derive(Clone)]
struct UnknownScriptOnce {
    inner: MultiplexedConnection,
    forged: Arc<std::sync::atomic::AtomicBool>,
    sent: Arc<std::sync::Mutex<Vec<String>>>,
}

impl ConnectionLike for UnknownScriptOnce {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        let args: Vec<&[u8]> = cmd
            .args_iter()
            .filter_map(|arg| match arg {
                redis::Arg::Simple(arg) => Some(arg),
                _ => None,
            })
            .collect();
        let name = String::from_utf8_lossy(args[0]).to_uppercase();
        self.sent
            .lock()
            .expect("the log of commands")
            .push(name.clone());
        if name == "EVALSHA" && !self.forged.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let mut forged = redis::cmd("EVALSHA");
            forged.arg("0".repeat(40));
            for arg in &args[2..] {
                forged.arg(*arg);
            }
            return Box::pin(async move { self.inner.req_packed_command(&forged).await });
        }
        self.inner.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        self.inner.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// A server that does not know the script answers `NOSCRIPT`: the store loads the script with
/// `SCRIPT LOAD` on the same connection, sends the operation again, and it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_script_is_loaded_and_sent_again() {
    let Some(connection) = multiplexed().await else {
        return;
    };
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    let connection = UnknownScriptOnce {
        inner: connection,
        forged: Arc::default(),
        sent: Arc::clone(&sent),
    };
    let store = redis_server::store(connection, ManualClock::new(START_MILLIS));
    let (key, _) = completed_key(&store, "noscript", None).await;
    assert_eq!(
        *sent.lock().expect("the log of commands"),
        ["EVALSHA", "SCRIPT", "EVALSHA", "EVALSHA"],
        "claim: NOSCRIPT, load, again; complete"
    );
    assert_eq!(
        store.claim(&key, None, LEASE).await.expect("replay"),
        Claim::Completed(STORED.to_vec())
    );
}

/// A stored fingerprint of the wrong length is a decode error when a claim compares it; a
/// claim without a fingerprint does not read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_fingerprint_is_a_decode_error_when_compared() {
    let Some(mut connection) = multiplexed().await else {
        return;
    };
    let store = redis_server::store(connection.clone(), ManualClock::new(START_MILLIS));
    let fingerprint = Fingerprint::of("payload").expect("a string serializes");
    let (key, _) = completed_key(&store, "fingerprint-1-byte", Some(&fingerprint)).await;
    let redis_key = store.store.redis_key(&key);
    command::<()>(
        &mut connection,
        &[b"HSET", redis_key.as_bytes(), b"fingerprint", b"\x01"],
    )
    .await;
    assert_decode_error(
        store.claim(&key, Some(&fingerprint), LEASE).await,
        &key,
        "fingerprint",
        "a 1-byte fingerprint",
    );
    assert_eq!(
        store.claim(&key, None, LEASE).await.expect("claim"),
        Claim::Completed(STORED.to_vec()),
        "a claim without a fingerprint does not read the stored one"
    );
}

/// The store hands stored bytes back as they are: decoding them is the handler's job, and
/// there garbage becomes `Error::Decode` without running the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_result_is_replayed_raw_and_fails_to_decode_in_run() {
    let Some(mut connection) = multiplexed().await else {
        return;
    };
    let store = redis_server::store(connection.clone(), ManualClock::new(START_MILLIS));
    let (key, _) = completed_key(&store, "garbage-result", None).await;
    let redis_key = store.store.redis_key(&key);
    command::<()>(
        &mut connection,
        &[b"HSET", redis_key.as_bytes(), b"result", b"\xff\x00"],
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

/// The card's handler over Redis: a duplicate delivery replays the first receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_delivery_replays_through_a_handler() {
    let Some(connection) = manager().await else {
        return;
    };
    let store = redis_server::store(connection, idem_runtime::clock::SystemClock);
    let runs = Runs::default();
    let first = credit_points(&store, &runs, OrderPaid::new("A-1001", 250))
        .await
        .expect("the first delivery");
    let again = credit_points(&store, &runs, OrderPaid::new("A-1001", 250))
        .await
        .expect("the duplicate");
    assert_eq!(first, again, "the duplicate got the first receipt");
    assert_eq!(runs.count(), 1, "the body ran once");
}

/// Leases and ttls of `Duration::MAX` work: deadlines are kept where Lua compares them exactly
/// (2^53 - 1 ms) instead of being rejected or wrapping.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endless_leases_and_ttls_are_clamped() {
    let Some(mut connection) = multiplexed().await else {
        return;
    };
    let clock = ManualClock::new(START_MILLIS);
    let store = redis_server::store(connection.clone(), clock.clone());
    let key = key("endless");
    let Claim::Acquired(lease) = store.claim(&key, None, Duration::MAX).await.expect("claim")
    else {
        panic!("a new key is acquired");
    };
    assert_eq!(lease.until_millis(), (1 << 53) - 1);
    clock.advance(Duration::from_secs(100 * 365 * 24 * 3600));
    assert!(
        matches!(
            store.claim(&key, None, LEASE).await,
            Ok(Claim::InProgress { .. })
        ),
        "an endless lease still runs a century later"
    );
    store
        .complete(&key, &lease, STORED, Duration::MAX)
        .await
        .expect("complete with an endless ttl");
    assert_eq!(
        store.claim(&key, None, LEASE).await.expect("claim"),
        Claim::Completed(STORED.to_vec())
    );
    let ttl = pttl(&mut connection, &store.store.redis_key(&key)).await;
    assert!(ttl > 1 << 50, "PTTL {ttl} of an endless ttl");
}
