//! The order service: an HTTP API over a SQL database.
//!
//! * `POST /orders` creates an order. Clients retry, so the route takes an `Idempotency-Key`
//!   ([`IdempotencyLayer::in_tx`]): the key is claimed, the order inserted and the response
//!   stored in one transaction, committed together. A retry gets the first response, with
//!   the same order number, and no second order is created — also when the client gave up
//!   waiting, the service was killed mid-create, or its database connection was cut: then
//!   nothing was committed and the retry creates the order once.
//! * `POST /orders/{order_no}/pay` moves the order `Created → Paid` with the `state` strategy:
//!   a repeated pay finds the order paid and answers as before, paying a cancelled order is a
//!   `409`. In the same transaction the payment writes an `OrderPaid` event to the `outbox`
//!   table, so the event exists if and only if the payment does.
//! * `POST /orders/{order_no}/cancel` moves it `Created → Cancelled`, the same way.
//! * `GET /orders/{order_no}` reads it.
//!
//! [`relay`] publishes the outbox to the event stream. It marks an event published only after
//! the stream took it, so a crash between the two publishes it again: the stream may carry an
//! event twice — the consumer's idempotency absorbs that — but never loses one.
//!
//! The same code runs on SQLite, PostgreSQL and MySQL / MariaDB: [`OrderDb`] is implemented
//! for each by one macro, since an `#[idempotent]` handler names its database's transaction
//! type.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Json, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use idem_runtime::http::{CallerHeader, IdempotencyLayer, Problem, Tx, TxMode};
use idem_runtime::state::{StateMachine as _, Transitioned};
use idem_runtime::tx::TxStore;
use idem_runtime::{SqlDatabase, StateMachine, idempotent};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Pool};
use tokio_util::sync::CancellationToken;

use crate::events::OrderPaid;
use crate::stream::EventStream;

/// An order's life: paid once (then shipped), or cancelled before payment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, StateMachine)]
pub enum OrderStatus {
    /// Placed, not paid.
    #[state(to(Paid, Cancelled))]
    Created,
    /// Paid: the `OrderPaid` event is in the outbox.
    #[state(to(Shipped))]
    Paid,
    /// On its way.
    Shipped,
    /// Cancelled before payment.
    Cancelled,
}

/// An order as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The business key, chosen by the service.
    pub order_no: String,
    /// Who ordered.
    pub user_id: i64,
    /// What it costs.
    pub amount_cents: i64,
    /// `Created`, `Paid`, `Shipped` or `Cancelled`.
    pub status: String,
}

/// The body of `POST /orders`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewOrder {
    /// Who orders.
    pub user_id: i64,
    /// What it costs, in cents (at least 1).
    pub amount_cents: i64,
}

