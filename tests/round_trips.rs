//! Round trips per store operation on the networked stores (PostgreSQL, MariaDB, Redis),
//! measured on the wire against the real servers.
//!
//! # How it is measured
//!
//! Each store runs on a pool (or a Redis `ConnectionManager`) pointed at a loopback TCP proxy
//! in front of the real server ([`idem_tests::counting::CountingProxy`]). The proxy counts
//! **exchanges**: a turn of the client's bytes followed by the server's answer — one round
//! trip, however TCP cut the bytes and however many protocol messages the driver packed into
//! the turn. It also names the requests each turn carried (PostgreSQL `Sync` and `Query`
//! messages, MySQL `COM_*` command packets, Redis command names), and the test checks that
//! every exchange carried exactly one of them, so a pipelined second request could not hide
//! in one exchange.
//!
//! The SQL pools have **one connection**, and every operation is run once on it first
//! (**warm-up**), unmeasured: sqlx prepares a statement on its first use on a connection
//! (PostgreSQL `Parse`/`Describe`, MySQL `COM_STMT_PREPARE`, one extra round trip each) and
//! caches it for the connection's life; Redis answers the first `EVALSHA` of a script with
//! `NOSCRIPT`, and the driver loads it. The counts below are the **steady state**, and the test
//! asserts that no prepare or script load happened in it.
//!
//! # What it asserts
//!
//! idem's own statements per operation (each one round trip):
//!
//! | operation | PostgreSQL | MariaDB | MariaDB as on MySQL | Redis |
//! |---|---|---|---|---|
//! | claim of a new key | 1 | 1 | 1 | 1 |
//! | complete | 1 | 1 | 1 | 1 |
//! | claim of a completed key (replay) | 1 | 1 | 2 (claim, read) | 1 |
//! | claim of a key in progress | 1 | 1 | 2 (claim, read) | 1 |
//! | extend, release | 1 each | 1 each | 1 each | 1 each |
//! | `#[idempotent]` handler, new key | 2 | 2 | 2 | 2 |
//! | `#[idempotent]` handler, replay | 1 | 1 | 2 | 1 |
//! | `tx`: `BEGIN`, `claim_in`, `complete_in`, `COMMIT` | 1, 2, 2, 1 | 1, 2, 2, 1 | 1, 2, 2, 1 | — |
//! | `tx` replay: `BEGIN`, `claim_in`, `ROLLBACK` | 1, 3, 1 | 1, 3, 1 | 1, 4, 1 | — |
//!
//! and the pings the **sqlx pool** adds around them, which the test asserts too, per pool
//! checkout (every SQL store operation takes a connection from the pool and returns it; the
//! `tx` operations run on the transaction's connection):
//!
//! * **on return, always**: sqlx 0.9 pings every connection given back to the pool
//!   (PostgreSQL: an empty `Sync`; MySQL: `COM_PING`) in a task it spawns, before the
//!   connection is idle again. It is not on the caller's path when the pool has another idle
//!   connection, but it is one more round trip on the connection (on a pool of one it delays
//!   the next checkout);
//! * **on checkout, by default**: with sqlx's default `test_before_acquire(true)` the pool
//!   pings an idle connection before handing it out, on the caller's path. The test runs
//!   with `test_before_acquire(false)` and with the default, and asserts both.
//!
//! So on PostgreSQL a new key through the handler is 2 statements, plus 2 return pings, plus
//! 2 checkout pings by default: 4 round trips on the caller's path with the default pool, 2
//! with `test_before_acquire(false)`. The test measures each operation until its future
//! returned and then until its connection is back in the pool; the runtime has one thread,
//! so the task that returns the connection cannot run before the first snapshot.
//!
//! The MariaDB claim returns the record as it leaves it (`INSERT … RETURNING`); MySQL has no
//! such clause, so there the claim reports what it did through `LAST_INSERT_ID` and a claim
//! that changed nothing (the key is completed or in progress) needs a read to say what holds
//! the key: two round trips. The test runs the MySQL path on MariaDB too
//! (`MySqlStore::with_returning(false)`). The PostgreSQL claim reads the record it did not take
//! in the same statement; only under a race (a concurrent claim that committed after the
//! statement's snapshot) does a second read follow, which this sequential test never meets.
//! In the `tx` strategy the claim and the completion each add a savepoint statement
//! (`SAVEPOINT`, `RELEASE SAVEPOINT`), so a new key costs 4 round trips inside the
//! transaction, besides `BEGIN` and `COMMIT`; a replay undoes its savepoint with `ROLLBACK TO
//! SAVEPOINT` and `RELEASE SAVEPOINT` sent together, one round trip.
//!
//! Nothing here is timed: the counts are exact, whatever the machine's speed.

