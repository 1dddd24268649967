//! `POST /orders` of the order service in `tx` mode (`IdempotencyLayer::in_tx`), on a real
//! server and a real client, on SQLite, PostgreSQL and MariaDB: the key is claimed, the order
//! inserted and the response stored in one transaction. A client that gives up and retries, a
//! copy during a slow create and a connection cut between the handler and its commit never
//! make a second order; body rejections are problems of their own type.
//!
//! The service's tables have fixed names, so the cases of one server run one after the other
//! in one test; each uses a user id and a caller of its own, and counts only those.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use idem_examples::orders::{OrderDb, OrderService};
use idem_runtime::RecordKey;
use idem_runtime::http::problem_type;
use idem_tests::http_client::{
    self, Answer, CutOffs, Request, send, send_until_settled, send_within,
};
use idem_tests::proxy::{self, FaultProxy};
use idem_tests::sql_servers;
use sqlx::Pool;

/// The service on a real server, and a pool straight to its database for the counts.
struct Rig<DB: OrderDb> {
    service: Arc<OrderService<DB>>,
    addr: SocketAddr,
    direct: Pool<DB>,
    /// The proxy between the service and its database, where there is a network.
    proxy: Option<FaultProxy>,
    /// Requests whose future the server dropped before they finished (their client hung up).
    cut_offs: CutOffs,
}

impl<DB: OrderDb> Rig<DB> {
    async fn start(pool: Pool<DB>, direct: Pool<DB>, proxy: Option<FaultProxy>) -> Self {
        let service = OrderService::new(pool).await.expect("the service's tables");
        let (router, cut_offs) = http_client::watch(service.router().expect("the router"));
        let addr = http_client::serve(router).await;
        Self {
            service,
            addr,
            direct,
            proxy,
            cut_offs,
        }
    }
}

/// A test's own caller and user, so that its counts see only its own orders.
struct Client {
    caller: String,
    user: i64,
}

impl Client {
    fn new() -> Self {
        let id = uuid::Uuid::new_v4();
        let user = i64::from(u32::from_be_bytes(
            id.as_bytes()[..4].try_into().expect("4 bytes"),
        )) + 1;
        Self {
            caller: format!("client-{}", id.simple()),
            user,
        }
    }

    fn create(&self, key: &str, amount_cents: i64) -> Request {
        let body = serde_json::json!({ "user_id": self.user, "amount_cents": amount_cents });
        Request::post("/orders", &body.to_string())
            .header("x-client-id", &self.caller)
            .header("idempotency-key", key)
    }

    /// The record of `key` of this caller.
    fn record(&self, key: &str) -> RecordKey {
        idem_runtime::http::record_key("orders.create", &self.caller, key).expect("a key")
    }
}

/// What the database holds for a client: its orders, and whether a key has a record.
trait Held: OrderDb {
    /// The orders of `user`, and the records of `record` (0 or 1).
    fn held(
        pool: &Pool<Self>,
        user: i64,
        record: &RecordKey,
    ) -> impl std::future::Future<Output = (i64, i64)> + Send;
}

macro_rules! held {
    ($($db:ty),*) => {$(
        impl Held for $db {
            async fn held(pool: &Pool<Self>, user: i64, record: &RecordKey) -> (i64, i64) {
                let count = |statement: &str| idem_examples::orders::sql::<Self>(statement);
                let orders = sqlx::query_scalar(count("SELECT COUNT(*) FROM orders WHERE user_id = ?"))
                    .bind(user)
                    .fetch_one(pool)
                    .await
                    .expect("count the orders");
                let records = sqlx::query_scalar(count(
                    "SELECT COUNT(*) FROM idem_records WHERE scope = ? AND business_key = ?",
                ))
                .bind(record.scope())
                .bind(record.key())
                .fetch_one(pool)
                .await
                .expect("count the records");
                (orders, records)
            }
        }
    )*};
}

held!(sqlx::Sqlite, sqlx::Postgres, sqlx::MySql);

async fn held<DB: Held>(rig: &Rig<DB>, client: &Client, key: &str) -> (i64, i64) {
    DB::held(&rig.direct, client.user, &client.record(key)).await
}

