//! Store outages: PostgreSQL, MariaDB and Redis made unreachable mid-run, then brought back.
//!
//! Each store is built on a sqlx pool or a redis `ConnectionManager` pointed at a loopback
//! TCP proxy ([`idem_tests::proxy::FaultProxy`]) in front of the real server, so the real
//! drivers meet real faults: `cut` closes every connection and resets new ones (the server is
//! down), `stall` forwards nothing (a black-holed network: only client timeouts end a call),
//! `restore` brings it back. The clients have short timeouts ([`CLIENT_TIMEOUT`]).
//!
//! What the tests show, on every server:
//!
//! * **fail closed** — while the store is cut or stalled, a delivery returns `Error::Store`,
//!   its body does not run and nothing is written; a stalled store gives its error within
//!   the client timeout instead of hanging;
//! * **recovery** — after `restore` the same pool / connection manager serves the next
//!   delivery within a few retries, without being rebuilt;
//! * **a batch cut in the middle** — concurrent deliveries with duplicates, some bodies held
//!   open while the store is cut, then every unacked message redelivered until acked: with
//!   `tx` every effect happened exactly once; with `claim`, a body that ran but whose
//!   completion never reached the store runs again once its lease has run out (the documented
//!   limit of a claim whose effect is outside the store), and only then;
//! * **fail open** — a `fail_open = true` handler runs its body (unrecorded) during the outage
//!   and behaves like any other handler while the store is up.
//!
//! Leases run on a `ManualClock`; nothing sleeps to let time pass, and every wait is a bounded
//! poll or a guard that only a hang can trip.

#![deny(unused_qualifications, clippy::all)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use idem_runtime::clock::ManualClock;
use idem_runtime::{Error, Store, idempotent};
use idem_tests::proxy::{self, FaultProxy};
use idem_tests::{AppError, Guarded, OrderPaid};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

const START: i64 = 1_700_000_000_000;

/// The timeouts of the clients behind the proxy: the pool's `acquire_timeout`, the Redis
/// connection and response timeouts.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// The guard around a call that must return: far beyond [`CLIENT_TIMEOUT`], so only a hang
/// trips it, never a slow machine.
const GUARD: Duration = Duration::from_secs(90);

/// The lease of the handlers below.
const LEASE: Duration = Duration::from_secs(30);

/// How many times a delivery is retried after the store came back before the test gives up.
const RECOVERY_ATTEMPTS: usize = 100;

/// The pools behind the proxy (the Redis store has one multiplexed connection).
#[derive(Clone, Copy)]
struct PoolSize {
    size: u32,
    acquire_timeout: Duration,
}

/// The pools of most tests: a stall fails within [`CLIENT_TIMEOUT`].
const POOL: PoolSize = PoolSize {
    size: 16,
    acquire_timeout: CLIENT_TIMEOUT,
};

/// The pools of the batch tests, which cut rather than stall: a connection per delivery of
/// the batch, and time to open them all on a loaded machine, so that no delivery fails
/// before the cut.
const BATCH_POOL: PoolSize = PoolSize {
    size: 32,
    acquire_timeout: Duration::from_secs(30),
};

/// Awaits a call that must return.
async fn guarded<F: Future>(what: &str, call: F) -> F::Output {
    tokio::time::timeout(GUARD, call)
        .await
        .unwrap_or_else(|_| panic!("{what} did not return within {GUARD:?}: it hangs"))
}

/// Polls `ready` until it holds, for at most a minute.
async fn eventually(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the bodies did: every run, by delivery, and which keys hold their body open (after
/// its effect) until the gate opens.
#[derive(Default)]
struct Ledger {
    runs: Mutex<Vec<(usize, String)>>,
    hold: Mutex<HashSet<String>>,
    gate: CancellationToken,
}

impl Ledger {
    fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The body's effect: recorded at once, before the body may be held.
    fn ran(&self, delivery: usize, key: &str) {
        Self::lock(&self.runs).push((delivery, key.to_owned()));
    }

    async fn held_if_asked(&self, key: &str) {
        let held = Self::lock(&self.hold).contains(key);
        if held {
            self.gate.cancelled().await;
        }
    }

    fn hold(&self, key: &str) {
        Self::lock(&self.hold).insert(key.to_owned());
    }

    /// How many times a body ran for `key`.
    fn runs_of(&self, key: &str) -> usize {
        Self::lock(&self.runs)
            .iter()
            .filter(|(_, ran)| ran == key)
            .count()
    }

    /// The deliveries whose body ran.
    fn deliveries(&self) -> BTreeSet<usize> {
        Self::lock(&self.runs).iter().map(|(d, _)| *d).collect()
    }

    fn total(&self) -> usize {
        Self::lock(&self.runs).len()
    }
}

/// What a credit returns: the points, and which delivery's body computed them (a replay
/// carries the delivery of the run it replays).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Credited {
    points: u64,
    by_delivery: usize,
}

/// A body whose effect is outside the store (a gateway call, a mail): the store cannot undo
/// it. `delivery` is delivery metadata, outside the fingerprint.
#[idempotent(key = "order_no", store = store, scope = "outage.credit", lease = "30s")]
async fn credit<S: Store>(
    store: &S,
    ledger: &Ledger,
    delivery: usize,
    msg: OrderPaid,
) -> Result<Credited, AppError> {
    ledger.ran(delivery, &msg.order_no);
    ledger.held_if_asked(&msg.order_no).await;
    Ok(Credited {
        points: msg.amount / 10,
        by_delivery: delivery,
    })
}

/// The same body, opted into failing open.
#[idempotent(
    key = "order_no",
    store = store,
    scope = "outage.credit_open",
    lease = "30s",
    fail_open = true
)]
async fn credit_open<S: Store>(
    store: &S,
    ledger: &Ledger,
    delivery: usize,
    msg: OrderPaid,
) -> Result<Credited, AppError> {
    ledger.ran(delivery, &msg.order_no);
    ledger.held_if_asked(&msg.order_no).await;
    Ok(Credited {
        points: msg.amount / 10,
        by_delivery: delivery,
    })
}

