//! The order service of `examples` over HTTP, on SQLite, PostgreSQL and MariaDB: orders created
//! once per `Idempotency-Key`, paid and cancelled once by their state, the `OrderPaid` event
//! written once with the payment.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use idem_examples::orders::{Moved, Order, OrderDb, OrderService, relay};
use idem_examples::points::{Consumer, GROUP, Points, PointsDb, Tables};
use idem_examples::stream::{EventStream, MemoryStream, RedisStream};
use idem_runtime::http::IDEMPOTENT_REPLAYED;
use sqlx::{AssertSqlSafe, Pool};
use tower::ServiceExt as _;

/// A response read whole.
struct Answer {
    status: StatusCode,
    replayed: bool,
    body: String,
}

impl Answer {
    fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.body).unwrap_or_else(|error| panic!("{error}: {}", self.body))
    }
}

async fn send(router: &Router, request: Request<Body>) -> Answer {
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("a body");
    Answer {
        status,
        replayed,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn create(key: Option<&str>, user: i64, amount_cents: i64) -> Request<Body> {
    let mut request = Request::post("/orders")
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-client-id", "shop-frontend");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let body = serde_json::json!({ "user_id": user, "amount_cents": amount_cents });
    request
        .body(Body::from(body.to_string()))
        .expect("a request")
}

fn post(uri: &str) -> Request<Body> {
    Request::post(uri).body(Body::empty()).expect("a request")
}

async fn count<DB: OrderDb, V>(pool: &Pool<DB>, statement: &str, value: V) -> i64
where
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
    for<'q> V: sqlx::Encode<'q, DB> + sqlx::Type<DB> + Send + 'static,
    for<'r> (i64,): sqlx::FromRow<'r, DB::Row>,
{
    let statement = statement.replace('?', &DB::placeholder(1));
    sqlx::query_scalar(AssertSqlSafe(statement))
        .bind(value)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// The whole flow on one database, in one test per database since the service's tables have
/// fixed names.
async fn order_flow<DB: OrderDb>(pool: Pool<DB>)
where
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'r> (i64,): sqlx::FromRow<'r, DB::Row>,
{
    // The tables of an earlier run may have an older shape.
    for table in ["orders", "payments", "outbox"] {
        sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
            .execute(&pool)
            .await
            .expect("drop an old table");
    }
    let service = OrderService::new(pool.clone()).await.expect("migrate");
    let router = service.router().expect("a router");
    // A user of this run alone.
    let user = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos()
            % 1_000_000_000_000_000,
    )
    .expect("fits");
    let key = idem_tests::servers::unique_name("create");

    // 16 copies of one create at once: one order.
    let copies: Vec<_> = (0..16)
        .map(|_| {
            let (router, request) = (router.clone(), create(Some(&key), user, 2500));
            tokio::spawn(async move { send(&router, request).await })
        })
        .collect();
    let mut created: Option<Order> = None;
    for copy in copies {
        let answer = copy.await.expect("a copy");
        match answer.status {
            StatusCode::CREATED => {
                let order: Order = answer.json();
                if let Some(first) = &created {
                    assert_eq!(&order, first, "every copy sees the one order");
                }
                created = Some(order);
            }
            StatusCode::CONFLICT => {} // still running: retry later
            other => panic!("{other}: {}", answer.body),
        }
    }
    let order = created.expect("one copy created the order");
    assert_eq!(order.status, "Created");
    assert_eq!(order.amount_cents, 2500);
    let orders = count(&pool, "SELECT COUNT(*) FROM orders WHERE user_id = ?", user).await;
    assert_eq!(orders, 1, "one order for 16 copies");
    let retry = send(&router, create(Some(&key), user, 2500)).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed);
    assert_eq!(retry.json::<Order>(), order);

    // Without a key, or with a bad order: refused.
    assert_eq!(
        send(&router, create(None, user, 2500)).await.status,
        StatusCode::BAD_REQUEST
    );
    let bad = idem_tests::servers::unique_name("bad");
    assert_eq!(
        send(&router, create(Some(&bad), user, 0)).await.status,
        StatusCode::BAD_REQUEST
    );

    // 8 pays at once: one moves the order; one payment, one event.
    let pay = format!("/orders/{}/pay", order.order_no);
    let pays: Vec<_> = (0..8)
        .map(|_| {
            let (router, pay) = (router.clone(), pay.clone());
            tokio::spawn(async move { send(&router, post(&pay)).await })
        })
        .collect();
    let mut moved = 0;
    for pay in pays {
        let answer = pay.await.expect("a pay");
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        let answer: Moved = answer.json();
        assert_eq!(answer.order.status, "Paid");
        moved += usize::from(answer.moved);
    }
    assert_eq!(moved, 1);
    let again: Moved = send(&router, post(&pay)).await.json();
    assert!(!again.moved, "a repeated pay is a no-op");
    let no = &order.order_no;
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM payments WHERE order_no = ?",
            no.clone()
        )
        .await,
        1
    );
    let event = format!("%\"order_no\":\"{no}\"%");
    let events = count(
        &pool,
        "SELECT COUNT(*) FROM outbox WHERE payload LIKE ?",
        event,
    )
    .await;
    assert_eq!(events, 1, "one OrderPaid event");

    // A paid order cannot be cancelled; a cancelled one cannot be paid.
    let refused = send(&router, post(&format!("/orders/{no}/cancel"))).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
    let other = idem_tests::servers::unique_name("create");
    let second: Order = send(&router, create(Some(&other), user, 700)).await.json();
    let cancel = format!("/orders/{}/cancel", second.order_no);
    let cancelled: Moved = send(&router, post(&cancel)).await.json();
    assert!(cancelled.moved);
    let cancelled_again: Moved = send(&router, post(&cancel)).await.json();
    assert!(!cancelled_again.moved);
    let refused = send(&router, post(&format!("/orders/{}/pay", second.order_no))).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
    assert!(refused.body.contains("Cancelled"), "{}", refused.body);
    let shown: Order = send(
        &router,
        Request::get(format!("/orders/{}", second.order_no))
            .body(Body::empty())
            .expect("a request"),
    )
    .await
    .json();
    assert_eq!(shown.status, "Cancelled");

    // Unknown orders.
    assert_eq!(
        send(&router, post("/orders/O-none/pay")).await.status,
        StatusCode::NOT_FOUND
    );
    let _ = Arc::strong_count(&service);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_flow_on_sqlite() {
    let file = idem_tests::sqlite_file::TempDb::new("orders");
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(
            file.url()
                .parse::<sqlx::sqlite::SqliteConnectOptions>()
                .expect("a SQLite URL")
                .create_if_missing(true)
                .busy_timeout(std::time::Duration::from_secs(10)),
        )
        .await
        .expect("open SQLite");
    order_flow(pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_flow_on_mysql() {
    if let Some(pool) = idem_tests::sql_servers::mysql_pool().await {
        order_flow(pool).await;
    }
}

/// From the HTTP API to the points ledger: orders paid through the order service, their
/// events relayed from the outbox (one of them twice, as a relay that died between the
/// stream's append and marking it published would), consumed by two points consumers — each
/// order credited once.
async fn orders_to_points<DB, S>(pool: Pool<DB>, store: <DB as PointsDb>::Store, stream: S)
where
    DB: OrderDb + PointsDb,
    S: EventStream + Clone + 'static,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    for table in ["orders", "payments", "outbox"] {
        sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
            .execute(&pool)
            .await
            .expect("drop an old table");
    }
    let service = OrderService::new(pool.clone()).await.expect("migrate");
    let router = service.router().expect("a router");
    let prefix = idem_tests::servers::unique_name("pts");
    let points = Arc::new(Points::<DB>::with_tables(
        store,
        Tables::with_prefix(&prefix).expect("a prefix"),
    ));
    points.migrate().await.expect("migrate the points tables");
    stream.create_group(GROUP).await.expect("a group");

    // Three orders of one user, paid (one of them twice); a fourth cancelled.
    let user = 4242;
    let mut expected = 0;
    for (n, amount) in [(1, 12_000), (2, 550), (3, 99)] {
        let key = format!("{prefix}-{n}");
        let order: Order = send(&router, create(Some(&key), user, amount)).await.json();
        let pay = format!("/orders/{}/pay", order.order_no);
        assert!(send(&router, post(&pay)).await.json::<Moved>().moved);
        if n == 1 {
            assert!(!send(&router, post(&pay)).await.json::<Moved>().moved);
        }
        expected += amount / 100;
    }
    let cancelled: Order = send(&router, create(Some(&format!("{prefix}-4")), user, 5000))
        .await
        .json();
    send(
        &router,
        post(&format!("/orders/{}/cancel", cancelled.order_no)),
    )
    .await;

    // The relay died after appending the first event: it is published again by the next pass.
    let (_, first) = DB::unpublished(&pool, 1)
        .await
        .expect("the outbox")
        .into_iter()
        .next()
        .expect("an event");
    stream.append(&first).await.expect("the lost publish");
    let relayed = relay(&pool, &stream).await.expect("relay");
    assert_eq!(relayed.published, 3, "one event per payment");
    assert_eq!(relay(&pool, &stream).await.expect("relay").published, 0);

    // Two consumers share the group.
    let consumers: Vec<_> = ["points-a", "points-b"]
        .into_iter()
        .map(|name| {
            Consumer::new(stream.clone(), points.clone(), GROUP, name)
                .block(std::time::Duration::from_millis(50))
        })
        .collect();
    for _ in 0..4 {
        for consumer in &consumers {
            consumer.poll().await.expect("a poll");
        }
    }
    let (mut credited, mut replayed) = (0, 0);
    for consumer in &consumers {
        let tally = consumer.counters().get();
        credited += tally.credited;
        replayed += tally.replayed;
        assert_eq!(tally.not_acked, 0);
    }
    assert_eq!(
        (credited, replayed),
        (3, 1),
        "4 entries: 3 credits, 1 duplicate absorbed"
    );
    assert_eq!(points.balance(user).await.expect("a balance"), expected);
    assert_eq!(points.ledger(user).await.expect("the ledger").len(), 3);
    for table in [points.tables().ledger(), points.tables().balances()] {
        sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE {table}")))
            .execute(&pool)
            .await
            .expect("drop a points table");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orders_to_points_on_sqlite_and_memory_stream() {
    let file = idem_tests::sqlite_file::TempDb::new("orders_to_points");
    let store = <sqlx::Sqlite as PointsDb>::connect(&file.url())
        .await
        .expect("open SQLite");
    let pool = <sqlx::Sqlite as PointsDb>::pool(&store).clone();
    orders_to_points(pool, store, MemoryStream::new("orders.paid")).await;
}

/// On PostgreSQL both flows run in one test: the service's tables have fixed names.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_flow_then_orders_to_points_on_postgres_and_redis() {
    let Some(pool) = idem_tests::sql_servers::postgres_pool().await else {
        return;
    };
    order_flow(pool.clone()).await;
    let Some(connection) = idem_tests::redis_server::manager().await else {
        return;
    };
    let key = idem_tests::servers::unique_name("orders_paid");
    let stream = Arc::new(RedisStream::new(connection.clone(), &key));
    let records = idem_tests::servers::unique_name("idem_pts");
    let _drop = idem_tests::sql_servers::DropTable {
        server: idem_tests::sql_servers::Server::Postgres,
        table: records.clone(),
    };
    let store = idem_runtime::postgres::PostgresStore::new(pool.clone())
        .with_table(&records)
        .expect("a table name");
    orders_to_points(pool, store, stream).await;
    let mut connection = connection;
    let _: Result<(), _> = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut connection)
        .await;
}
