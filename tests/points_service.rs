//! The points service of `idem-examples`, for real: `OrderPaid` events on a Redis Stream (and
//! on the in-process `MemoryStream`), consumed by a consumer group, credited with
//! `#[idempotent(strategy = "tx")]` on SQLite (a file), PostgreSQL and MariaDB.
//!
//! Every crediting scenario runs on each stream × database pair, on fresh tables, a fresh idem
//! table and a fresh stream key, removed afterwards. The stream semantics the consumer relies
//! on (pending entries, ack, autoclaim) are checked on both streams alike.

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_examples::events::OrderPaid;
use idem_examples::points::{
    Consumer, Counters, Credit, Disposition, GROUP, Outcome, Points, PointsDb, PointsError, Tables,
    Tally,
};
use idem_examples::stream::{
    EventStream, MemoryStream, Pending, RedisStream, SCAN_START, StreamError,
};
use idem_runtime::clock::ManualClock;
use idem_runtime::{Claim, Error, Store};
use idem_tests::servers::unique_name;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The longest a test waits for consumers to get somewhere before it fails.
const WAIT: Duration = Duration::from_secs(20);
/// How long an entry stays pending before a consumer takes it over, in these tests.
const MIN_IDLE: Duration = Duration::from_millis(300);
/// How long a consumer's read waits for new entries, in these tests.
const BLOCK: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------------
// Databases

/// The points of one test on fresh tables (and a fresh idem table), removed when dropped; the
/// idem store runs on `clock`.
struct Db<DB: PointsDb> {
    points: Arc<Points<DB>>,
    clock: ManualClock,
    _guards: Vec<Box<dyn Any + Send + Sync>>,
}

impl<DB: PointsDb> Db<DB> {
    async fn new(
        store: DB::Store,
        prefix: &str,
        clock: ManualClock,
        guards: Vec<Box<dyn Any + Send + Sync>>,
    ) -> Self {
        let tables = Tables::with_prefix(prefix).expect("a unique name is a plain prefix");
        let points = Arc::new(Points::with_tables(store, tables));
        let db = Self {
            points,
            clock,
            _guards: guards,
        };
        db.points.migrate().await.expect("create the tables");
        db
    }
}

/// A clock at the real time, which moves only when told to.
fn clock() -> ManualClock {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    ManualClock::new(i64::try_from(now).expect("in range"))
}

async fn sqlite() -> Option<Db<sqlx::Sqlite>> {
    let file = idem_tests::sqlite_file::TempDb::new("points");
    let clock = clock();
    let store = idem_runtime::sqlite::SqliteStore::connect(&file.url())
        .await
        .expect("open the SQLite file")
        .with_clock(clock.clone());
    Some(Db::new(store, &unique_name("points"), clock, vec![Box::new(file)]).await)
}

/// Guards that drop the points tables and the idem table of `prefix` on `server`.
fn drop_tables(
    server: idem_tests::sql_servers::Server,
    prefix: &str,
) -> Vec<Box<dyn Any + Send + Sync>> {
    ["idem", "ledger", "balances"]
        .into_iter()
        .map(|table| {
            Box::new(idem_tests::sql_servers::DropTable {
                server,
                table: format!("{prefix}_{table}"),
            }) as Box<dyn Any + Send + Sync>
        })
        .collect()
}

async fn postgres() -> Option<Db<sqlx::Postgres>> {
    let pool = idem_tests::sql_servers::postgres_pool().await?;
    let (prefix, clock) = (unique_name("points"), clock());
    let guards = drop_tables(idem_tests::sql_servers::Server::Postgres, &prefix);
    let store = idem_runtime::postgres::PostgresStore::new(pool)
        .with_table(&format!("{prefix}_idem"))
        .expect("a plain table name")
        .with_clock(clock.clone());
    Some(Db::new(store, &prefix, clock, guards).await)
}

async fn mysql() -> Option<Db<sqlx::MySql>> {
    let pool = idem_tests::sql_servers::mysql_pool().await?;
    let (prefix, clock) = (unique_name("points"), clock());
    let guards = drop_tables(idem_tests::sql_servers::Server::Mysql, &prefix);
    let store = idem_runtime::mysql::MySqlStore::new(pool)
        .with_table(&format!("{prefix}_idem"))
        .expect("a plain table name")
        .with_clock(clock.clone());
    Some(Db::new(store, &prefix, clock, guards).await)
}