/// What a delivery came to, as a consumer sees it.
#[derive(Clone, Debug)]
enum Outcome {
    /// Handled (or replayed): ack.
    Acked(Credited),
    /// Another call holds the key: do not ack.
    InProgress,
    /// The store (or the database of a `tx` handler) failed: do not ack.
    Store(String),
}

fn outcome(result: Result<Credited, AppError>) -> Outcome {
    match result {
        Ok(credited) => Outcome::Acked(credited),
        Err(AppError::Idem(Error::InProgress { .. })) => Outcome::InProgress,
        Err(AppError::Idem(error @ Error::Store(_))) => Outcome::Store(error.to_string()),
        Err(other) => panic!("a delivery failed other than with a store error: {other:?}"),
    }
}

/// Asserts a store error of `backend` that says so.
#[track_caller]
fn assert_store_error(result: &Result<Credited, AppError>, backend: &str) {
    match result {
        Err(AppError::Idem(Error::Store(store))) => {
            assert_eq!(store.backend(), backend, "{store}");
            let message = AppError::Idem(Error::Store(idem_runtime::StoreError::new(
                store.backend(),
                store.to_string(),
            )))
            .to_string();
            assert!(
                message.starts_with(&format!("idempotency store error: {backend}: ")),
                "{message}"
            );
        }
        other => panic!("expected Error::Store from {backend}, got {other:?}"),
    }
}

/// Redelivers until the store has come back and the delivery is acked; returns the result
/// and the number of attempts.
async fn until_acked<F, Fut>(what: &str, mut deliver: F) -> (Credited, usize)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Credited, AppError>>,
{
    until_delivered(what, || {
        let call = deliver();
        async move { outcome(call.await) }
    })
    .await
}

/// [`until_acked`] for a delivery that gives its [`Outcome`].
async fn until_delivered<F, Fut>(what: &str, mut deliver: F) -> (Credited, usize)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Outcome>,
{
    let mut last = String::new();
    for attempt in 1..=RECOVERY_ATTEMPTS {
        match guarded(what, deliver()).await {
            Outcome::Acked(credited) => return (credited, attempt),
            Outcome::Store(error) => {
                last = error;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Outcome::InProgress => panic!("{what}: in progress, but no call holds the key"),
        }
    }
    panic!("{what}: the store did not come back within {RECOVERY_ATTEMPTS} attempts: {last}");
}

/// Reads the store's records straight from the server, past the proxy.
enum Inspect {
    Sql(SqlInspect),
    Redis(::redis::aio::MultiplexedConnection, String),
}

/// A pool to the server itself and the table of the store.
enum SqlInspect {
    Postgres(sqlx::PgPool, String),
    Mysql(sqlx::MySqlPool, String),
}

impl SqlInspect {
    async fn count(&self, from: &str) -> i64 {
        let statement = sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {from}"));
        let counted = match self {
            SqlInspect::Postgres(pool, _) => sqlx::query_scalar(statement).fetch_one(pool).await,
            SqlInspect::Mysql(pool, _) => sqlx::query_scalar(statement).fetch_one(pool).await,
        };
        counted.unwrap_or_else(|error| panic!("count {from}: {error}"))
    }

    async fn execute(&self, statement: String) {
        let done = match self {
            SqlInspect::Postgres(pool, _) => sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone()))
                .execute(pool)
                .await
                .map(drop),
            SqlInspect::Mysql(pool, _) => sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone()))
                .execute(pool)
                .await
                .map(drop),
        };
        done.unwrap_or_else(|error| panic!("{statement}: {error}"));
    }

    /// A pool of the server itself and the table to count.
    fn from_pool<P: IntoSqlInspect>(pool: P, table: &str) -> Self {
        pool.inspect(table.to_owned())
    }

    /// How many rows of the table `payments` are for `order_no`.
    async fn payments_of(&self, payments: &str, order_no: &str) -> i64 {
        let counted = match self {
            SqlInspect::Postgres(pool, _) => {
                let statement = format!("SELECT COUNT(*) FROM {payments} WHERE order_no = $1");
                sqlx::query_scalar(sqlx::AssertSqlSafe(statement))
                    .bind(order_no)
                    .fetch_one(pool)
                    .await
            }
            SqlInspect::Mysql(pool, _) => {
                let statement = format!("SELECT COUNT(*) FROM {payments} WHERE order_no = ?");
                sqlx::query_scalar(sqlx::AssertSqlSafe(statement))
                    .bind(order_no)
                    .fetch_one(pool)
                    .await
            }
        };
        counted.unwrap_or_else(|error| panic!("count the payments of {order_no}: {error}"))
    }

    fn table(&self) -> &str {
        match self {
            SqlInspect::Postgres(_, table) | SqlInspect::Mysql(_, table) => table,
        }
    }
}

/// The pools a [`SqlInspect`] reads through.
trait IntoSqlInspect {
    fn inspect(self, table: String) -> SqlInspect;
}

impl IntoSqlInspect for sqlx::PgPool {
    fn inspect(self, table: String) -> SqlInspect {
        SqlInspect::Postgres(self, table)
    }
}

impl IntoSqlInspect for sqlx::MySqlPool {
    fn inspect(self, table: String) -> SqlInspect {
        SqlInspect::Mysql(self, table)
    }
}

impl Inspect {
    /// How many records the store holds.
    async fn records(&self) -> i64 {
        match self {
            Inspect::Sql(sql) => sql.count(sql.table()).await,
            Inspect::Redis(connection, prefix) => {
                let mut connection = connection.clone();
                let mut cursor: u64 = 0;
                let mut found = 0;
                loop {
                    let (next, keys): (u64, Vec<Vec<u8>>) = ::redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{prefix}:*"))
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut connection)
                        .await
                        .expect("scan the store's keys");
                    found += i64::try_from(keys.len()).expect("a count");
                    if next == 0 {
                        return found;
                    }
                    cursor = next;
                }
            }
        }
    }
}