#![deny(unused_qualifications, clippy::all)]

use std::future::Future;
use std::time::Duration;

use idem_runtime::clock::SystemClock;
use idem_runtime::tx::{TxClaim, TxStore};
use idem_runtime::{Claim, RecordKey, Store};
use idem_tests::counting::{CountingProxy, Protocol, Traffic};
use idem_tests::{OrderPaid, Runs, credit_points, redis_server, servers, sql_servers};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);
const RESULT: &[u8] = br#"{"points":25}"#;

/// Measures operations one after another on one proxy: each measurement is the traffic since
/// the one before, so together they account for every byte the client sent.
struct Meter<'a> {
    proxy: &'a CountingProxy,
    /// The pool whose connection must be back (after sqlx's ping on release) before an
    /// operation that returned it is done.
    pool: Option<Box<dyn Fn() -> bool + 'a>>,
    last: Traffic,
    taken: Vec<Measured>,
}

/// The traffic of one operation: until its future returned, and after that until its
/// connection was back in the pool.
struct Measured {
    name: &'static str,
    during: Traffic,
    after: Traffic,
}

impl<'a> Meter<'a> {
    /// A meter on `proxy`, started once `pool` (if any) has its connection back from the
    /// warm-up.
    async fn start(proxy: &'a CountingProxy, pool: Option<Box<dyn Fn() -> bool + 'a>>) -> Self {
        let meter = Self {
            proxy,
            pool,
            last: Traffic::default(),
            taken: Vec::new(),
        };
        meter.returned().await;
        Self {
            last: proxy.traffic(),
            ..meter
        }
    }