// ---------------------------------------------------------------------------------------------
// Streams

/// One stream of a test, and handles on it.
trait Streams: Send + Sync + 'static {
    type Stream: EventStream + 'static;

    /// A handle of its own on the stream: a connection of its own for Redis (a blocking read
    /// holds its connection), a clone for the memory stream.
    fn open(&self) -> impl Future<Output = Self::Stream> + Send;
}

/// A fresh key on the test Redis, deleted when dropped.
struct RedisStreams {
    key: String,
    _cleanup: idem_tests::redis_server::Cleanup,
}

impl Streams for RedisStreams {
    type Stream = RedisStream;

    async fn open(&self) -> RedisStream {
        RedisStream::connect(&idem_tests::redis_server::url(), &self.key)
            .await
            .expect("connect to the Redis that answered PING")
    }
}

async fn redis() -> Option<RedisStreams> {
    idem_tests::redis_server::client().await?;
    let cleanup = idem_tests::redis_server::Cleanup::fresh();
    Some(RedisStreams {
        key: format!("{}:orders.paid", cleanup.prefix),
        _cleanup: cleanup,
    })
}

/// A fresh in-process stream.
struct MemoryStreams(MemoryStream);

impl Streams for MemoryStreams {
    type Stream = MemoryStream;

    async fn open(&self) -> MemoryStream {
        self.0.clone()
    }
}

async fn memory() -> Option<MemoryStreams> {
    Some(MemoryStreams(MemoryStream::new("orders.paid")))
}

// ---------------------------------------------------------------------------------------------
// Consumers

/// A consumer `name` with the tests' timings.
fn consumer<S: EventStream, DB: PointsDb>(stream: S, db: &Db<DB>, name: &str) -> Consumer<S, DB> {
    Consumer::new(stream, db.points.clone(), GROUP, name)
        .block(BLOCK)
        .min_idle(MIN_IDLE)
        .retry_pause(Duration::from_millis(50))
}

/// A consumer running on a task of its own.
struct Running {
    counters: Counters,
    stop: CancellationToken,
    task: JoinHandle<Tally>,
}

fn start<S, DB>(consumer: Consumer<S, DB>) -> Running
where
    S: EventStream + 'static,
    DB: PointsDb,
{
    let stop = CancellationToken::new();
    let counters = consumer.counters().clone();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { consumer.run(stop).await }
    });
    Running {
        counters,
        stop,
        task,
    }
}

impl Running {
    /// Stops the consumer gracefully and returns its counts.
    async fn stop(self) -> Tally {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the consumer stops when told to")
            .expect("the consumer did not panic")
    }
}

/// Waits until `counters` satisfy `done`, or fails the test saying `what` did not happen.
async fn wait_for(counters: &Counters, what: &str, done: impl FnMut(&Tally) -> bool) -> Tally {
    match tokio::time::timeout(WAIT, counters.wait_for(done)).await {
        Ok(tally) => tally,
        Err(_) => panic!("{what}: not within {WAIT:?}; counters: {}", counters.get()),
    }
}

fn points_of(event: &OrderPaid) -> i64 {
    i64::try_from(event.points()).expect("in range")
}

/// `event` was credited once, by the entry `entry_id`: one ledger row, the balance once.
async fn assert_credited_once<DB: PointsDb>(db: &Db<DB>, event: &OrderPaid, entry_id: &str) {
    let ledger = db
        .points
        .ledger(event.user_id)
        .await
        .expect("read the ledger");
    assert_eq!(
        ledger,
        vec![Credit {
            order_no: event.order_no.clone(),
            user_id: event.user_id,
            points: points_of(event),
            entry_id: entry_id.to_owned(),
        }],
        "one ledger row, written by entry {entry_id}"
    );
    assert_eq!(
        db.points
            .balance(event.user_id)
            .await
            .expect("read the balance"),
        points_of(event),
        "the balance was credited once"
    );
}

async fn pending<S: EventStream>(stream: &S) -> Vec<Pending> {
    stream.pending(GROUP, 1000).await.expect("XPENDING")
}

// ---------------------------------------------------------------------------------------------
// Crediting scenarios, each run on every stream × database pair