/// A store behind a fault proxy.
struct Rig<S> {
    /// The backend's name in its store errors.
    backend: &'static str,
    proxy: FaultProxy,
    store: Arc<Guarded<S>>,
    clock: ManualClock,
    inspect: Inspect,
}

mod rigs {
    use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
    use idem_runtime::mysql::MySqlStore;
    use idem_runtime::postgres::PostgresStore;
    use idem_runtime::redis::RedisStore;
    use idem_tests::{redis_server, sql_servers};
    use sqlx::mysql::MySqlPoolOptions;
    use sqlx::postgres::PgPoolOptions;

    use super::*;

    /// PostgreSQL behind a proxy, or `None` (having said so) without the server.
    pub async fn postgres(pool: PoolSize) -> Option<Rig<PostgresStore>> {
        let direct = sql_servers::postgres_pool().await?;
        let (proxy, url) = proxy::in_front_of(&sql_servers::postgres_url(), 5432).await;
        let pool = PgPoolOptions::new()
            .max_connections(pool.size)
            .acquire_timeout(pool.acquire_timeout)
            .connect(&url)
            .await
            .expect("a pool through the proxy");
        let clock = ManualClock::new(START);
        let store = sql_servers::postgres_store(pool, clock.clone()).await;
        let table = store.store.table().to_owned();
        Some(Rig {
            backend: "postgres",
            proxy,
            store: Arc::new(store),
            clock,
            inspect: Inspect::Sql(SqlInspect::Postgres(direct, table)),
        })
    }

    /// MariaDB behind a proxy, or `None` (having said so) without the server.
    pub async fn mysql(pool: PoolSize) -> Option<Rig<MySqlStore>> {
        let direct = sql_servers::mysql_pool().await?;
        let (proxy, url) = proxy::in_front_of(&sql_servers::mysql_url(), 3306).await;
        let pool = MySqlPoolOptions::new()
            .max_connections(pool.size)
            .acquire_timeout(pool.acquire_timeout)
            .connect(&url)
            .await
            .expect("a pool through the proxy");
        let clock = ManualClock::new(START);
        let store = sql_servers::mysql_store(pool, clock.clone()).await;
        let table = store.store.table().to_owned();
        Some(Rig {
            backend: "mysql",
            proxy,
            store: Arc::new(store),
            clock,
            inspect: Inspect::Sql(SqlInspect::Mysql(direct, table)),
        })
    }

    /// Redis behind a proxy, or `None` (having said so) without the server.
    pub async fn redis(_one_connection: PoolSize) -> Option<Rig<RedisStore<ConnectionManager>>> {
        let direct = redis_server::multiplexed().await?;
        let (proxy, url) = proxy::in_front_of(&redis_server::url(), 6379).await;
        let client = ::redis::Client::open(url.as_str()).expect("a client through the proxy");
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CLIENT_TIMEOUT))
            .set_response_timeout(Some(CLIENT_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let manager = ConnectionManager::new_with_config(client, config)
            .await
            .expect("a connection manager through the proxy");
        let clock = ManualClock::new(START);
        let store = redis_server::store(manager, clock.clone());
        let prefix = store.store.prefix().to_owned();
        Some(Rig {
            backend: "redis",
            proxy,
            store: Arc::new(store),
            clock,
            inspect: Inspect::Redis(direct, prefix),
        })
    }
}

/// Cut: the delivery fails closed with a store error, its body does not run, nothing is
/// written; once restored, the same store (same pool or connection manager) handles the
/// redelivery, which runs the body once.
async fn cut_fails_closed_then_recovers<S: Store + 'static>(rig: Rig<S>) {
    let Rig {
        backend,
        proxy,
        store,
        inspect,
        ..
    } = &rig;
    let (store, ledger) = (&**store, &Ledger::default());
    let up = guarded(
        "a delivery",
        credit(store, ledger, 0, OrderPaid::new("up", 10)),
    )
    .await;
    assert_eq!(up.expect("the store is up").by_delivery, 0);

    proxy.cut();
    let mut first_error = None;
    for delivery in 1..=3 {
        let down = guarded(
            "a delivery while cut",
            credit(store, ledger, delivery, OrderPaid::new("down", 10)),
        )
        .await;
        assert_store_error(&down, backend);
        first_error.get_or_insert_with(|| format!("{:?}", down.map(|_| ())));
    }
    assert_eq!(ledger.runs_of("down"), 0, "a body ran without a claim");
    assert_eq!(
        inspect.records().await,
        1,
        "something was written while cut"
    );

    proxy.restore();
    let (credited, attempts) = until_acked("the redelivery after the cut", || {
        credit(store, ledger, 4, OrderPaid::new("down", 10))
    })
    .await;
    assert_eq!(credited.by_delivery, 4);
    assert_eq!(ledger.runs_of("down"), 1);
    assert_eq!(inspect.records().await, 2);
    let again = guarded(
        "a duplicate",
        credit(store, ledger, 5, OrderPaid::new("down", 10)),
    )
    .await;
    assert_eq!(again.expect("replay"), credited, "the duplicate replays");
    assert_eq!(ledger.total(), 2);
    eprintln!(
        "outage figure [{backend}] cut: {}; acked on attempt {attempts} after restore",
        first_error.unwrap_or_default()
    );
}