/// What `POST /orders/{order_no}/pay` and `/cancel` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    /// The order after the request.
    pub order: Order,
    /// Whether this request moved it (`false`: it was already there — a repeated request).
    pub moved: bool,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// idem's outcome: an invalid transition, a store error, …
    #[error(transparent)]
    Idem(#[from] idem_runtime::Error),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// No such order.
    #[error("no order `{0}`")]
    NotFound(String),
    /// The request makes no sense.
    #[error("{0}")]
    Invalid(String),
    /// The request body is not a JSON order.
    #[error("body: {0}")]
    Body(#[from] JsonRejection),
    /// An event could not be encoded.
    #[error("event: {0}")]
    Event(#[from] serde_json::Error),
    /// The event stream refused an event.
    #[error("stream: {0}")]
    Stream(#[from] crate::stream::StreamError),
}

impl IntoResponse for OrderError {
    fn into_response(self) -> Response {
        let problem = match &self {
            Self::NotFound(order_no) => Problem::new(
                StatusCode::NOT_FOUND,
                "Order not found",
                format!("no order has the number `{order_no}`"),
            ),
            Self::Invalid(why) => Problem::new(StatusCode::BAD_REQUEST, "Invalid order", why),
            Self::Body(rejection) => {
                Problem::body_invalid(rejection.status(), rejection.body_text())
            }
            Self::Idem(idem_runtime::Error::InvalidTransition { current, to, .. }) => Problem::new(
                StatusCode::CONFLICT,
                "Order cannot move",
                format!("the order is {current}: it cannot become {to}"),
            ),
            Self::Idem(idem_runtime::Error::RowMissing { id, .. }) => Problem::new(
                StatusCode::NOT_FOUND,
                "Order not found",
                format!("no order has the number {id}"),
            ),
            other => {
                tracing::error!(error = %other, "request failed: 503");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Try again",
                    "the order service could not complete the request; retry it",
                )
                .retry_after(Duration::from_secs(1))
            }
        };
        problem.into_response()
    }
}

/// What the service does in its database; implemented for SQLite, PostgreSQL and MySQL.
pub trait OrderDb: SqlDatabase {
    /// The idempotency store of this database, which keeps records in its transactions.
    type Store: TxStore<Database = Self> + 'static;

    /// The store, on `pool` (its table must be migrated).
    fn store(pool: Pool<Self>) -> Self::Store;

    /// Creates the service's tables and the store's.
    fn migrate(pool: &Pool<Self>) -> impl Future<Output = Result<(), OrderError>> + Send;

    /// Inserts a new order on `connection` (the request's transaction).
    fn insert(
        connection: &mut Self::Connection,
        order: &Order,
    ) -> impl Future<Output = Result<(), OrderError>> + Send;

    /// Reads an order.
    fn find(
        pool: &Pool<Self>,
        order_no: &str,
    ) -> impl Future<Output = Result<Option<Order>, OrderError>> + Send;

    /// Pays an order, `Created → Paid`, writing its `OrderPaid` event to the outbox in the
    /// same transaction.
    fn pay(
        pool: &Pool<Self>,
        order_no: &str,
    ) -> impl Future<Output = Result<Transitioned<(), OrderStatus>, OrderError>> + Send;

    /// Cancels an order, `Created → Cancelled`.
    fn cancel(
        pool: &Pool<Self>,
        order_no: &str,
    ) -> impl Future<Output = Result<Transitioned<(), OrderStatus>, OrderError>> + Send;

    /// Up to `limit` events not yet published, oldest first: `(id, payload)`.
    fn unpublished(
        pool: &Pool<Self>,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<(i64, String)>, OrderError>> + Send;

    /// Marks the event `id` published.
    fn published(pool: &Pool<Self>, id: i64)
    -> impl Future<Output = Result<(), OrderError>> + Send;
}

/// `statement` with its `?` placeholders written the way `DB` wants them (`$1` on PostgreSQL).
pub fn sql<DB: SqlDatabase>(statement: &str) -> AssertSqlSafe<String> {
    let mut written = String::with_capacity(statement.len() + 8);
    let mut n = 0;
    for c in statement.chars() {
        if c == '?' {
            n += 1;
            written.push_str(&DB::placeholder(n));
        } else {
            written.push(c);
        }
    }
    AssertSqlSafe(written)
}

/// The tables, in the types every supported database takes.
const SCHEMA: [&str; 3] = [
    "CREATE TABLE IF NOT EXISTS orders (
        order_no VARCHAR(64) PRIMARY KEY,
        user_id BIGINT NOT NULL,
        amount_cents BIGINT NOT NULL,
        status VARCHAR(16) NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS payments (
        order_no VARCHAR(64) PRIMARY KEY,
        amount_cents BIGINT NOT NULL
    )",
    // `id` is numbered by the database: AUTOINCREMENT / SERIAL / AUTO_INCREMENT below.
    "CREATE TABLE IF NOT EXISTS outbox (
        id {ID},
        topic VARCHAR(64) NOT NULL,
        payload TEXT NOT NULL,
        published INTEGER NOT NULL DEFAULT 0
    )",
];

/// [`OrderDb`] for one database: `$id` is its auto-numbered key column type.
macro_rules! order_db {
    ($db:ty, $store:ty, $id:literal) => {
        impl OrderDb for $db {
            type Store = $store;

            fn store(pool: Pool<Self>) -> Self::Store {
                <$store>::new(pool)
            }

            async fn migrate(pool: &Pool<Self>) -> Result<(), OrderError> {
                for statement in SCHEMA {
                    sqlx::raw_sql(AssertSqlSafe(statement.replace("{ID}", $id)))
                        .execute(pool)
                        .await?;
                }
                Self::store(pool.clone()).migrate().await?;
                Ok(())
            }

            async fn insert(
                connection: &mut <Self as sqlx::Database>::Connection,
                order: &Order,
            ) -> Result<(), OrderError> {
                sqlx::query(sql::<Self>(
                    "INSERT INTO orders (order_no, user_id, amount_cents, status) VALUES (?, ?, ?, ?)",
                ))
                .bind(&order.order_no)
                .bind(order.user_id)
                .bind(order.amount_cents)
                .bind(&order.status)
                .execute(connection)
                .await?;
                Ok(())
            }

            async fn find(pool: &Pool<Self>, order_no: &str) -> Result<Option<Order>, OrderError> {
                let row: Option<(String, i64, i64, String)> = sqlx::query_as(sql::<Self>(
                    "SELECT order_no, user_id, amount_cents, status FROM orders WHERE order_no = ?",
                ))
                .bind(order_no)
                .fetch_optional(pool)
                .await?;
                Ok(row.map(|(order_no, user_id, amount_cents, status)| Order {
                    order_no,
                    user_id,
                    amount_cents,
                    status,
                }))
            }

            async fn pay(
                pool: &Pool<Self>,
                order_no: &str,
            ) -> Result<Transitioned<(), OrderStatus>, OrderError> {
                /// `Created → Paid`; the body records the payment and its event.
                #[idempotent(
                    strategy = "state",
                    machine = OrderStatus,
                    from = Created,
                    to = Paid,
                    table = "orders",
                    id = order_no,
                    id_column = "order_no",
                    tx = tx,
                )]
                async fn paid(
                    tx: &mut sqlx::Transaction<'_, $db>,
                    order_no: &str,
                ) -> Result<Transitioned<(), OrderStatus>, OrderError> {
                    let (user_id, amount_cents): (i64, i64) = sqlx::query_as(sql::<$db>(
                        "SELECT user_id, amount_cents FROM orders WHERE order_no = ?",
                    ))
                    .bind(order_no)
                    .fetch_one(&mut **tx)
                    .await?;
                    sqlx::query(sql::<$db>(
                        "INSERT INTO payments (order_no, amount_cents) VALUES (?, ?)",
                    ))
                    .bind(order_no)
                    .bind(amount_cents)
                    .execute(&mut **tx)
                    .await?;
                    let paid = u64::try_from(amount_cents).map_err(|_| {
                        OrderError::Invalid(format!("order {order_no} has a negative amount"))
                    })?;
                    let event = OrderPaid::new(order_no, user_id, paid);
                    sqlx::query(sql::<$db>(
                        "INSERT INTO outbox (topic, payload) VALUES ('order_paid', ?)",
                    ))
                    .bind(event.to_json()?)
                    .execute(&mut **tx)
                    .await?;
                    Ok(())
                }

                let mut tx = pool.begin().await?;
                let moved = paid(&mut tx, order_no).await?;
                tx.commit().await?;
                Ok(moved)
            }

            async fn cancel(
                pool: &Pool<Self>,
                order_no: &str,
            ) -> Result<Transitioned<(), OrderStatus>, OrderError> {
                /// `Created → Cancelled`: nothing else to write.
                #[idempotent(
                    strategy = "state",
                    machine = OrderStatus,
                    from = Created,
                    to = Cancelled,
                    table = "orders",
                    id = order_no,
                    id_column = "order_no",
                    tx = tx,
                )]
                async fn cancelled(
                    tx: &mut sqlx::Transaction<'_, $db>,
                    order_no: &str,
                ) -> Result<Transitioned<(), OrderStatus>, OrderError> {
                    let _ = order_no;
                    Ok(())
                }

                let mut tx = pool.begin().await?;
                let moved = cancelled(&mut tx, order_no).await?;
                tx.commit().await?;
                Ok(moved)
            }

            async fn unpublished(
                pool: &Pool<Self>,
                limit: i64,
            ) -> Result<Vec<(i64, String)>, OrderError> {
                let events = sqlx::query_as(sql::<Self>(
                    "SELECT id, payload FROM outbox WHERE published = 0 ORDER BY id LIMIT ?",
                ))
                .bind(limit)
                .fetch_all(pool)
                .await?;
                Ok(events)
            }

            async fn published(pool: &Pool<Self>, id: i64) -> Result<(), OrderError> {
                sqlx::query(sql::<Self>("UPDATE outbox SET published = 1 WHERE id = ?"))
                    .bind(id)
                    .execute(pool)
                    .await?;
                Ok(())
            }
        }
    };
}