/// The producer resends the event twice (new entries, the same order) and the first entry
/// comes again after its ack was lost: one ledger row, the balance credited once, every entry
/// acknowledged.
async fn resends_and_a_redelivery_credit_once<T: Streams, DB: PointsDb>(streams: T, db: Db<DB>) {
    let producer = streams.open().await;
    producer
        .create_group(GROUP)
        .await
        .expect("create the group");
    let paid = OrderPaid::new("A-1001", 7, 12_345);

    let first = paid.publish(&producer).await.expect("publish");
    // A consumer reads the entry and credits it, but dies before its ack reaches Redis.
    let read = producer
        .read_group(GROUP, "lost-ack", 10, Duration::ZERO)
        .await
        .expect("read");
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].id, first);
    let credited = db.points.credit(&first, &paid).await.expect("credit");
    assert!(matches!(credited, Outcome::Credited(_)), "{credited:?}");
    // The producer did not hear back either, and resends twice.
    let second = paid.publish(&producer).await.expect("resend");
    let third = paid.publish(&producer).await.expect("resend");
    assert!(
        first != second && second != third,
        "resends are new entries"
    );

    let running = start(consumer(streams.open().await, &db, "points-1"));
    // Only the new entries at first; the lost ack's entry once it has been idle long enough.
    wait_for(&running.counters, "three duplicates acked", |t| {
        t.replayed == 3
    })
    .await;
    let tally = running.stop().await;
    assert_eq!(
        tally,
        Tally {
            delivered: 3,
            credited: 0,
            replayed: 3,
            in_ledger: 0,
            not_acked: 0,
            dead_lettered: 0,
        }
    );
    assert_credited_once(&db, &paid, &first).await;
    assert_eq!(pending(&producer).await, vec![], "every entry acknowledged");
}

/// 64 copies of one event on the stream, consumed by 4 consumers at once (sharing the
/// counters): credited once, every copy acknowledged.
async fn copies_on_four_consumers_credit_once<T: Streams, DB: PointsDb>(streams: T, db: Db<DB>) {
    let producer = streams.open().await;
    producer
        .create_group(GROUP)
        .await
        .expect("create the group");
    let paid = OrderPaid::new("A-1004", 8, 25_000);
    let mut ids = Vec::new();
    for _ in 0..64 {
        ids.push(paid.publish(&producer).await.expect("publish"));
    }

    let counters = Counters::new();
    let mut running = Vec::new();
    for n in 1..=4 {
        // Small batches, so that the copies spread over the consumers; nobody dies here, so
        // no entry is taken over from a live consumer.
        let consumer = consumer(streams.open().await, &db, &format!("points-{n}"))
            .batch(4)
            .min_idle(WAIT)
            .with_counters(counters.clone());
        running.push(start(consumer));
    }
    wait_for(&counters, "64 copies acknowledged", |t| {
        t.credited + t.replayed == 64
    })
    .await;
    for consumer in running {
        consumer.stop().await;
    }
    assert_eq!(
        counters.get(),
        Tally {
            delivered: 64,
            credited: 1,
            replayed: 63,
            in_ledger: 0,
            not_acked: 0,
            dead_lettered: 0,
        }
    );
    let ledger = db
        .points
        .ledger(paid.user_id)
        .await
        .expect("read the ledger");
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert!(ids.contains(&ledger[0].entry_id));
    assert_credited_once(&db, &paid, &ledger[0].entry_id).await;
    assert_eq!(pending(&producer).await, vec![], "every copy acknowledged");
}

/// A consumer is killed mid-handler: its transaction has written the ledger row and the
/// balance but not committed. The entry stays pending on it; another consumer takes it over
/// once it has been idle for `MIN_IDLE`, and credits it once — the killed transaction rolled
/// back.
async fn consumer_killed_mid_handler_is_taken_over<T: Streams, DB: PointsDb>(
    streams: T,
    db: Db<DB>,
) {
    let producer = streams.open().await;
    producer
        .create_group(GROUP)
        .await
        .expect("create the group");
    let paid = OrderPaid::new("A-1006", 9, 7_000);
    let reached = db.points.stall_next_credit(&paid.order_no);
    let entry = paid.publish(&producer).await.expect("publish");

    let doomed = start(consumer(streams.open().await, &db, "doomed"));
    tokio::time::timeout(WAIT, reached.notified())
        .await
        .expect("the doomed consumer reaches the middle of its handler");
    doomed.task.abort();
    assert!(
        doomed.task.await.expect_err("aborted").is_cancelled(),
        "the consumer was killed"
    );
    let left = pending(&producer).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        (
            left[0].id.as_str(),
            left[0].consumer.as_str(),
            left[0].deliveries
        ),
        (entry.as_str(), "doomed", 1),
        "the entry stays pending on the killed consumer"
    );

    let survivor = start(consumer(streams.open().await, &db, "survivor"));
    wait_for(&survivor.counters, "the survivor credits the entry", |t| {
        t.credited == 1
    })
    .await;
    let tally = survivor.stop().await;
    assert_eq!(
        tally,
        Tally {
            delivered: 1,
            credited: 1,
            replayed: 0,
            in_ledger: 0,
            not_acked: 0,
            dead_lettered: 0,
        }
    );
    assert_credited_once(&db, &paid, &entry).await;
    assert_eq!(pending(&producer).await, vec![]);
}