fn order_no(answer: &Answer) -> String {
    answer.json()["order_no"]
        .as_str()
        .unwrap_or_else(|| panic!("an order: {answer:?}"))
        .to_owned()
}

/// The first create runs, its retries replay it: one order.
async fn creates_once_and_replays<DB: Held>(rig: &Rig<DB>) {
    let client = Client::new();
    let request = client.create("\"k-1\"", 1200);
    let first = send(rig.addr, &request).await.expect("loopback");
    assert_eq!(first.status, 201, "{}", first.body);
    assert!(!first.replayed());
    for _ in 0..3 {
        let retry = send(rig.addr, &request).await.expect("loopback");
        assert_eq!(retry.status, 201);
        assert!(retry.replayed());
        assert_eq!(order_no(&retry), order_no(&first));
    }
    assert_eq!(held(rig, &client, "k-1").await, (1, 1));
}

/// Eight copies while the first create is slow: the copies wait on the record's row lock and
/// replay (or get `409`), never a second order.
async fn copies_during_a_slow_create_never_make_a_second_order<DB: Held>(rig: &Rig<DB>) {
    let client = Client::new();
    rig.service.pause_each_create(Duration::from_millis(400));
    let request = client.create("k-2", 4500);
    let mut copies = Vec::new();
    for _ in 0..8 {
        let request = request.clone();
        let addr = rig.addr;
        copies.push(tokio::spawn(async move { send(addr, &request).await }));
    }
    let mut created = Vec::new();
    for copy in copies {
        let answer = copy.await.expect("a copy").expect("loopback");
        match answer.status {
            201 => created.push((order_no(&answer), answer.replayed())),
            409 => assert_eq!(
                answer.problem_type().as_deref(),
                Some(problem_type::IN_PROGRESS)
            ),
            _ => panic!("{answer:?}"),
        }
    }
    rig.service.pause_each_create(Duration::ZERO);
    assert_eq!(
        created.iter().filter(|(_, replayed)| !replayed).count(),
        1,
        "one copy created the order: {created:?}"
    );
    assert!(created.iter().all(|(order, _)| *order == created[0].0));
    assert_eq!(held(rig, &client, "k-2").await, (1, 1));
}

/// The client gives up before the slow create answers and retries: the create committed on
/// the server all the same, and the retry replays it.
async fn a_client_that_times_out_and_retries_gets_the_first_order<DB: Held>(rig: &Rig<DB>) {
    let client = Client::new();
    rig.service.pause_each_create(Duration::from_millis(300));
    let cut_off_before = rig.cut_offs.count();
    let request = client.create("k-3", 990);
    let gave_up = send_within(rig.addr, &request, Duration::from_millis(50))
        .await
        .expect("loopback");
    assert!(gave_up.is_none(), "the client gave up: {gave_up:?}");
    let retry = send_until_settled(rig.addr, &request, Duration::from_secs(20))
        .await
        .expect("loopback");
    rig.service.pause_each_create(Duration::ZERO);
    assert_eq!(retry.status, 201, "{}", retry.body);
    assert!(
        retry.replayed(),
        "the first create finished without its client"
    );
    assert!(
        rig.cut_offs.count() > cut_off_before,
        "the server dropped the request of the client that gave up"
    );
    assert_eq!(held(rig, &client, "k-3").await, (1, 1));
}