order_db!(
    sqlx::Sqlite,
    idem_runtime::sqlite::SqliteStore,
    "INTEGER PRIMARY KEY AUTOINCREMENT"
);
order_db!(
    sqlx::Postgres,
    idem_runtime::postgres::PostgresStore,
    "BIGSERIAL PRIMARY KEY"
);
order_db!(
    sqlx::MySql,
    idem_runtime::mysql::MySqlStore,
    "BIGINT AUTO_INCREMENT PRIMARY KEY"
);

/// The service: its database pool and the idempotency layer of `POST /orders`.
pub struct OrderService<DB: OrderDb> {
    pool: Pool<DB>,
    create: IdempotencyLayer<DB::Store, TxMode>,
    /// Fault injection: how long each create waits after its insert, in milliseconds.
    create_pause: AtomicU64,
    /// Notified after each create's insert.
    inserted: tokio::sync::Notify,
}

impl<DB: OrderDb> OrderService<DB> {
    /// The service on `pool`, its tables created.
    ///
    /// # Errors
    ///
    /// When the tables cannot be created.
    pub async fn new(pool: Pool<DB>) -> Result<Arc<Self>, OrderError> {
        DB::migrate(&pool).await?;
        let create = IdempotencyLayer::in_tx(DB::store(pool.clone()), "orders.create")?
            .caller(CallerHeader::new("x-client-id")?);
        Ok(Arc::new(Self {
            pool,
            create,
            create_pause: AtomicU64::new(0),
            inserted: tokio::sync::Notify::new(),
        }))
    }

