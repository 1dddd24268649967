//! `Idempotency-Key` for axum (`idem_runtime::http`) on every store: the statuses of the IETF
//! draft, replays marked as such, keys scoped by caller, and the handler run once per key
//! however many copies of a request arrive at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Json, State};
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use idem_runtime::http::{CallerHeader, IDEMPOTENT_REPLAYED, IdempotencyLayer};
use idem_runtime::{Policy, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tower::ServiceExt as _;

/// What `POST /orders` takes.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct NewOrder {
    order_no: String,
    amount: u64,
}

/// What `POST /orders` answers: the order and which run of the handler created it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Created {
    order_no: String,
    amount: u64,
    run: usize,
}

/// The service's state: how often each handler ran, and a gate that holds `/orders`.
#[derive(Default)]
struct Shop {
    runs: AtomicUsize,
    flaky_runs: AtomicUsize,
    held: std::sync::atomic::AtomicBool,
    entered: Notify,
    gate: Notify,
}

async fn create_order(State(shop): State<Arc<Shop>>, Json(order): Json<NewOrder>) -> Response {
    let run = shop.runs.fetch_add(1, Ordering::SeqCst) + 1;
    if shop.held.load(Ordering::SeqCst) {
        shop.entered.notify_one();
        shop.gate.notified().await;
    }
    let location = format!("/orders/{}", order.order_no);
    let created = Created {
        order_no: order.order_no,
        amount: order.amount,
        run,
    };
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(created),
    )
        .into_response()
}

/// Fails with `503` on its first run, then succeeds.
async fn flaky(State(shop): State<Arc<Shop>>) -> Response {
    match shop.flaky_runs.fetch_add(1, Ordering::SeqCst) {
        0 => (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response(),
        run => (StatusCode::CREATED, format!("run {run}")).into_response(),
    }
}

/// A deliberate `400`: stored and replayed like a success.
async fn refuse(State(shop): State<Arc<Shop>>) -> Response {
    let run = shop.flaky_runs.fetch_add(1, Ordering::SeqCst);
    (StatusCode::BAD_REQUEST, format!("no ({run})")).into_response()
}

/// The service with every route behind `layer`.
fn app<S: Store + 'static>(layer: IdempotencyLayer<S>) -> (Router, Arc<Shop>) {
    let shop = Arc::new(Shop::default());
    let router = Router::new()
        .route("/orders", post(create_order))
        .route("/flaky", post(flaky))
        .route("/refuse", post(refuse))
        .layer(layer)
        .with_state(shop.clone());
    (router, shop)
}

/// The layer of these tests: keys scoped by `x-api-key`.
fn layer<S: Store + 'static>(store: S) -> IdempotencyLayer<S> {
    IdempotencyLayer::new(store, &idem_tests::servers::unique_name("orders_create"))
        .expect("a scope")
        .caller(CallerHeader::new("X-Api-Key").expect("a header name"))
        .policy(Policy::new().with_lease(Duration::from_secs(60)))
}

fn post_to(uri: &str, key: Option<&str>, caller: Option<&str>, body: &str) -> Request<Body> {
    let mut request = Request::post(uri).header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    if let Some(caller) = caller {
        request = request.header("x-api-key", caller);
    }
    request
        .body(Body::from(body.to_owned()))
        .expect("a request")
}

/// A response read whole: status, headers and body.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn replayed(&self) -> bool {
        self.headers
            .get(IDEMPOTENT_REPLAYED)
            .is_some_and(|value| value == "true")
    }

    fn created(&self) -> Created {
        serde_json::from_str(&self.body).expect("a Created body")
    }

    /// The response is a problem+json document with this status.
    fn assert_problem(&self, status: StatusCode) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let problem: serde_json::Value = serde_json::from_str(&self.body).expect("problem+json");
        assert_eq!(problem["status"], status.as_u16());
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|detail| !detail.is_empty())
        );
    }
}