/// Another handle holds the order's claim: the credit is in progress elsewhere. The consumer
/// does not acknowledge the entry, which stays pending and comes back; once the claim is
/// released, the next delivery credits it.
async fn in_progress_is_not_acked_and_credited_later<T: Streams, DB: PointsDb>(
    streams: T,
    db: Db<DB>,
) {
    let producer = streams.open().await;
    producer
        .create_group(GROUP)
        .await
        .expect("create the group");
    let paid = OrderPaid::new("A-1007", 10, 31_000);
    let key = Points::<DB>::record_key(&paid.order_no).expect("a key");
    let store = db.points.store();
    let Claim::Acquired(held) = store
        .claim(&key, None, Duration::from_secs(60))
        .await
        .expect("claim")
    else {
        panic!("the order is new");
    };
    let direct = db.points.credit("direct", &paid).await;
    match &direct {
        Err(error @ PointsError::Idem(Error::InProgress { .. })) => {
            assert_eq!(error.disposition(), Disposition::Retry);
        }
        other => panic!("expected InProgress, got {other:?}"),
    }

    let entry = paid.publish(&producer).await.expect("publish");
    let running = start(consumer(streams.open().await, &db, "points-1"));
    // The first delivery and at least one redelivery, none acknowledged.
    wait_for(&running.counters, "the entry comes back unacked", |t| {
        t.not_acked >= 2
    })
    .await;
    let left = pending(&producer).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        (left[0].id.as_str(), left[0].consumer.as_str()),
        (entry.as_str(), "points-1")
    );
    assert!(left[0].deliveries >= 2, "{left:?}");
    assert_eq!(db.points.balance(paid.user_id).await.expect("balance"), 0);

    store.release(&key, &held).await.expect("release the claim");
    wait_for(&running.counters, "credited after the release", |t| {
        t.credited == 1
    })
    .await;
    let tally = running.stop().await;
    assert_eq!(
        (
            tally.credited,
            tally.replayed,
            tally.in_ledger,
            tally.dead_lettered
        ),
        (1, 0, 0, 0)
    );
    assert_eq!(tally.delivered, tally.not_acked + 1, "{tally}");
    assert_credited_once(&db, &paid, &entry).await;
    assert_eq!(pending(&producer).await, vec![]);
}

/// Entries that cannot be credited are dead-lettered (acknowledged with an error line): an
/// order number reused for another payment, and an entry that is not an `OrderPaid`.
async fn unusable_entries_are_dead_lettered<T: Streams, DB: PointsDb>(streams: T, db: Db<DB>) {
    let producer = streams.open().await;
    producer
        .create_group(GROUP)
        .await
        .expect("create the group");
    let paid = OrderPaid::new("A-1001", 11, 12_000);
    let entry = paid.publish(&producer).await.expect("publish");
    OrderPaid::new("A-1001", 11, 99_900)
        .publish(&producer)
        .await
        .expect("publish the reuse");
    producer.append("{not json").await.expect("append");

    let running = start(consumer(streams.open().await, &db, "points-1"));
    wait_for(&running.counters, "three entries acknowledged", |t| {
        t.credited + t.dead_lettered == 3
    })
    .await;
    let tally = running.stop().await;
    assert_eq!(
        tally,
        Tally {
            delivered: 3,
            credited: 1,
            replayed: 0,
            in_ledger: 0,
            not_acked: 0,
            dead_lettered: 2,
        }
    );
    assert_credited_once(&db, &paid, &entry).await;
    assert_eq!(pending(&producer).await, vec![]);
}