    /// Fault injection, for tests and the soak: each create waits `pause` after inserting its
    /// order, before it answers (and before its transaction commits), so that clients time out
    /// and retry while it runs.
    pub fn pause_each_create(&self, pause: Duration) {
        let millis = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
        self.create_pause.store(millis, Ordering::Relaxed);
    }

    /// Fault injection: each create notifies the waiters of this (`notify_waiters`: a create
    /// with nobody waiting leaves no permit) right after its insert, before its pause and its
    /// commit, so that a test can cut the connection or kill the process there.
    pub fn inserted(&self) -> &tokio::sync::Notify {
        &self.inserted
    }

    /// Waits until every create that was claimed has committed or rolled back, including those
    /// whose client went away: call it after the server stopped.
    pub async fn finished(&self) {
        self.create.finished().await;
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// The HTTP API (see the [module](self)). `POST /orders` takes an `Idempotency-Key`,
    /// scoped by the `x-client-id` header.
    ///
    /// # Errors
    ///
    /// Never in practice: kept so that a router with fallible parts fits here.
    pub fn router(self: &Arc<Self>) -> Result<Router, idem_runtime::Error> {
        Ok(Router::new()
            .route("/orders", post(create::<DB>).layer(self.create.clone()))
            .route("/orders/{order_no}", get(find::<DB>))
            .route("/orders/{order_no}/pay", post(pay::<DB>))
            .route("/orders/{order_no}/cancel", post(cancel::<DB>))
            .with_state(self.clone()))
    }
}

/// `POST /orders`, in the request's transaction: the key is claimed in it, and the layer
/// stores this response in it and commits.
async fn create<DB: OrderDb>(
    State(service): State<Arc<OrderService<DB>>>,
    mut tx: Tx<DB>,
    body: Result<Json<NewOrder>, JsonRejection>,
) -> Result<(StatusCode, Json<Order>), OrderError> {
    let Json(new) = body?;
    if new.user_id < 1 {
        return Err(OrderError::Invalid(
            "`user_id` must be at least 1".to_owned(),
        ));
    }
    if new.amount_cents < 1 {
        return Err(OrderError::Invalid(
            "`amount_cents` must be at least 1".to_owned(),
        ));
    }
    let order = Order {
        order_no: format!("O-{}", uuid::Uuid::new_v4().simple()),
        user_id: new.user_id,
        amount_cents: new.amount_cents,
        status: OrderStatus::Created.name().to_owned(),
    };
    DB::insert(&mut tx, &order).await?;
    service.inserted.notify_waiters();
    let pause = service.create_pause.load(Ordering::Relaxed);
    if pause > 0 {
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    Ok((StatusCode::CREATED, Json(order)))
}

async fn find<DB: OrderDb>(
    State(service): State<Arc<OrderService<DB>>>,
    Path(order_no): Path<String>,
) -> Result<Json<Order>, OrderError> {
    match DB::find(&service.pool, &order_no).await? {
        Some(order) => Ok(Json(order)),
        None => Err(OrderError::NotFound(order_no)),
    }
}

async fn pay<DB: OrderDb>(
    State(service): State<Arc<OrderService<DB>>>,
    Path(order_no): Path<String>,
) -> Result<Json<Moved>, OrderError> {
    let moved = DB::pay(&service.pool, &order_no).await?;
    moved_answer(&service, order_no, moved).await
}

async fn cancel<DB: OrderDb>(
    State(service): State<Arc<OrderService<DB>>>,
    Path(order_no): Path<String>,
) -> Result<Json<Moved>, OrderError> {
    let moved = DB::cancel(&service.pool, &order_no).await?;
    moved_answer(&service, order_no, moved).await
}

async fn moved_answer<DB: OrderDb>(
    service: &OrderService<DB>,
    order_no: String,
    moved: Transitioned<(), OrderStatus>,
) -> Result<Json<Moved>, OrderError> {
    let order = DB::find(&service.pool, &order_no)
        .await?
        .ok_or(OrderError::NotFound(order_no))?;
    Ok(Json(Moved {
        order,
        moved: matches!(moved, Transitioned::Applied(())),
    }))
}

/// What [`relay`] did in one pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Events appended to the stream.
    pub published: usize,
}

/// Publishes the unpublished events of the outbox to `stream`, oldest first, and marks each
/// published once the stream took it. Returns what it did; call it in a loop (see
/// [`relay_until`]).
///
/// # Errors
///
/// When the database or the stream fails; the events not marked are published by the next
/// pass (some of them perhaps twice).
pub async fn relay<DB: OrderDb, S: EventStream>(
    pool: &Pool<DB>,
    stream: &S,
) -> Result<Relayed, OrderError> {
    let mut relayed = Relayed::default();
    for (id, payload) in DB::unpublished(pool, 100).await? {
        stream.append(&payload).await?;
        DB::published(pool, id).await?;
        relayed.published += 1;
    }
    Ok(relayed)
}

/// Runs [`relay`] every `every` until `stop` is cancelled, logging failures and going on.
pub async fn relay_until<DB: OrderDb, S: EventStream>(
    pool: &Pool<DB>,
    stream: &S,
    every: Duration,
    stop: &CancellationToken,
) {
    loop {
        match relay(pool, stream).await {
            Ok(relayed) if relayed.published > 0 => {
                tracing::info!(published = relayed.published, "outbox relayed");
                continue;
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "outbox relay failed; retrying"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