async fn send(router: &Router, request: Request<Body>) -> Answer {
    let response = router.clone().oneshot(request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .expect("a body");
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

const ORDER: &str = r#"{"order_no":"A-1","amount":250}"#;

async fn first_request_runs_and_retries_replay<S: Store + 'static>(store: S) {
    let (router, shop) = app(layer(store));
    let first = send(
        &router,
        post_to("/orders", Some("k-1"), Some("alice"), ORDER),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert!(!first.replayed());
    for _ in 0..3 {
        let retry = send(
            &router,
            post_to("/orders", Some("\"k-1\""), Some("alice"), ORDER),
        )
        .await;
        assert_eq!(retry.status, StatusCode::CREATED);
        assert!(retry.replayed(), "a retry is marked as a replay");
        assert_eq!(retry.headers[header::LOCATION], "/orders/A-1");
        assert_eq!(retry.created(), first.created());
    }
    assert_eq!(shop.runs.load(Ordering::SeqCst), 1);
}

async fn missing_or_malformed_key_is_refused<S: Store + 'static>(store: S) {
    let layer = layer(store);
    let (router, shop) = app(layer.clone());
    send(&router, post_to("/orders", None, Some("alice"), ORDER))
        .await
        .assert_problem(StatusCode::BAD_REQUEST);
    send(
        &router,
        post_to("/orders", Some("  "), Some("alice"), ORDER),
    )
    .await
    .assert_problem(StatusCode::BAD_REQUEST);
    send(&router, post_to("/orders", Some("k-2"), None, ORDER))
        .await
        .assert_problem(StatusCode::UNAUTHORIZED);
    assert_eq!(shop.runs.load(Ordering::SeqCst), 0, "nothing ran");

    // Where keys are optional, a request without one goes straight through, every time.
    let (router, shop) = app(layer.required(false));
    for _ in 0..2 {
        let passed = send(&router, post_to("/orders", None, Some("alice"), ORDER)).await;
        assert_eq!(passed.status, StatusCode::CREATED);
        assert!(!passed.replayed());
    }
    assert_eq!(shop.runs.load(Ordering::SeqCst), 2);
}

async fn reused_key_with_another_request_is_422<S: Store + 'static>(store: S) {
    let (router, shop) = app(layer(store));
    let first = send(
        &router,
        post_to("/orders", Some("k-3"), Some("alice"), ORDER),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let other_body = r#"{"order_no":"A-1","amount":999}"#;
    send(
        &router,
        post_to("/orders", Some("k-3"), Some("alice"), other_body),
    )
    .await
    .assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    send(
        &router,
        post_to("/flaky", Some("k-3"), Some("alice"), ORDER),
    )
    .await
    .assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(shop.runs.load(Ordering::SeqCst), 1);
    assert_eq!(shop.flaky_runs.load(Ordering::SeqCst), 0);
}

/// 16 copies at once: one runs; the others, while it runs, get `409` with `Retry-After`; a
/// retry after it finished gets its response.
async fn concurrent_copies_run_the_handler_once<S: Store + 'static>(store: S) {
    let (router, shop) = app(layer(store));
    shop.held.store(true, Ordering::SeqCst);
    let (done, mut answers) = mpsc::unbounded_channel();
    for _ in 0..16 {
        let (router, done) = (router.clone(), done.clone());
        tokio::spawn(async move {
            let answer = send(
                &router,
                post_to("/orders", Some("k-4"), Some("alice"), ORDER),
            )
            .await;
            let _ = done.send(answer);
        });
    }
    shop.entered.notified().await;
    // The handler is held: every other copy answers now.
    for _ in 0..15 {
        let answer = answers.recv().await.expect("an answer");
        answer.assert_problem(StatusCode::CONFLICT);
        let retry_after: u64 = answer.headers[header::RETRY_AFTER]
            .to_str()
            .expect("text")
            .parse()
            .expect("seconds");
        // The lease is 60 s; a copy that read the clock before the first claimed may see a
        // few milliseconds more, rounded up to a second.
        assert!((1..=61).contains(&retry_after), "{retry_after}");
    }
    shop.gate.notify_one();
    let first = answers.recv().await.expect("the first answer");
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    let retry = send(
        &router,
        post_to("/orders", Some("k-4"), Some("alice"), ORDER),
    )
    .await;
    assert!(retry.replayed());
    assert_eq!(retry.created(), first.created());
    assert_eq!(shop.runs.load(Ordering::SeqCst), 1);
}

async fn callers_never_see_each_others_responses<S: Store + 'static>(store: S) {
    let (router, shop) = app(layer(store));
    let alice = send(
        &router,
        post_to("/orders", Some("k-5"), Some("alice"), ORDER),
    )
    .await;
    let bob = send(&router, post_to("/orders", Some("k-5"), Some("bob"), ORDER)).await;
    assert!(
        !alice.replayed() && !bob.replayed(),
        "one key, two callers, two requests"
    );
    assert_ne!(alice.created().run, bob.created().run);
    let alice_again = send(
        &router,
        post_to("/orders", Some("k-5"), Some("alice"), ORDER),
    )
    .await;
    assert_eq!(alice_again.created(), alice.created());
    assert_eq!(shop.runs.load(Ordering::SeqCst), 2);
}

async fn server_errors_release_the_key_and_deliberate_4xx_are_kept<S: Store + 'static>(store: S) {
    let (router, shop) = app(layer(store));
    let failed = send(&router, post_to("/flaky", Some("k-6"), Some("alice"), "{}")).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    let retried = send(&router, post_to("/flaky", Some("k-6"), Some("alice"), "{}")).await;
    assert_eq!(
        (retried.status, retried.body.as_str()),
        (StatusCode::CREATED, "run 1")
    );
    assert!(
        !retried.replayed(),
        "the 503 released the key: the retry ran"
    );
    let again = send(&router, post_to("/flaky", Some("k-6"), Some("alice"), "{}")).await;
    assert!(again.replayed());
    assert_eq!(again.body, "run 1");

    let refused = send(
        &router,
        post_to("/refuse", Some("k-7"), Some("alice"), "{}"),
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    let refused_again = send(
        &router,
        post_to("/refuse", Some("k-7"), Some("alice"), "{}"),
    )
    .await;
    assert_eq!(refused_again.status, StatusCode::BAD_REQUEST);
    assert!(refused_again.replayed());
    assert_eq!(refused_again.body, refused.body);
    assert_eq!(shop.flaky_runs.load(Ordering::SeqCst), 3);
}