/// idem's record of a credit expires (after 30 days); the ledger's unique order number still
/// stops a second credit, and tells a resend from a reused order number.
async fn ledger_stops_a_credit_idem_forgot<T: Streams, DB: PointsDb>(streams: T, db: Db<DB>) {
    let producer = streams.open().await;
    producer
        .create_group(GROUP)
        .await
        .expect("create the group");
    let paid = OrderPaid::new("A-1008", 12, 4_500);
    let entry = paid.publish(&producer).await.expect("publish");
    let running = start(consumer(streams.open().await, &db, "points-1"));
    wait_for(&running.counters, "credited", |t| t.credited == 1).await;

    db.clock.advance(Duration::from_secs(31 * 24 * 3600));
    let direct = db.points.credit("direct", &paid).await.expect("credit");
    let first = Credit {
        order_no: paid.order_no.clone(),
        user_id: paid.user_id,
        points: 45,
        entry_id: entry.clone(),
    };
    assert_eq!(direct, Outcome::InLedger(first.clone()));
    assert_eq!(
        db.points.credit("direct", &paid).await.expect("credit"),
        Outcome::Replayed(first),
        "recorded again by idem"
    );

    db.clock.advance(Duration::from_secs(31 * 24 * 3600));
    // Forgotten by idem again: a reused order number, then a resend.
    OrderPaid::new("A-1008", 12, 9_900)
        .publish(&producer)
        .await
        .expect("publish the reuse");
    paid.publish(&producer).await.expect("resend");
    wait_for(&running.counters, "both acknowledged", |t| {
        t.in_ledger == 1 && t.dead_lettered == 1
    })
    .await;
    let tally = running.stop().await;
    assert_eq!(
        (tally.credited, tally.replayed, tally.not_acked),
        (1, 0, 0),
        "{tally}"
    );
    assert_credited_once(&db, &paid, &entry).await;
    assert_eq!(pending(&producer).await, vec![]);
}

/// With `max_deliveries`, an entry that keeps failing (here: in progress elsewhere for good)
/// is dead-lettered once it has been delivered more often than that, and nothing is credited.
async fn max_deliveries_dead_letters_an_entry_that_keeps_failing<T: Streams, DB: PointsDb>(
    streams: T,
    db: Db<DB>,
) {
    let producer = streams.open().await;
    producer
        .create_group(GROUP)
        .await
        .expect("create the group");
    let paid = OrderPaid::new("A-1009", 13, 5_000);
    let key = Points::<DB>::record_key(&paid.order_no).expect("a key");
    let held = db
        .points
        .store()
        .claim(&key, None, Duration::from_secs(60))
        .await
        .expect("claim");
    assert!(matches!(held, Claim::Acquired(_)), "{held:?}");
    paid.publish(&producer).await.expect("publish");

    let running = start(consumer(streams.open().await, &db, "points-1").max_deliveries(Some(2)));
    wait_for(&running.counters, "dead-lettered", |t| t.dead_lettered == 1).await;
    let tally = running.stop().await;
    assert_eq!(
        tally,
        Tally {
            delivered: 3,
            credited: 0,
            replayed: 0,
            in_ledger: 0,
            not_acked: 2,
            dead_lettered: 1,
        }
    );
    assert_eq!(db.points.balance(paid.user_id).await.expect("balance"), 0);
    assert_eq!(
        pending(&producer).await,
        vec![],
        "the dead letter was acknowledged"
    );
}

/// Each scenario on each stream × database pair: `$streams` and `$db` give `None` (after
/// saying so, or failing with `IDEM_REQUIRE_SERVERS=1`) when their server is not there.
macro_rules! scenarios {
    ($($module:ident: $streams:ident, $db:ident;)*) => {$(
        mod $module {
            scenarios!(@each $streams $db
                resends_and_a_redelivery_credit_once
                copies_on_four_consumers_credit_once
                consumer_killed_mid_handler_is_taken_over
                in_progress_is_not_acked_and_credited_later
                unusable_entries_are_dead_lettered
                ledger_stops_a_credit_idem_forgot
                max_deliveries_dead_letters_an_entry_that_keeps_failing
            );
        }
    )*};
    (@each $streams:ident $db:ident $($scenario:ident)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $scenario() {
            let Some(streams) = super::$streams().await else {
                return;
            };
            let Some(db) = super::$db().await else {
                return;
            };
            super::$scenario(streams, db).await;
        }
    )*};
}

scenarios! {
    redis_sqlite: redis, sqlite;
    redis_postgres: redis, postgres;
    redis_mysql: redis, mysql;
    memory_sqlite: memory, sqlite;
    memory_postgres: memory, postgres;
    memory_mysql: memory, mysql;
}