    /// Waits until the pool (if any) has its connection back.
    async fn returned(&self) {
        if let Some(idle) = &self.pool {
            // A guard against a hang, not a measurement: the connection is back within
            // milliseconds.
            let mut waited = 0;
            while !idle() {
                assert!(
                    waited < 30_000,
                    "the connection did not come back to the pool"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
                waited += 1;
            }
        }
    }

    /// Runs `operation` and records the traffic it caused under `name`; with `returns`, also
    /// the traffic until the pool has its connection back.
    async fn measure<F: Future>(
        &mut self,
        name: &'static str,
        returns: bool,
        operation: F,
    ) -> F::Output {
        let before = self.proxy.traffic();
        assert_eq!(
            before, self.last,
            "traffic between two measured operations (before `{name}`)"
        );
        let output = operation.await;
        // The runtime has one thread: the task sqlx spawned to return the connection has not
        // run yet.
        let returned = self.proxy.traffic();
        if returns && let Some(idle) = &self.pool {
            // A guard against a hang, not a measurement: the connection is back within
            // milliseconds.
            let mut waited = 0;
            while !idle() {
                assert!(
                    waited < 30_000,
                    "the connection did not come back to the pool"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
                waited += 1;
            }
        }
        let after = self.proxy.traffic();
        self.taken.push(Measured {
            name,
            during: returned.since(&before),
            after: after.since(&returned),
        });
        self.last = after;
        output
    }
}

/// What an operation costs: its own statements, the pool checkouts it makes (a ping each
/// when the pool tests connections before handing them out) and the connections it returns
/// to the pool (a ping each, always, in sqlx 0.9).
struct Cost {
    name: &'static str,
    statements: usize,
    acquires: usize,
    releases: usize,
}

const fn cost(name: &'static str, statements: usize, acquires: usize, releases: usize) -> Cost {
    Cost {
        name,
        statements,
        acquires,
        releases,
    }
}

/// A key no earlier run used.
fn fresh(what: &str) -> RecordKey {
    RecordKey::new("round_trips", &servers::unique_name(what)).expect("a valid key")
}

/// Runs `$operation` under `$meter` (an `Option<&mut Meter>`) as `$name`, or unmeasured.
macro_rules! op {
    ($meter:ident, $name:literal, $returns:literal, $operation:expr) => {
        match $meter.as_deref_mut() {
            Some(meter) => meter.measure($name, $returns, $operation).await,
            None => $operation.await,
        }
    };
}

/// Every operation of the store protocol once, and the handler's two paths: measured when
/// `meter` is given, a warm-up otherwise.
async fn store_operations<S: Store>(store: &S, mut meter: Option<&mut Meter<'_>>) {
    let key = fresh("done");
    let claimed = op!(meter, "claim", true, store.claim(&key, None, LEASE)).expect("claim");
    let Claim::Acquired(lease) = claimed else {
        panic!("a new key is acquired");
    };
    op!(
        meter,
        "complete",
        true,
        store.complete(&key, &lease, RESULT, TTL)
    )
    .expect("complete");
    let replay = op!(meter, "replay", true, store.claim(&key, None, LEASE)).expect("replay");
    assert_eq!(replay, Claim::Completed(RESULT.to_vec()));

    let held = fresh("held");
    // The same claim as the measured `claim`: measured as `held_claim`, not checked.
    let claimed = op!(meter, "held_claim", true, store.claim(&held, None, LEASE)).expect("claim");
    let Claim::Acquired(lease) = claimed else {
        panic!("a new key is acquired");
    };
    let busy = op!(meter, "in_progress", true, store.claim(&held, None, LEASE)).expect("claim");
    assert!(matches!(busy, Claim::InProgress { .. }), "{busy:?}");
    let lease = op!(meter, "extend", true, store.extend(&held, &lease, LEASE)).expect("extend");
    op!(meter, "release", true, store.release(&held, &lease)).expect("release");

    let runs = Runs::default();
    let order = servers::unique_name("order");
    let first = op!(
        meter,
        "handler_new_key",
        true,
        credit_points(store, &runs, OrderPaid::new(&order, 250))
    )
    .expect("first delivery");
    let again = op!(
        meter,
        "handler_replay",
        true,
        credit_points(store, &runs, OrderPaid::new(&order, 250))
    )
    .expect("redelivery");
    assert_eq!((first, runs.count()), (again, 1));
}

/// The `tx` strategy's operations on a new key (`BEGIN`, `claim_in`, `complete_in`, `COMMIT`),
/// then on the same key again (`BEGIN`, `claim_in` that replays, `ROLLBACK`).
async fn tx_operations<S: TxStore>(
    store: &S,
    pool: &sqlx::Pool<S::Database>,
    mut meter: Option<&mut Meter<'_>>,
) {
    let key = fresh("tx");
    let mut tx = op!(meter, "begin", false, pool.begin()).expect("begin");
    let claimed = op!(
        meter,
        "claim_in",
        false,
        store.claim_in(&mut tx, &key, None, LEASE)
    )
    .expect("claim_in");
    let TxClaim::Run(claim) = claimed else {
        panic!("a new key is claimed");
    };
    op!(
        meter,
        "complete_in",
        false,
        store.complete_in(&mut tx, &key, &claim, RESULT, TTL)
    )
    .expect("complete_in");
    op!(meter, "commit", true, tx.commit()).expect("commit");

    // The same key again in a new transaction: a replay, and nothing to keep.
    let mut tx = op!(meter, "begin_again", false, pool.begin()).expect("begin");
    let replayed = op!(
        meter,
        "claim_in_replay",
        false,
        store.claim_in(&mut tx, &key, None, LEASE)
    )
    .expect("claim_in");
    assert_eq!(replayed, TxClaim::Completed(RESULT.to_vec()));
    op!(meter, "rollback", true, tx.rollback()).expect("rollback");
}

/// How a server's requests read: statements, and pings (a request that runs nothing).
#[derive(Clone, Copy)]
enum Wire {
    Postgres,
    MySql,
    Redis,
}

impl Wire {
    /// `(statements, pings, first uses)` among `requests`: first uses are prepares and script
    /// loads, which the warm-up must have done.
    fn classify(self, requests: &[String]) -> (usize, usize, usize) {
        let (mut statements, mut pings, mut first_uses) = (0, 0, 0);
        // PostgreSQL: a `Sync` that closes no extended-protocol batch is a ping.
        let mut batch = false;
        for request in requests {
            match (self, request.as_str()) {
                (Wire::Postgres, "Parse" | "Describe") => {
                    first_uses += 1;
                    batch = true;
                }
                (Wire::Postgres, "Bind" | "Close") => batch = true,
                (Wire::Postgres, "Execute") => {
                    statements += 1;
                    batch = true;
                }
                (Wire::Postgres, "Sync") => {
                    if !batch {
                        pings += 1;
                    }
                    batch = false;
                }
                (Wire::Postgres, query) if query.starts_with("Query(") => statements += 1,
                (Wire::MySql, "COM_STMT_EXECUTE" | "COM_QUERY") => statements += 1,
                (Wire::MySql, "COM_PING") | (Wire::Redis, "PING") => pings += 1,
                (Wire::MySql, "COM_STMT_PREPARE") | (Wire::Redis, "SCRIPT" | "EVAL") => {
                    first_uses += 1;
                }
                (Wire::Redis, "EVALSHA") => statements += 1,
                (_, other) => panic!("an unexpected request `{other}`"),
            }
        }
        (statements, pings, first_uses)
    }
}

/// Asserts the measured round trips against `costs` (with a ping per checkout when
/// `test_before_acquire`): one round trip per statement and per ping, each carrying one
/// request, and no prepare or script load after the warm-up.
fn check(
    server: &str,
    wire: Wire,
    measured: &[Measured],
    costs: &[Cost],
    test_before_acquire: bool,
) {
    let lines: Vec<String> = measured
        .iter()
        .map(|m| {
            format!(
                "{}: {} + {} after return {:?} {:?}",
                m.name, m.during.exchanges, m.after.exchanges, m.during.requests, m.after.requests
            )
        })
        .collect();
    let report = lines.join("\n  ");
    eprintln!("{server} (test_before_acquire = {test_before_acquire}):\n  {report}");
    let names: Vec<&str> = measured.iter().map(|m| m.name).collect();
    let expected: Vec<&str> = costs.iter().map(|cost| cost.name).collect();
    assert_eq!(names, expected, "the operations measured");
    for (m, cost) in measured.iter().zip(costs) {
        let name = m.name;
        let requests: Vec<String> = [&m.during.requests[..], &m.after.requests[..]].concat();
        let (statements, pings, first_uses) = wire.classify(&requests);
        let expected_pings = cost.releases
            + if test_before_acquire {
                cost.acquires
            } else {
                0
            };
        let context = format!("{server}, test_before_acquire = {test_before_acquire}, `{name}`");
        assert_eq!(
            statements, cost.statements,
            "{context}: statements\n  {report}"
        );
        assert_eq!(pings, expected_pings, "{context}: pings\n  {report}");
        assert_eq!(
            first_uses, 0,
            "{context}: a prepare or script load after the warm-up\n  {report}"
        );
        assert_eq!(
            m.during.exchanges + m.after.exchanges,
            statements + pings,
            "{context}: one round trip per request\n  {report}"
        );
    }
}

/// The costs of the store operations, the handler and (for SQL) the `tx` strategy; `held` is
/// what a claim that finds the key completed or in progress runs.
fn costs(held: usize, sql: bool) -> Vec<Cost> {
    let pool = usize::from(sql);
    let mut costs = vec![
        cost("claim", 1, pool, pool),
        cost("complete", 1, pool, pool),
        cost("replay", held, pool, pool),
        cost("held_claim", 1, pool, pool),
        cost("in_progress", held, pool, pool),
        cost("extend", 1, pool, pool),
        cost("release", 1, pool, pool),
        cost("handler_new_key", 2, 2 * pool, 2 * pool),
        cost("handler_replay", held, pool, pool),
    ];
    if sql {
        costs.extend([
            cost("begin", 1, 1, 0),
            cost("claim_in", 2, 0, 0),
            cost("complete_in", 2, 0, 0),
            cost("commit", 1, 0, 1),
            cost("begin_again", 1, 1, 0),
            cost("claim_in_replay", held + 2, 0, 0),
            cost("rollback", 1, 0, 1),
        ]);
    }
    costs
}

/// Warms `store` up on its pool of one connection, then measures every store and `tx`
/// operation through `proxy` and checks them against [`costs`]`(held, true)`.
async fn measure_sql<S: TxStore>(
    proxy: &CountingProxy,
    store: &S,
    pool: &sqlx::Pool<S::Database>,
    (name, wire, held, pings): (&str, Wire, usize, bool),
) {
    store_operations(store, None).await;
    tx_operations(store, pool, None).await;

    let idle = || pool.num_idle() == pool.size() as usize;
    let mut meter = Meter::start(proxy, Some(Box::new(idle))).await;
    store_operations(store, Some(&mut meter)).await;
    tx_operations(store, pool, Some(&mut meter)).await;
    check(name, wire, &meter.taken, &costs(held, true), pings);
}

// One thread: the task sqlx spawns to return a connection runs only when the test awaits.
#[tokio::test(flavor = "current_thread")]
async fn postgres_operations_cost_one_round_trip_each() {
    let url = sql_servers::postgres_url();
    if sql_servers::postgres_pool().await.is_none() {
        return; // unreachable: said so
    }
    let (proxy, proxied) = CountingProxy::in_front_of(&url, 5432, Protocol::Postgres)
        .await
        .expect("start the counting proxy");
    for pings in [false, true] {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .test_before_acquire(pings)
            .connect(&proxied)
            .await
            .expect("a pool through the proxy");
        let store = sql_servers::postgres_store(pool.clone(), SystemClock).await;
        let expected = ("PostgreSQL", Wire::Postgres, 1, pings);
        measure_sql(&proxy, &store.store, &pool, expected).await;
        pool.close().await;
    }
}

// One thread: the task sqlx spawns to return a connection runs only when the test awaits.
#[tokio::test(flavor = "current_thread")]
async fn mysql_operations_cost_one_round_trip_each_and_a_read_as_on_mysql() {
    let url = sql_servers::mysql_url();
    if sql_servers::mysql_pool().await.is_none() {
        return; // unreachable: said so
    }
    let (proxy, proxied) = CountingProxy::in_front_of(&url, 3306, Protocol::MySql)
        .await
        .expect("start the counting proxy");
    for pings in [false, true] {
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(1)
            .test_before_acquire(pings)
            .connect(&proxied)
            .await
            .expect("a pool through the proxy");
        for as_on_mysql in [false, true] {
            let store = if as_on_mysql {
                sql_servers::mysql_store_as_on_mysql(pool.clone(), SystemClock).await
            } else {
                sql_servers::mysql_store(pool.clone(), SystemClock).await
            };
            // On MariaDB the claim returns the record it leaves; as on MySQL a read follows.
            let (name, held) = if as_on_mysql {
                ("MariaDB claiming as on MySQL", 2)
            } else {
                ("MariaDB", 1)
            };
            measure_sql(
                &proxy,
                &store.store,
                &pool,
                (name, Wire::MySql, held, pings),
            )
            .await;
        }
        pool.close().await;
    }
}

// One thread: the task sqlx spawns to return a connection runs only when the test awaits.
#[tokio::test(flavor = "current_thread")]
async fn redis_operations_cost_one_script_each() {
    if redis_server::client().await.is_none() {
        return; // unreachable: said so
    }
    let (proxy, proxied) = CountingProxy::in_front_of(&redis_server::url(), 6379, Protocol::Redis)
        .await
        .expect("start the counting proxy");
    let client = redis::Client::open(proxied.as_str()).expect("the proxied URL");
    let manager = redis::aio::ConnectionManager::new(client)
        .await
        .expect("a connection manager through the proxy");
    let cleanup = redis_server::Cleanup::fresh();
    let store = idem_runtime::redis::RedisStore::new(manager)
        .with_prefix(&cleanup.prefix)
        .expect("a unique name is a valid prefix");
    store_operations(&store, None).await;

    let mut meter = Meter::start(&proxy, None).await;
    store_operations(&store, Some(&mut meter)).await;
    check("Redis", Wire::Redis, &meter.taken, &costs(1, false), false);
}