/// With a `wait`, a copy that finds the request running waits for its response.
async fn waiting_copy_gets_the_first_response<S: Store + 'static>(store: S) {
    let layer = layer(store).policy(
        Policy::new()
            .with_lease(Duration::from_secs(60))
            .with_wait(Duration::from_secs(30)),
    );
    let (router, shop) = app(layer);
    shop.held.store(true, Ordering::SeqCst);
    let first = tokio::spawn({
        let router = router.clone();
        async move {
            send(
                &router,
                post_to("/orders", Some("k-8"), Some("alice"), ORDER),
            )
            .await
        }
    });
    shop.entered.notified().await;
    let waiting = tokio::spawn({
        let router = router.clone();
        async move {
            send(
                &router,
                post_to("/orders", Some("k-8"), Some("alice"), ORDER),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "the copy waits while the first runs"
    );
    shop.gate.notify_one();
    let first = first.await.expect("first");
    let waited = waiting.await.expect("waiting");
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(waited.replayed());
    assert_eq!(waited.created(), first.created());
    assert_eq!(shop.runs.load(Ordering::SeqCst), 1);
}

/// One `#[tokio::test]` per case on the store `store()` of the module it expands in.
macro_rules! cases {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $case() {
            let Some(store) = store().await else {
                return;
            };
            super::$case(store).await;
        }
    )*};
}

macro_rules! store_module {
    ($name:ident, $make:expr) => {
        mod $name {
            async fn store() -> Option<impl idem_runtime::Store + 'static> {
                $make
            }

            cases!(
                first_request_runs_and_retries_replay,
                missing_or_malformed_key_is_refused,
                reused_key_with_another_request_is_422,
                concurrent_copies_run_the_handler_once,
                callers_never_see_each_others_responses,
                server_errors_release_the_key_and_deliberate_4xx_are_kept,
                waiting_copy_gets_the_first_response,
            );
        }
    };
}

store_module!(memory, Some(idem_runtime::MemoryStore::new()));

store_module!(
    sqlite_file,
    Some(idem_tests::sqlite_file::FileStore::open("http", idem_runtime::clock::SystemClock).await)
);

store_module!(postgres, {
    let pool = idem_tests::sql_servers::postgres_pool().await?;
    Some(idem_tests::sql_servers::postgres_store(pool, idem_runtime::clock::SystemClock).await)
});

store_module!(mysql, {
    let pool = idem_tests::sql_servers::mysql_pool().await?;
    Some(idem_tests::sql_servers::mysql_store(pool, idem_runtime::clock::SystemClock).await)
});

store_module!(redis, {
    let connection = idem_tests::redis_server::manager().await?;
    Some(idem_tests::redis_server::store(
        connection,
        idem_runtime::clock::SystemClock,
    ))
});

/// A store that cannot be reached: `503`, and the handler does not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_store_answers_503() {
    let store = idem_runtime::sqlite::SqliteStore::in_memory()
        .await
        .expect("open SQLite");
    store.migrate().await.expect("migrate");
    store.pool().close().await;
    let (router, shop) = app(layer(store));
    let answer = send(
        &router,
        post_to("/orders", Some("k-9"), Some("alice"), ORDER),
    )
    .await;
    answer.assert_problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.headers.contains_key(header::RETRY_AFTER));
    assert_eq!(shop.runs.load(Ordering::SeqCst), 0);
}

/// A body over the limit is refused before anything runs, with or without a length.
#[tokio::test]
async fn oversized_body_is_413() {
    let (router, shop) = app(layer(idem_runtime::MemoryStore::new()).max_body(16));
    send(
        &router,
        post_to("/orders", Some("k-10"), Some("alice"), ORDER),
    )
    .await
    .assert_problem(StatusCode::PAYLOAD_TOO_LARGE);
    let streamed = Request::post("/orders")
        .header("idempotency-key", "k-10")
        .header("x-api-key", "alice")
        .body(Body::from_stream(futures_util::stream::iter(chunks(ORDER))))
        .expect("a request");
    send(&router, streamed)
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(shop.runs.load(Ordering::SeqCst), 0);
}

/// A body without a declared length, in two chunks.
fn chunks(text: &'static str) -> Vec<Result<axum::body::Bytes, std::io::Error>> {
    let (a, b) = text.split_at(text.len() / 2);
    vec![
        Ok(a.as_bytes().to_vec().into()),
        Ok(b.as_bytes().to_vec().into()),
    ]
}