// ---------------------------------------------------------------------------------------------
// Stream semantics, the same on Redis and in memory

/// Each new entry goes to one consumer of the group and stays pending on it, with one
/// delivery, until it is acknowledged; a group reads entries appended before it was created,
/// and creating it again changes nothing.
async fn group_hands_each_entry_to_one_consumer<T: Streams>(streams: T) {
    let stream = streams.open().await;
    let a = stream.append("a").await.expect("append");
    stream.create_group(GROUP).await.expect("create the group");
    let b = stream.append("b").await.expect("append");
    let c = stream.append("c").await.expect("append");
    stream
        .create_group(GROUP)
        .await
        .expect("creating it again is fine");

    let one = stream
        .read_group(GROUP, "c1", 2, Duration::ZERO)
        .await
        .expect("read");
    let two = stream
        .read_group(GROUP, "c2", 10, Duration::ZERO)
        .await
        .expect("read");
    let none = stream
        .read_group(GROUP, "c1", 10, Duration::ZERO)
        .await
        .expect("read");
    let ids = |entries: &[idem_examples::stream::Entry]| {
        entries.iter().map(|e| e.id.clone()).collect::<Vec<_>>()
    };
    assert_eq!(ids(&one), [a.clone(), b.clone()]);
    assert_eq!(ids(&two), std::slice::from_ref(&c));
    assert!(none.is_empty(), "{none:?}");
    assert_eq!(one[0].event.as_deref(), Some("a"));
    assert!(one.iter().chain(&two).all(|e| e.deliveries == 1));

    let owners: Vec<_> = pending(&stream)
        .await
        .into_iter()
        .map(|p| (p.id, p.consumer, p.deliveries))
        .collect();
    assert_eq!(
        owners,
        [
            (a.clone(), "c1".to_owned(), 1),
            (b.clone(), "c1".to_owned(), 1),
            (c.clone(), "c2".to_owned(), 1)
        ]
    );
    assert!(stream.ack(GROUP, &b).await.expect("ack"));
    assert!(
        !stream.ack(GROUP, &b).await.expect("ack again"),
        "no longer pending"
    );
    let left: Vec<_> = pending(&stream).await.into_iter().map(|p| p.id).collect();
    assert_eq!(left, [a, c]);
}

/// Autoclaim takes over entries idle for `min_idle`, whichever consumer holds them: the
/// owner changes, the delivery count rises, the idle time restarts; the cursor pages through
/// the pending list.
async fn autoclaim_takes_idle_entries_over<T: Streams>(streams: T) {
    let stream = streams.open().await;
    stream.create_group(GROUP).await.expect("create the group");
    let a = stream.append("a").await.expect("append");
    let b = stream.append("b").await.expect("append");
    let read = stream
        .read_group(GROUP, "dead", 10, Duration::ZERO)
        .await
        .expect("read");
    assert_eq!(read.len(), 2);

    let early = stream
        .autoclaim(GROUP, "alive", MIN_IDLE, SCAN_START, 10)
        .await
        .expect("autoclaim");
    assert_eq!(early.entries, vec![], "not idle long enough yet");
    assert_eq!(early.next, None, "the whole list was scanned");

    tokio::time::sleep(MIN_IDLE + Duration::from_millis(50)).await; // let them go idle
    let first = stream
        .autoclaim(GROUP, "alive", MIN_IDLE, SCAN_START, 1)
        .await
        .expect("autoclaim");
    assert_eq!(first.entries.len(), 1);
    assert_eq!(
        (
            first.entries[0].id.as_str(),
            first.entries[0].event.as_deref(),
            first.entries[0].deliveries
        ),
        (a.as_str(), Some("a"), 2)
    );
    let next = first.next.expect("more to scan");
    let second = stream
        .autoclaim(GROUP, "alive", MIN_IDLE, &next, 1)
        .await
        .expect("autoclaim");
    assert_eq!(second.entries.len(), 1);
    assert_eq!(
        (second.entries[0].id.as_str(), second.entries[0].deliveries),
        (b.as_str(), 2)
    );
    assert_eq!(second.next, None);

    let now = pending(&stream).await;
    assert!(
        now.iter()
            .all(|p| p.consumer == "alive" && p.deliveries == 2 && p.idle < MIN_IDLE),
        "{now:?}"
    );
    let again = stream
        .autoclaim(GROUP, "dead", MIN_IDLE, SCAN_START, 10)
        .await
        .expect("autoclaim");
    assert_eq!(
        again.entries,
        vec![],
        "the idle time restarted with the claim"
    );
    assert!(stream.ack(GROUP, &a).await.expect("ack"));
    assert!(stream.ack(GROUP, &b).await.expect("ack"));
    assert_eq!(pending(&stream).await, vec![]);
}