/// Stalled: the delivery fails closed with a store error once the client's timeout fires
/// (guarded, so a hang fails the test), its body does not run, nothing is written; once
/// restored, the same store handles the redelivery, which runs the body once.
///
/// What the network held is delivered when it comes back, as TCP retransmits it. The SQL
/// pools ping an idle connection before they hand it out, so the stalled call never sent its
/// claim. The Redis client sent the claim script before its response timeout fired: the
/// script runs when the network is back, and the key is then **in progress under a lease
/// nobody holds**; the redelivery gets `InProgress` until that lease runs out, then runs the
/// body once. (Safe — nothing runs twice — but a late claim delays the key by a lease.)
async fn stall_fails_closed_in_bounded_time_then_recovers<S: Store + 'static>(rig: Rig<S>) {
    let Rig {
        backend,
        proxy,
        store,
        clock,
        inspect,
    } = &rig;
    let (store, ledger) = (&**store, &Ledger::default());
    let up = guarded(
        "a delivery",
        credit(store, ledger, 0, OrderPaid::new("up", 10)),
    )
    .await;
    assert!(up.is_ok(), "the store is up: {up:?}");

    proxy.stall();
    let started = Instant::now();
    let stalled = guarded(
        "a delivery while stalled",
        credit(store, ledger, 1, OrderPaid::new("stalled", 10)),
    )
    .await;
    let took = started.elapsed();
    assert_store_error(&stalled, backend);
    assert_eq!(ledger.runs_of("stalled"), 0, "a body ran without a claim");
    assert_eq!(
        inspect.records().await,
        1,
        "something was written while stalled"
    );

    proxy.restore();
    let late_claim_expected = *backend == "redis";
    if late_claim_expected {
        // The held claim script reaches the server: wait for its record.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while inspect.records().await < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stalled claim never reached Redis"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut late_claim = false;
    let mut attempts = 0;
    let credited = loop {
        attempts += 1;
        assert!(attempts <= RECOVERY_ATTEMPTS, "the store did not come back");
        let result = guarded(
            "the redelivery after the stall",
            credit(store, ledger, 2, OrderPaid::new("stalled", 10)),
        )
        .await;
        match outcome(result) {
            Outcome::Acked(credited) => break credited,
            Outcome::Store(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Outcome::InProgress => {
                // The stalled claim reached the server after all; nobody holds it.
                assert!(!late_claim, "still in progress after the lease ran out");
                assert_eq!(ledger.runs_of("stalled"), 0);
                late_claim = true;
                clock.advance(LEASE + Duration::from_secs(1));
            }
        }
    };
    assert_eq!(credited.by_delivery, 2);
    assert_eq!(ledger.runs_of("stalled"), 1, "the body ran once");
    assert_eq!(
        late_claim, late_claim_expected,
        "{backend}: the stalled claim reached the server late: {late_claim}"
    );
    eprintln!(
        "outage figure [{backend}] stall: store error after {took:?} (client timeout \
         {CLIENT_TIMEOUT:?}): {:?}; acked on attempt {attempts} after restore; the stalled claim \
         {} the server late",
        stalled.map(|_| ()),
        if late_claim {
            "reached"
        } else {
            "did not reach"
        }
    );
}

/// A delivery the queue runs: `(delivery id, message) -> outcome`.
type Deliver =
    Arc<dyn Fn(usize, OrderPaid) -> Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync>;

/// What a batch cut in the middle came to.
struct Batch {
    /// Every acked result, by key.
    acked: BTreeMap<String, Vec<Credited>>,
    /// Keys that answered `InProgress` after the store was back.
    in_progress_after_restore: BTreeSet<String>,
    /// How often the lease had to run out before the queue drained.
    lease_waits: usize,
    /// The held deliveries: their body ran, then the store was cut before they completed.
    held: BTreeSet<usize>,
}

const KEYS: usize = 8;
/// How often the claim batch delivers each message at once.
const COPIES: usize = 4;

fn batch_key(k: usize) -> String {
    format!("batch-{k}")
}

/// `KEYS` messages, each delivered `copies` times at once. The bodies of the even keys
/// finish; those of the odd keys are held open after their effect. When every delivery has
/// returned but the `outstanding` ones of each odd key (its held body, and with `tx` the
/// duplicates waiting on its row lock) and every odd key's body is running, the store is cut
/// and the held bodies are let go: their completion cannot reach the store. While it is cut,
/// every unacked message is redelivered (nothing runs); then it is restored, and the unacked
/// messages are redelivered, round after round, until every one is acked — as a queue
/// redelivers what was not acked. When a round moves nothing and ends with keys in progress,
/// the lease is let run out (the clock moves on), as a broker's redelivery delay would.
async fn cut_a_batch(
    proxy: &FaultProxy,
    clock: &ManualClock,
    ledger: &Arc<Ledger>,
    deliver: Deliver,
    copies: usize,
    outstanding: usize,
) -> Batch {
    for k in (1..KEYS).step_by(2) {
        ledger.hold(&batch_key(k));
    }
    // Every delivery (the first and each redelivery) has its own id.
    let ids = std::sync::atomic::AtomicUsize::new(1000);
    let next_id = || ids.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut pending: Vec<(usize, OrderPaid)> = Vec::new();
    for _copy in 0..copies {
        for k in 0..KEYS {
            pending.push((next_id(), OrderPaid::new(&batch_key(k), 100 + k as u64)));
        }
    }
    let mut acked: BTreeMap<String, Vec<Credited>> = BTreeMap::new();

    // The first delivery of everything, at once.
    let (sender, mut results) = tokio::sync::mpsc::unbounded_channel();
    let start = Arc::new(tokio::sync::Barrier::new(pending.len()));
    for (delivery, msg) in pending.clone() {
        let (deliver, sender, start) = (deliver.clone(), sender.clone(), start.clone());
        tokio::spawn(async move {
            start.wait().await;
            // The receiver outlives every delivery.
            let _ = sender.send((delivery, deliver(delivery, msg).await));
        });
    }
    drop(sender);
    let mut first: BTreeMap<usize, Outcome> = BTreeMap::new();
    let returning = pending.len() - KEYS / 2 * outstanding;
    let odd_running = || {
        (1..KEYS)
            .step_by(2)
            .all(|k| ledger.runs_of(&batch_key(k)) == 1)
    };
    guarded("the deliveries that do not wait for a held body", async {
        while first.len() < returning || !odd_running() {
            tokio::select! {
                result = results.recv() => {
                    let (delivery, outcome) = result.expect("a delivery ended without a result");
                    first.insert(delivery, outcome);
                }
                // The bodies start on their own time: look again.
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    })
    .await;
    for k in (0..KEYS).step_by(2) {
        assert!(
            pending
                .iter()
                .any(|(delivery, msg)| msg.order_no == batch_key(k)
                    && matches!(first.get(delivery), Some(Outcome::Acked(_)))),
            "{} was not acked before the cut: {first:?}",
            batch_key(k)
        );
    }
    // The store goes down with the odd bodies running: their effect happened, their
    // completion will not reach the store.
    let held: BTreeSet<usize> = ledger
        .deliveries()
        .into_iter()
        .filter(|delivery| {
            pending.iter().any(|(d, msg)| {
                d == delivery
                    && msg
                        .order_no
                        .trim_start_matches("batch-")
                        .parse::<usize>()
                        .is_ok_and(|k| k % 2 == 1)
            })
        })
        .collect();
    assert_eq!(held.len(), KEYS / 2, "one body per odd key");
    proxy.cut();
    ledger.gate.cancel();
    guarded("the rest of the first deliveries", async {
        while let Some((delivery, outcome)) = results.recv().await {
            first.insert(delivery, outcome);
        }
    })
    .await;
    assert_eq!(first.len(), pending.len());
    for delivery in &held {
        assert!(
            matches!(first[delivery], Outcome::Store(_)),
            "delivery {delivery} ran its body before the cut and could not complete: {:?}",
            first[delivery]
        );
    }
    for (delivery, msg) in &pending {
        if let Outcome::Acked(credited) = &first[delivery] {
            acked
                .entry(msg.order_no.clone())
                .or_default()
                .push(credited.clone());
        }
    }
    pending.retain(|(delivery, _)| !matches!(first[delivery], Outcome::Acked(_)));
    for k in (1..KEYS).step_by(2) {
        assert!(
            pending.iter().any(|(_, msg)| msg.order_no == batch_key(k)),
            "{} was acked although its completion was cut",
            batch_key(k)
        );
    }

    // Redelivered while the store is down: nothing runs.
    let runs_before = ledger.total();
    redeliver(&mut pending, next_id);
    for outcome in deliver_round(&deliver, &pending).await {
        assert!(
            matches!(outcome, Outcome::Store(_)),
            "while cut: {outcome:?}"
        );
    }
    assert_eq!(
        ledger.total(),
        runs_before,
        "a body ran while the store was cut"
    );

    proxy.restore();
    let mut in_progress_after_restore = BTreeSet::new();
    let mut lease_waits = 0;
    for round in 1.. {
        assert!(
            round <= RECOVERY_ATTEMPTS,
            "the queue did not drain: {pending:?}"
        );
        redeliver(&mut pending, next_id);
        let outcomes = deliver_round(&deliver, &pending).await;
        let mut store_errors = false;
        let mut in_progress = false;
        let mut progress = false;
        let mut still = Vec::new();
        for ((delivery, msg), outcome) in pending.into_iter().zip(outcomes) {
            match outcome {
                Outcome::Acked(credited) => {
                    progress = true;
                    acked
                        .entry(msg.order_no.clone())
                        .or_default()
                        .push(credited);
                }
                Outcome::InProgress => {
                    in_progress = true;
                    in_progress_after_restore.insert(msg.order_no.clone());
                    still.push((delivery, msg));
                }
                Outcome::Store(_) => {
                    store_errors = true;
                    still.push((delivery, msg));
                }
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if store_errors {
            // Still reconnecting.
            tokio::time::sleep(Duration::from_millis(100)).await;
        } else if in_progress && !progress {
            // Nothing runs between rounds, and nothing moved in this one: whatever holds these
            // keys was abandoned.
            lease_waits += 1;
            clock.advance(LEASE + Duration::from_secs(1));
        }
    }
    Batch {
        acked,
        in_progress_after_restore,
        lease_waits,
        held,
    }
}

/// Gives every pending message a new delivery id: a redelivery is a new delivery.
fn redeliver(pending: &mut [(usize, OrderPaid)], next_id: impl Fn() -> usize) {
    for (delivery, _) in pending {
        *delivery = next_id();
    }
}

/// Delivers `pending` at once and returns the outcomes in order.
async fn deliver_round(deliver: &Deliver, pending: &[(usize, OrderPaid)]) -> Vec<Outcome> {
    let tasks: Vec<_> = pending
        .iter()
        .cloned()
        .map(|(delivery, msg)| tokio::spawn(deliver(delivery, msg)))
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(
            guarded("a redelivery", task)
                .await
                .expect("a delivery panicked"),
        );
    }
    outcomes
}

/// Every acked result of a key is the same stored result; returns the deliveries that
/// produced them, by key.
fn one_result_per_key(batch: &Batch) -> BTreeMap<String, usize> {
    assert_eq!(batch.acked.len(), KEYS, "every key acked");
    batch
        .acked
        .iter()
        .map(|(key, results)| {
            assert!(
                results.windows(2).all(|pair| pair[0] == pair[1]),
                "{key} was acked with different results: {results:?}"
            );
            (key.clone(), results[0].by_delivery)
        })
        .collect()
}

/// The `claim` strategy, cut in the middle of a batch (see [`cut_a_batch`]). The even keys
/// ran once. The odd keys' bodies ran, then their completion was cut: their claims stay in
/// progress, so after the restore their redeliveries get `InProgress` until the lease runs
/// out, and then the body runs **a second time** — the effect is doubled. That is the limit
/// of a claim whose effect is outside the store (use `tx` for database effects): idem cannot
/// know that the body finished. Nothing else ran twice.
async fn claim_batch_cut_mid_run<S: Store + 'static>(rig: Rig<S>) {
    let Rig {
        backend,
        proxy,
        store,
        clock,
        inspect,
    } = rig;
    let ledger = Arc::new(Ledger::default());
    let deliver: Deliver = {
        let (store, ledger) = (store.clone(), ledger.clone());
        Arc::new(move |delivery, msg| {
            let (store, ledger) = (store.clone(), ledger.clone());
            Box::pin(async move { outcome(credit(&*store, &ledger, delivery, msg).await) })
        })
    };
    let batch = cut_a_batch(&proxy, &clock, &ledger, deliver, COPIES, 1).await;
    let producers = one_result_per_key(&batch);
    for k in 0..KEYS {
        let key = batch_key(k);
        if k % 2 == 0 {
            assert_eq!(ledger.runs_of(&key), 1, "{key} completed before the cut");
            assert!(!batch.in_progress_after_restore.contains(&key));
        } else {
            assert_eq!(
                ledger.runs_of(&key),
                2,
                "{key}: once before the cut, whose completion was lost, and once after its lease"
            );
            assert!(
                batch.in_progress_after_restore.contains(&key),
                "{key} was in progress until its lease ran out"
            );
            assert!(
                !batch.held.contains(&producers[&key]),
                "{key}'s stored result is the second run's"
            );
        }
    }
    assert_eq!(batch.lease_waits, 1, "one lease to wait out");
    assert_eq!(inspect.records().await, KEYS as i64);
    eprintln!(
        "outage figure [{backend}] claim batch: {} bodies whose completion was cut ran again \
         after the lease; {} runs for {KEYS} keys",
        batch.held.len(),
        ledger.total()
    );
}

/// `fail_open = true`: with the store up, duplicates replay as with any handler; while it is
/// cut, every delivery runs the body and returns `Ok` unrecorded (a duplicate doubles the
/// effect), while a fail-closed handler next to it still refuses; after the restore the key
/// was never recorded, so its next delivery runs the body again, and then duplicates replay.
async fn fail_open_runs_the_body_during_an_outage<S: Store + 'static>(rig: Rig<S>) {
    let Rig {
        backend,
        proxy,
        store,
        inspect,
        ..
    } = &rig;
    let (store, ledger) = (&**store, &Ledger::default());
    let first = guarded(
        "fail-open, store up",
        credit_open(store, ledger, 1, OrderPaid::new("open-up", 10)),
    )
    .await;
    let again = guarded(
        "fail-open duplicate, store up",
        credit_open(store, ledger, 2, OrderPaid::new("open-up", 10)),
    )
    .await;
    assert_eq!(first.expect("first").by_delivery, 1);
    assert_eq!(again.expect("replay").by_delivery, 1, "a duplicate replays");
    assert_eq!(ledger.runs_of("open-up"), 1);
    let busy = store
        .claim(
            &idem_runtime::RecordKey::new("outage.credit_open", "open-busy").expect("key"),
            None,
            LEASE,
        )
        .await
        .expect("claim");
    assert!(matches!(busy, idem_runtime::Claim::Acquired(_)));
    let held = guarded(
        "fail-open on a key in progress",
        credit_open(store, ledger, 3, OrderPaid::new("open-busy", 10)),
    )
    .await;
    assert!(
        matches!(held, Err(AppError::Idem(Error::InProgress { .. }))),
        "a key in progress does not fail open: {held:?}"
    );
    assert_eq!(ledger.runs_of("open-busy"), 0);
    let records = inspect.records().await;

    proxy.cut();
    let down = guarded(
        "fail-open while cut",
        credit_open(store, ledger, 4, OrderPaid::new("open-down", 10)),
    )
    .await;
    assert_eq!(down.expect("fails open").by_delivery, 4);
    let twice = guarded(
        "fail-open duplicate while cut",
        credit_open(store, ledger, 5, OrderPaid::new("open-down", 10)),
    )
    .await;
    assert_eq!(
        twice.expect("fails open").by_delivery,
        5,
        "not recorded: nothing to replay"
    );
    assert_eq!(
        ledger.runs_of("open-down"),
        2,
        "the duplicate doubled the effect"
    );
    let closed = guarded(
        "fail-closed while cut",
        credit(store, ledger, 6, OrderPaid::new("open-down", 10)),
    )
    .await;
    assert_store_error(&closed, backend);

    proxy.stall();
    let started = Instant::now();
    let stalled = guarded(
        "fail-open while stalled",
        credit_open(store, ledger, 7, OrderPaid::new("open-stalled", 10)),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(stalled.expect("fails open").by_delivery, 7);

    proxy.restore();
    until_acked("a fail-closed delivery after the restore", || {
        credit(store, ledger, 8, OrderPaid::new("probe", 10))
    })
    .await;
    let after = guarded(
        "fail-open after the restore",
        credit_open(store, ledger, 9, OrderPaid::new("open-down", 10)),
    )
    .await;
    assert_eq!(
        after.expect("after").by_delivery,
        9,
        "never recorded, so it runs again"
    );
    let replay = guarded(
        "fail-open duplicate after the restore",
        credit_open(store, ledger, 10, OrderPaid::new("open-down", 10)),
    )
    .await;
    assert_eq!(replay.expect("replay").by_delivery, 9);
    assert_eq!(ledger.runs_of("open-down"), 3);
    // Nothing was written by the deliveries that failed open, while cut (the stalled claim
    // may have reached the server late).
    // The stalled fail-open claim was never sent either: the SQL pool's ping stalled first,
    // and the Redis manager was still reconnecting after the cut.
    let late = inspect.records().await - records - 2; // probe, open-down
    assert_eq!(
        late, 0,
        "records written by the deliveries that failed open"
    );
    eprintln!(
        "outage figure [{backend}] fail-open: cut → body ran unrecorded at once; stalled → body ran after {took:?}; late stalled claims: {late}"
    );
}

macro_rules! claim_outages {
    ($($backend:ident),*) => {$(
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn cut_fails_closed_then_recovers() {
                if let Some(rig) = rigs::$backend(POOL).await {
                    super::cut_fails_closed_then_recovers(rig).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn stall_fails_closed_in_bounded_time_then_recovers() {
                if let Some(rig) = rigs::$backend(POOL).await {
                    super::stall_fails_closed_in_bounded_time_then_recovers(rig).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn claim_batch_cut_mid_run() {
                if let Some(rig) = rigs::$backend(BATCH_POOL).await {
                    super::claim_batch_cut_mid_run(rig).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn fail_open_runs_the_body_during_an_outage() {
                if let Some(rig) = rigs::$backend(POOL).await {
                    super::fail_open_runs_the_body_during_an_outage(rig).await;
                }
            }
        }
    )*};
}

claim_outages!(postgres, mysql, redis);

/// The `tx` strategy: the payment row and the record in one transaction of the database the
/// store is in. `$backend` names the rig, `$scratch` the scratch-table helper of
/// `idem_tests::sql_servers`, `$insert` the insert with that database's placeholders.
macro_rules! tx_outages {
    ($module:ident, $backend:ident, $store:ty, $db:ty, $scratch:ident, $insert:literal) => {
        mod $module {
            use idem_runtime::StoreError;
            use idem_tests::sql_servers::{self, Scratch};
            use sqlx::Transaction;

            use super::*;

            type Db = $db;

            /// Records the payment in the transaction; held after the write when asked.
            #[idempotent(key = "order_no", store = store, strategy = "tx", tx = tx, scope = "outage.pay")]
            async fn pay(
                store: &$store,
                tx: &mut Transaction<'_, Db>,
                ledger: &Ledger,
                insert: &str,
                delivery: usize,
                msg: OrderPaid,
            ) -> Result<Credited, AppError> {
                let id = i64::try_from(delivery).map_err(|_| AppError::Business("id".into()))?;
                sqlx::query(sqlx::AssertSqlSafe(insert.to_owned()))
                    .bind(msg.order_no.as_str())
                    .bind(id)
                    .execute(&mut **tx)
                    .await
                    .map_err(|error| AppError::Idem(Error::Store(StoreError::new("payments", error))))?;
                ledger.ran(delivery, &msg.order_no);
                ledger.held_if_asked(&msg.order_no).await;
                Ok(Credited {
                    points: msg.amount / 10,
                    by_delivery: delivery,
                })
            }

            /// A store behind the proxy, and a payments table reached directly.
            struct Bank {
                rig: Rig<$store>,
                payments: String,
                insert: String,
                direct: SqlInspect,
                _drop: Scratch,
            }

            async fn bank(pool: PoolSize) -> Option<Arc<Bank>> {
                let rig = rigs::$backend(pool).await?;
                let payments = idem_tests::servers::unique_name("payments");
                let (direct, drop) = sql_servers::$scratch(&payments).await?;
                let direct = SqlInspect::from_pool(direct, &payments);
                direct
                    .execute(format!(
                        "CREATE TABLE {payments} (order_no VARCHAR(64) NOT NULL, delivery BIGINT NOT NULL)"
                    ))
                    .await;
                Some(Arc::new(Bank {
                    rig,
                    insert: format!($insert, payments = payments),
                    payments,
                    direct,
                    _drop: drop,
                }))
            }

            impl Bank {
                /// One delivery as a consumer runs it: begin, the handler, commit (or roll
                /// back).
                async fn deliver(&self, ledger: &Ledger, delivery: usize, msg: OrderPaid) -> Outcome {
                    let store = &self.rig.store.store;
                    let mut tx = match store.pool().begin().await {
                        Ok(tx) => tx,
                        Err(error) => return Outcome::Store(format!("begin: {error}")),
                    };
                    match pay(store, &mut tx, ledger, &self.insert, delivery, msg).await {
                        Ok(credited) => match tx.commit().await {
                            Ok(()) => Outcome::Acked(credited),
                            Err(error) => Outcome::Store(format!("commit: {error}")),
                        },
                        Err(error) => {
                            // The connection may be gone; the server rolls back then.
                            let _ = tx.rollback().await;
                            outcome(Err(error))
                        }
                    }
                }

                async fn payments_of(&self, order_no: &str) -> i64 {
                    self.direct.payments_of(&self.payments, order_no).await
                }
            }

            /// The `tx` strategy, cut in the middle of a batch (see [`cut_a_batch`]). The odd
            /// keys' bodies wrote their payment and were cut before their transaction
            /// committed: the server rolled the claim and the payment back together, so the
            /// redelivery found the key free (never `InProgress`, no lease to wait out), ran
            /// the body again, and every key has exactly one payment.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn tx_batch_cut_mid_run() {
                let Some(bank) = bank(BATCH_POOL).await else {
                    return;
                };
                let ledger = Arc::new(Ledger::default());
                let deliver: Deliver = {
                    let (bank, ledger) = (bank.clone(), ledger.clone());
                    Arc::new(move |delivery, msg| {
                        let (bank, ledger) = (bank.clone(), ledger.clone());
                        Box::pin(async move { bank.deliver(&ledger, delivery, msg).await })
                    })
                };
                // Each odd key's held body and its duplicates, waiting on its row lock.
                let copies = 3;
                let batch = cut_a_batch(&bank.rig.proxy, &bank.rig.clock, &ledger, deliver, copies, copies).await;
                let producers = one_result_per_key(&batch);
                for k in 0..KEYS {
                    let key = batch_key(k);
                    assert_eq!(bank.payments_of(&key).await, 1, "{key}: exactly one payment");
                    let runs = if k % 2 == 0 { 1 } else { 2 };
                    assert_eq!(ledger.runs_of(&key), runs, "{key}: the cut run was rolled back");
                    if k % 2 == 1 {
                        assert!(!batch.held.contains(&producers[&key]));
                    }
                }
                assert!(
                    batch.in_progress_after_restore.is_empty(),
                    "a tx claim is never left in progress: {:?}",
                    batch.in_progress_after_restore
                );
                assert_eq!(batch.lease_waits, 0);
                assert_eq!(bank.rig.inspect.records().await, KEYS as i64);
                eprintln!(
                    "outage figure [{}] tx batch: {} bodies cut before commit were rolled back and ran again; one payment per key",
                    bank.rig.backend,
                    batch.held.len()
                );
            }

            /// The connection of a delivery's transaction is lost before the claim: the
            /// handler returns the store error without running the body, nothing is written,
            /// and after the restore the same pool serves the redelivery, which pays once.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn tx_cut_before_the_claim_fails_closed() {
                let Some(bank) = bank(POOL).await else {
                    return;
                };
                let ledger = Ledger::default();
                let store = &bank.rig.store.store;
                let mut tx = store.pool().begin().await.expect("begin");
                bank.rig.proxy.cut();
                let down = guarded(
                    "a tx handler while cut",
                    pay(store, &mut tx, &ledger, &bank.insert, 1, OrderPaid::new("tx-down", 10)),
                )
                .await;
                assert_store_error(&down, bank.rig.backend);
                assert_eq!(ledger.total(), 0, "the body ran without a claim");
                assert!(tx.rollback().await.is_err(), "the connection is gone");
                assert_eq!(bank.payments_of("tx-down").await, 0);
                assert_eq!(bank.rig.inspect.records().await, 0);

                bank.rig.proxy.restore();
                let (credited, attempts) = until_delivered("the redelivery", || {
                    bank.deliver(&ledger, 2, OrderPaid::new("tx-down", 10))
                })
                .await;
                assert_eq!(credited.by_delivery, 2);
                let replay = guarded("a duplicate", bank.deliver(&ledger, 3, OrderPaid::new("tx-down", 10))).await;
                assert!(matches!(&replay, Outcome::Acked(again) if *again == credited), "{replay:?}");
                assert_eq!(bank.payments_of("tx-down").await, 1);
                assert_eq!(ledger.total(), 1);
                eprintln!(
                    "outage figure [{}] tx cut before the claim: {down:?}; acked on attempt {attempts} after restore",
                    bank.rig.backend
                );
            }

            /// The network stalls after the delivery's transaction began: the connection is
            /// already taken, so the pool's timeout does not apply and sqlx has none for a
            /// statement; the caller's own deadline ends the delivery. Either way the body did
            /// not run; the transaction is dropped (rolled back), and after the restore the
            /// same pool serves the redelivery, which pays once.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn tx_stall_after_begin_is_bounded_by_the_callers_deadline() {
                const DEADLINE: Duration = Duration::from_secs(5);
                let Some(bank) = bank(POOL).await else {
                    return;
                };
                let ledger = Ledger::default();
                let store = &bank.rig.store.store;
                let mut tx = store.pool().begin().await.expect("begin");
                bank.rig.proxy.stall();
                let started = Instant::now();
                let stalled = tokio::time::timeout(
                    DEADLINE,
                    pay(store, &mut tx, &ledger, &bank.insert, 1, OrderPaid::new("tx-stalled", 10)),
                )
                .await;
                let took = started.elapsed();
                match &stalled {
                    Err(_elapsed) => {}
                    Ok(result) => assert_store_error(result, bank.rig.backend),
                }
                assert_eq!(ledger.total(), 0, "the body ran without a claim");
                drop(tx); // never commit a transaction whose handler did not return

                bank.rig.proxy.restore();
                let (credited, attempts) = until_delivered("the redelivery", || {
                    bank.deliver(&ledger, 2, OrderPaid::new("tx-stalled", 10))
                })
                .await;
                assert_eq!(credited.by_delivery, 2);
                assert_eq!(bank.payments_of("tx-stalled").await, 1);
                assert_eq!(ledger.total(), 1);
                eprintln!(
                    "outage figure [{}] tx stall after begin: {} after {took:?}; acked on attempt {attempts} after restore",
                    bank.rig.backend,
                    match stalled {
                        Err(_) => "the caller's deadline fired (no client timeout covers a statement)".to_owned(),
                        Ok(result) => format!("{result:?}"),
                    }
                );
            }
        }
    };
}

tx_outages!(
    postgres_tx,
    postgres,
    idem_runtime::postgres::PostgresStore,
    sqlx::Postgres,
    postgres_scratch,
    "INSERT INTO {payments} (order_no, delivery) VALUES ($1, $2)"
);

tx_outages!(
    mysql_tx,
    mysql,
    idem_runtime::mysql::MySqlStore,
    sqlx::MySql,
    mysql_scratch,
    "INSERT INTO {payments} (order_no, delivery) VALUES (?, ?)"
);

/// The proxy itself, on an echo server: forwards, holds bytes while stalled, closes and
/// resets when cut, forwards again once restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_cuts_stalls_and_restores() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let echo = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    let proxy = FaultProxy::start(echo).await.expect("proxy");
    let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
    let mut buffer = [0; 4];
    client.write_all(b"ping").await.expect("write");
    guarded("the echo", client.read_exact(&mut buffer))
        .await
        .expect("read");
    assert_eq!(&buffer, b"ping");

    proxy.stall();
    client.write_all(b"held").await.expect("write");
    // Nothing comes back while stalled (a slow machine can only make this pass more often,
    // never fail it); the read is still pending when the stall ends.
    let mut read = Box::pin(async {
        let mut buffer = [0; 4];
        client.read_exact(&mut buffer).await.map(|_| buffer)
    });
    let early = tokio::time::timeout(Duration::from_millis(300), read.as_mut()).await;
    assert!(early.is_err(), "forwarded while stalled: {early:?}");
    proxy.restore();
    assert_eq!(
        &guarded("the held bytes", read).await.expect("read"),
        b"held"
    );

    proxy.cut();
    let mut buffer = [0; 1];
    let closed = guarded("the cut", client.read(&mut buffer)).await;
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "open after the cut: {closed:?}"
    );
    // Reset at once: the connect itself, or the first read, fails.
    if let Ok(mut refused) = TcpStream::connect(proxy.addr()).await {
        let reset = guarded("a connection while cut", refused.read(&mut buffer)).await;
        assert!(
            matches!(reset, Ok(0) | Err(_)),
            "served while cut: {reset:?}"
        );
    }
    eventually("the reset is counted", || proxy.reset() == 1).await;

    proxy.restore();
    let mut again = TcpStream::connect(proxy.addr()).await.expect("connect");
    again.write_all(b"back").await.expect("write");
    let mut buffer = [0; 4];
    guarded("the echo", again.read_exact(&mut buffer))
        .await
        .expect("read");
    assert_eq!(&buffer, b"back");
    assert_eq!(proxy.accepted(), 2);
}