/// Body rejections are problems of the type `body-invalid`, told apart from a key reused with
/// another body (`key-reused`); nothing is created.
async fn body_rejections_are_problems_of_their_own_type<DB: Held>(rig: &Rig<DB>) {
    let client = Client::new();
    let with = |key: &str, body: &str| {
        Request::post("/orders", body)
            .header("x-client-id", &client.caller)
            .header("idempotency-key", key)
    };
    let user = client.user;
    let missing_amount = format!(r#"{{"user_id": {user}}}"#);
    let whole = format!(r#"{{"user_id": {user}, "amount_cents": 5}}"#);
    for (request, status) in [
        (with("b-1", "{not json"), 400),
        (with("b-2", &missing_amount), 422),
        (with("b-3", &whole).content_type("text/plain"), 415),
    ] {
        let answer = send(rig.addr, &request).await.expect("loopback");
        assert_eq!(answer.status, status, "{}", answer.body);
        assert_eq!(
            answer.problem_type().as_deref(),
            Some(problem_type::BODY_INVALID),
            "{answer:?}"
        );
        assert_eq!(answer.json()["status"], status);
    }
    let first = send(rig.addr, &client.create("b-4", 700))
        .await
        .expect("loopback");
    assert_eq!(first.status, 201);
    let reused = send(rig.addr, &client.create("b-4", 701))
        .await
        .expect("loopback");
    assert_eq!(reused.status, 422);
    assert_eq!(
        reused.problem_type().as_deref(),
        Some(problem_type::KEY_REUSED)
    );
    // One order, b-4's: none of the refused bodies made one.
    assert_eq!(held(rig, &client, "b-4").await, (1, 1));
}

/// The connection between the service and its database is cut after the handler inserted the
/// order, before the commit: nothing is committed — no order, no record — and the client is
/// told so; the retry creates the order once.
async fn a_cut_before_the_commit_leaves_no_order_and_no_record<DB: Held>(rig: &Rig<DB>) {
    let proxy = rig.proxy.as_ref().expect("a proxy");
    let client = Client::new();
    rig.service.pause_each_create(Duration::from_millis(500));
    let request = client.create("k-4", 3000);
    let inserted = rig.service.inserted().notified();
    tokio::pin!(inserted);
    inserted.as_mut().enable();
    let answer = tokio::spawn({
        let (addr, request) = (rig.addr, request.clone());
        async move { send(addr, &request).await }
    });
    inserted.await;
    proxy.cut();
    let answer = answer.await.expect("the create").expect("loopback");
    rig.service.pause_each_create(Duration::ZERO);
    assert!(
        matches!(answer.status, 502 | 503),
        "the cut fails the create: {answer:?}"
    );
    if answer.status == 503 {
        assert_eq!(
            answer.problem_type().as_deref(),
            Some(problem_type::NOT_PROCESSED)
        );
        assert!(
            answer.body.contains("could not be stored"),
            "the handler ran: {answer:?}"
        );
    }
    assert!(answer.retry_after().is_some());
    assert_eq!(
        held(rig, &client, "k-4").await,
        (0, 0),
        "nothing of the create was committed"
    );
    proxy.restore();
    let retry = send_until_settled(rig.addr, &request, Duration::from_secs(20))
        .await
        .expect("loopback");
    assert_eq!(retry.status, 201, "{}", retry.body);
    assert!(!retry.replayed(), "the retry created the order");
    let again = send(rig.addr, &request).await.expect("loopback");
    assert!(again.replayed());
    assert_eq!(order_no(&again), order_no(&retry));
    assert_eq!(held(rig, &client, "k-4").await, (1, 1));
}

/// A copy of a create that takes longer (5 s) than the layer's wait (1 s by default) gives up on the
/// record's row lock with `409` instead of holding a connection until the first commits; the
/// first commits once, and a retry after it replays.
async fn a_copy_of_a_create_slower_than_the_wait_gets_409<DB: Held>(rig: &Rig<DB>) {
    let client = Client::new();
    rig.service.pause_each_create(Duration::from_millis(5000));
    let request = client.create("k-5", 8000);
    let inserted = rig.service.inserted().notified();
    tokio::pin!(inserted);
    inserted.as_mut().enable();
    let first = tokio::spawn({
        let (addr, request) = (rig.addr, request.clone());
        async move { send(addr, &request).await }
    });
    inserted.await;
    let started = std::time::Instant::now();
    let copy = send(rig.addr, &request).await.expect("loopback");
    let waited = started.elapsed();
    rig.service.pause_each_create(Duration::ZERO);
    assert_eq!(copy.status, 409, "{copy:?}");
    assert_eq!(
        copy.problem_type().as_deref(),
        Some(problem_type::IN_PROGRESS)
    );
    assert_eq!(copy.retry_after(), Some(1));
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(4500),
        "the copy waited about the layer's wait, not the whole create: {waited:?}"
    );
    let first = first.await.expect("the first").expect("loopback");
    assert_eq!(first.status, 201, "{}", first.body);
    let retry = send(rig.addr, &request).await.expect("loopback");
    assert!(retry.replayed());
    assert_eq!(order_no(&retry), order_no(&first));
    assert_eq!(held(rig, &client, "k-5").await, (1, 1));
}

/// The service's `COMMIT` never reaches the database (the connection dies just before it):
/// the client is told the outcome is unknown (`502`), nothing was committed, and the retry it
/// is told to send creates the order once.
async fn a_commit_that_is_lost_is_502_and_the_retry_creates_once<DB: Held>(rig: &Rig<DB>) {
    let proxy = rig.proxy.as_ref().expect("a proxy");
    let client = Client::new();
    let request = client.create("k-6", 6100);
    proxy.cut_before(b"COMMIT");
    let answer = send(rig.addr, &request).await.expect("loopback");
    assert_eq!(answer.status, 502, "{answer:?}");
    assert_eq!(
        answer.problem_type().as_deref(),
        Some(problem_type::OUTCOME_UNKNOWN)
    );
    assert_eq!(answer.retry_after(), Some(1));
    assert!(
        answer.body.contains("replays this response if it landed"),
        "{}",
        answer.body
    );
    proxy.restore();
    assert_eq!(
        held(rig, &client, "k-6").await,
        (0, 0),
        "the commit did not land"
    );
    let retry = send_until_settled(rig.addr, &request, Duration::from_secs(20))
        .await
        .expect("loopback");
    assert_eq!(retry.status, 201, "{}", retry.body);
    assert!(
        !retry.replayed(),
        "nothing landed: the retry created the order"
    );
    assert_eq!(held(rig, &client, "k-6").await, (1, 1));
}

/// The cases every database runs.
async fn every_database<DB: Held>(rig: &Rig<DB>) {
    creates_once_and_replays(rig).await;
    copies_during_a_slow_create_never_make_a_second_order(rig).await;
    a_client_that_times_out_and_retries_gets_the_first_order(rig).await;
    body_rejections_are_problems_of_their_own_type(rig).await;
}

/// The cases of a database behind a network connection, which the fault proxy can cut.
async fn networked<DB: Held>(rig: &Rig<DB>) {
    every_database(rig).await;
    a_cut_before_the_commit_leaves_no_order_and_no_record(rig).await;
    a_copy_of_a_create_slower_than_the_wait_gets_409(rig).await;
    a_commit_that_is_lost_is_502_and_the_retry_creates_once(rig).await;
}

/// A pool of 16 connections to `url` through a fault proxy.
async fn proxied<DB: sqlx::Database>(url: &str, default_port: u16) -> (FaultProxy, Pool<DB>) {
    let (proxy, through) = proxy::in_front_of(url, default_port).await;
    let pool = sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&through)
        .await
        .expect("a pool through the proxy");
    (proxy, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tx_creates_on_sqlite() {
    let file = idem_tests::sqlite_file::TempDb::new("orders_tx");
    let store = idem_runtime::sqlite::SqliteStore::connect(&file.url())
        .await
        .expect("open SQLite");
    let pool = store.pool().clone();
    every_database(&Rig::start(pool.clone(), pool, None).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tx_creates_on_postgres() {
    let Some(direct) = sql_servers::postgres_pool().await else {
        return;
    };
    let (proxy, pool) = proxied::<sqlx::Postgres>(&sql_servers::postgres_url(), 5432).await;
    networked(&Rig::start(pool, direct, Some(proxy)).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tx_creates_on_mysql() {
    let Some(direct) = sql_servers::mysql_pool().await else {
        return;
    };
    let (proxy, pool) = proxied::<sqlx::MySql>(&sql_servers::mysql_url(), 3306).await;
    networked(&Rig::start(pool, direct, Some(proxy)).await).await;
}