/// A read with nothing to read waits for an append, and returns empty when its block runs
/// out.
async fn blocked_read_returns_what_is_appended<T: Streams>(streams: T) {
    let stream = streams.open().await;
    stream.create_group(GROUP).await.expect("create the group");
    let started = tokio::time::Instant::now();
    let empty = stream
        .read_group(GROUP, "c1", 10, Duration::from_millis(100))
        .await
        .expect("read");
    assert!(empty.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(90), "it waited");

    let reader = {
        let stream = streams.open().await;
        tokio::spawn(async move {
            stream
                .read_group(GROUP, "c1", 10, Duration::from_secs(8))
                .await
        })
    };
    let started = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await; // most likely blocked by now
    let id = stream.append("late").await.expect("append");
    let read = reader.await.expect("task").expect("read");
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].id, id);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "the append woke the read: {:?}",
        started.elapsed()
    );
}

/// Reading, claiming or listing through a group that does not exist is an error; an ack is
/// not (it acknowledges nothing).
async fn missing_group_is_reported<T: Streams>(streams: T) {
    let stream = streams.open().await;
    stream.create_group(GROUP).await.expect("create the group");
    let read = stream.read_group("nobody", "c1", 1, Duration::ZERO).await;
    assert!(matches!(read, Err(StreamError::NoGroup { .. })), "{read:?}");
    let claimed = stream
        .autoclaim("nobody", "c1", Duration::ZERO, SCAN_START, 1)
        .await;
    assert!(
        matches!(claimed, Err(StreamError::NoGroup { .. })),
        "{claimed:?}"
    );
    let listed = stream.pending("nobody", 10).await;
    assert!(
        matches!(listed, Err(StreamError::NoGroup { .. })),
        "{listed:?}"
    );
    assert!(!stream.ack("nobody", "1-0").await.expect("ack"));
    let cursor = stream
        .autoclaim(GROUP, "c1", Duration::ZERO, "not-an-id", 1)
        .await;
    assert!(cursor.is_err(), "{cursor:?}");
}

macro_rules! stream_semantics {
    ($($module:ident: $streams:ident;)*) => {$(
        mod $module {
            stream_semantics!(@each $streams
                group_hands_each_entry_to_one_consumer
                autoclaim_takes_idle_entries_over
                blocked_read_returns_what_is_appended
                missing_group_is_reported
            );
        }
    )*};
    (@each $streams:ident $($case:ident)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let Some(streams) = super::$streams().await else {
                return;
            };
            super::$case(streams).await;
        }
    )*};
}

stream_semantics! {
    redis_stream: redis;
    memory_stream: memory;
}

/// `Points::connect` opens each database from its URL, as the `points-service` binary does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_connect_by_url() {
    let file = idem_tests::sqlite_file::TempDb::new("points-url");
    let sqlite = Points::<sqlx::Sqlite>::connect(&file.url())
        .await
        .expect("open a SQLite file by URL");
    let one: i64 = sqlx::query_scalar("SELECT 1")
        .fetch_one(sqlite.pool())
        .await
        .expect("SQLite answers");
    assert_eq!(one, 1);
    // The servers' URLs, once they are known to answer.
    if idem_tests::sql_servers::postgres_pool().await.is_some() {
        let url = idem_tests::sql_servers::postgres_url();
        let postgres = Points::<sqlx::Postgres>::connect(&url)
            .await
            .expect("open PostgreSQL by URL");
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(postgres.pool())
            .await
            .expect("PostgreSQL answers");
        assert_eq!(one, 1);
    }
    if idem_tests::sql_servers::mysql_pool().await.is_some() {
        let url = idem_tests::sql_servers::mysql_url();
        let mysql = Points::<sqlx::MySql>::connect(&url)
            .await
            .expect("open MariaDB by URL");
        let one: i64 = sqlx::query_scalar("SELECT 1")
            .fetch_one(mysql.pool())
            .await
            .expect("MariaDB answers");
        assert_eq!(one, 1);
    }
}
