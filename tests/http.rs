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
use idem_runtime::http::{CallerHeader, IDEMPOTENT_REPLAYED, IdempotencyLayer, problem_type};
use idem_runtime::{Policy, Store};
use idem_tests::http_client::{self, CutOffs, hang_up_after, send_until_settled, send_within};
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
    /// How long `/orders` takes, in milliseconds.
    pause: std::sync::atomic::AtomicU64,
}

async fn create_order(State(shop): State<Arc<Shop>>, Json(order): Json<NewOrder>) -> Response {
    let run = shop.runs.fetch_add(1, Ordering::SeqCst) + 1;
    if shop.held.load(Ordering::SeqCst) {
        shop.entered.notify_one();
        shop.gate.notified().await;
    }
    let pause = shop.pause.load(Ordering::SeqCst);
    if pause > 0 {
        tokio::time::sleep(Duration::from_millis(pause)).await;
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
    fn problem_type(&self) -> &str {
        let problem: serde_json::Value = serde_json::from_str(&self.body).unwrap_or_default();
        match problem["type"].as_str() {
            Some(kind) => Box::leak(kind.to_owned().into_boxed_str()),
            None => "",
        }
    }

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
        // The first caller gets what every replay gets, but for the replay's mark.
        let mut headers = retry.headers.clone();
        headers.remove(IDEMPOTENT_REPLAYED);
        assert_eq!(headers, first.headers);
        assert_eq!(retry.body, first.body);
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
    let reused = send(
        &router,
        post_to("/flaky", Some("k-3"), Some("alice"), ORDER),
    )
    .await;
    reused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.problem_type(), problem_type::KEY_REUSED);
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
        // The lease is 60 s, but a client told to wait that long would wait a minute for a
        // handler that answers in milliseconds: the layer's bound (1 s) is what it says.
        assert_eq!(retry_after, 1);
        assert_eq!(answer.problem_type(), problem_type::IN_PROGRESS);
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

/// The app on a real server on a loopback port, its request futures watched.
async fn serve<S: Store + 'static>(
    layer: IdempotencyLayer<S>,
) -> (std::net::SocketAddr, Arc<Shop>, CutOffs) {
    let shop = Arc::new(Shop::default());
    let router = Router::new()
        .route("/orders", post(create_order))
        .layer(layer)
        .with_state(shop.clone());
    let (router, cut_offs) = http_client::watch(router);
    (http_client::serve(router).await, shop, cut_offs)
}

fn order_request(key: &str) -> http_client::Request {
    http_client::Request::post("/orders", ORDER)
        .header("idempotency-key", key)
        .header("x-api-key", "alice")
}

/// A real client gives up while the handler is held: the server drops the request's future,
/// but the claimed handler runs on, its response is recorded, and the retry replays it.
async fn a_client_that_hangs_up_does_not_cut_the_handler_off<S: Store + 'static>(store: S) {
    let (addr, shop, cut_offs) = serve(layer(store)).await;
    shop.held.store(true, Ordering::SeqCst);
    let request = order_request("\"k-11\"");
    let client = tokio::spawn({
        let request = request.clone();
        async move { send_within(addr, &request, Duration::from_secs(60)).await }
    });
    shop.entered.notified().await;
    client.abort();
    let _ = client.await;
    assert!(
        cut_offs.passes(0, Duration::from_secs(10)).await,
        "the server never dropped the request of the client that hung up"
    );
    // The handler is still held; the request that started it is gone. Let it finish.
    shop.gate.notify_one();
    let retry = send_until_settled(addr, &request, Duration::from_secs(20))
        .await
        .expect("the retry");
    assert_eq!(retry.status, 201, "{}", retry.body);
    assert!(
        retry.replayed(),
        "the retry replays the response of the cut-off request"
    );
    assert_eq!(retry.json()["run"], 1);
    assert_eq!(shop.runs.load(Ordering::SeqCst), 1);
}

/// 64 copies of one key, each from a client that either waits for its answer or hangs up
/// after a while. The first, which claims the key, hangs up while the handler is held; the
/// other 63 come meanwhile. One effect, and every answer is that effect or a `409`.
async fn copies_that_hang_up_at_random_run_the_handler_once<S: Store + 'static>(store: S) {
    let (addr, shop, cut_offs) = serve(layer(store)).await;
    shop.held.store(true, Ordering::SeqCst);
    let request = order_request("k-12");
    let claimant = tokio::spawn({
        let request = request.clone();
        async move { hang_up_after(addr, &request, Duration::from_millis(50)).await }
    });
    shop.entered.notified().await;
    let mut copies = Vec::new();
    for copy in 1..64_u64 {
        let request = request.clone();
        copies.push(tokio::spawn(async move {
            // A spread of starts over 50 ms and of hang-ups over 20 to 200 ms; every third
            // copy waits for its answer.
            tokio::time::sleep(Duration::from_millis(copy * 37 % 50)).await;
            if copy % 3 == 0 {
                http_client::send(addr, &request).await.map(Some)
            } else {
                hang_up_after(addr, &request, Duration::from_millis(20 + copy * 53 % 180))
                    .await
                    .map(|()| None)
            }
        }));
    }
    claimant.await.expect("the claimant").expect("loopback");
    assert!(
        cut_offs.passes(0, Duration::from_secs(10)).await,
        "the server never dropped the claimant's request"
    );
    for copy in copies {
        if let Some(answer) = copy.await.expect("a copy").expect("loopback") {
            assert_eq!(answer.status, 409, "the handler is still held: {answer:?}");
        }
    }
    shop.gate.notify_one();
    let last = send_until_settled(addr, &request, Duration::from_secs(20))
        .await
        .expect("the last retry");
    assert_eq!(last.status, 201, "{}", last.body);
    assert!(
        last.replayed(),
        "the claimant's response, recorded without its client"
    );
    assert_eq!(last.json()["run"], 1);
    assert_eq!(shop.runs.load(Ordering::SeqCst), 1, "one effect");
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
                a_client_that_hangs_up_does_not_cut_the_handler_off,
                copies_that_hang_up_at_random_run_the_handler_once,
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
    assert_eq!(answer.problem_type(), problem_type::NOT_PROCESSED);
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

/// The handler ran, but its response could not be recorded (the store's pool was closed while
/// it ran): `502` outcome unknown, which says that the key stays in progress until the lease
/// ends and what a retry does then — not `503` "not processed".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn response_not_recorded_is_502_outcome_unknown() {
    let store = idem_runtime::sqlite::SqliteStore::in_memory()
        .await
        .expect("open SQLite");
    store.migrate().await.expect("migrate");
    let pool = store.pool().clone();
    let (router, shop) = app(layer(store));
    shop.held.store(true, Ordering::SeqCst);
    let answer = tokio::spawn({
        let router = router.clone();
        async move {
            send(
                &router,
                post_to("/orders", Some("k-13"), Some("alice"), ORDER),
            )
            .await
        }
    });
    shop.entered.notified().await;
    pool.close().await;
    shop.gate.notify_one();
    let answer = answer.await.expect("the answer");
    answer.assert_problem(StatusCode::BAD_GATEWAY);
    assert_eq!(answer.problem_type(), problem_type::OUTCOME_UNKNOWN);
    let retry_after: u64 = answer.headers[header::RETRY_AFTER]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds");
    assert!(
        (55..=60).contains(&retry_after),
        "until the lease ends: {retry_after}"
    );
    assert!(answer.body.contains("409 until then"), "{}", answer.body);
    assert_eq!(shop.runs.load(Ordering::SeqCst), 1);
}

/// A buffer the log lines of a test go to.
#[derive(Clone, Default)]
struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn text(&self) -> String {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// `POST /tx` in `tx` mode: takes the request's transaction and answers `201`.
async fn in_its_transaction(mut tx: idem_runtime::http::Tx<sqlx::Sqlite>) -> StatusCode {
    match sqlx::query("SELECT 1").execute(&mut **tx).await {
        Ok(_) => StatusCode::CREATED,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Each answered request logs one line with its outcome, in both modes, and the outcome shows
/// once in it (a span field recorded twice would show twice); a `503` is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_answer_logs_its_outcome_once() {
    let lines = Lines::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let lines = lines.clone();
            move || lines.clone()
        })
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .finish();
    // Global, not scoped to this thread: with a thread-local subscriber, the other tests of
    // this binary, running at the same time without one, can leave a callsite's cached
    // interest at "never" and its events unseen. This is the only test here that sets one; it
    // reads only the lines of its own scopes (`logged.…`).
    tracing::subscriber::set_global_default(subscriber)
        .expect("the only global subscriber of this test binary");
    fn logged<S: Store + 'static>(store: S, scope: &str) -> IdempotencyLayer<S> {
        IdempotencyLayer::new(store, scope)
            .expect("a scope")
            .caller(CallerHeader::new("X-Api-Key").expect("a header name"))
    }

    let (router, _) = app(logged(idem_runtime::MemoryStore::new(), "logged.claim"));
    for _ in 0..2 {
        send(
            &router,
            post_to("/orders", Some("k-14"), Some("alice"), ORDER),
        )
        .await;
    }
    let down = idem_runtime::sqlite::SqliteStore::in_memory()
        .await
        .expect("open SQLite");
    down.migrate().await.expect("migrate");
    down.pool().close().await;
    let (router, _) = app(logged(down, "logged.down"));
    let refused = send(
        &router,
        post_to("/orders", Some("k-15"), Some("alice"), ORDER),
    )
    .await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);

    let store = idem_runtime::sqlite::SqliteStore::in_memory()
        .await
        .expect("open SQLite");
    store.migrate().await.expect("migrate");
    let in_tx = IdempotencyLayer::in_tx(store, "logged.tx").expect("a scope");
    let router = Router::new().route("/tx", post(in_its_transaction).layer(in_tx));
    for _ in 0..2 {
        let answer = send(&router, post_to("/tx", Some("k-16"), Some("alice"), "{}")).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    }

    let text = lines.text();
    let answered: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("answered") && line.contains("logged."))
        .collect();
    assert_eq!(answered.len(), 5, "{text}");
    for line in &answered {
        assert_eq!(line.matches("outcome=").count(), 1, "{line}");
    }
    for outcome in ["executed", "replayed", "store_error"] {
        assert_eq!(
            answered
                .iter()
                .filter(|line| line.contains(&format!("outcome=\"{outcome}\""))
                    || line.contains(&format!("outcome={outcome}")))
                .count(),
            if outcome == "store_error" { 1 } else { 2 },
            "{outcome}: {text}"
        );
    }
    assert!(
        text.lines().any(|line| line.contains("WARN")
            && line.contains("503")
            && line.contains("closed pool")),
        "the 503 is logged: {text}"
    );
}

/// How often `/tx/flaky` ran: it inserts a row, then answers `500` on its first run.
static FLAKY_TX_RUNS: AtomicUsize = AtomicUsize::new(0);

async fn flaky_in_its_transaction(mut tx: idem_runtime::http::Tx<sqlx::Sqlite>) -> StatusCode {
    let run = FLAKY_TX_RUNS.fetch_add(1, Ordering::SeqCst);
    if sqlx::query("INSERT INTO effects (run) VALUES (?)")
        .bind(i64::try_from(run).unwrap_or(i64::MAX))
        .execute(&mut **tx)
        .await
        .is_err()
    {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    if run == 0 {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::CREATED
    }
}

/// In `tx` mode a response that is not final rolls the handler's writes back with the claim,
/// so the retry runs once more and its writes are the only ones; a request without a key (on
/// a route that does not require one) runs in a transaction too, committed.
#[tokio::test]
async fn tx_mode_rolls_back_what_is_not_final() {
    let store = idem_runtime::sqlite::SqliteStore::in_memory()
        .await
        .expect("open SQLite");
    store.migrate().await.expect("migrate");
    sqlx::query("CREATE TABLE effects (run INTEGER NOT NULL)")
        .execute(store.pool())
        .await
        .expect("a table");
    let pool = store.pool().clone();
    let in_tx = IdempotencyLayer::in_tx(store, "tx.flaky")
        .expect("a scope")
        .required(false);
    let router = Router::new().route("/tx/flaky", post(flaky_in_its_transaction).layer(in_tx));
    let effects = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM effects")
            .fetch_one(&pool)
            .await
            .expect("count")
    };
    let first = send(&router, post_to("/tx/flaky", Some("k-17"), None, "{}")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(effects().await, 0, "the 500 rolled its insert back");
    let retry = send(&router, post_to("/tx/flaky", Some("k-17"), None, "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed(), "the key was free: the retry ran");
    let again = send(&router, post_to("/tx/flaky", Some("k-17"), None, "{}")).await;
    assert!(again.replayed());
    assert_eq!(effects().await, 1);
    let unkeyed = send(&router, post_to("/tx/flaky", None, None, "{}")).await;
    assert_eq!(unkeyed.status, StatusCode::CREATED);
    assert_eq!(
        effects().await,
        2,
        "an unkeyed request's writes are committed"
    );
    assert_eq!(FLAKY_TX_RUNS.load(Ordering::SeqCst), 3);
}

/// A handler that takes a `Tx` on a route without the `tx`-mode layer is refused with a
/// problem that says so, not a panic.
#[tokio::test]
async fn a_tx_without_its_layer_is_a_500_problem() {
    let router = Router::new().route("/tx", post(in_its_transaction));
    let answer = send(&router, post_to("/tx", Some("k-18"), None, "{}")).await;
    answer.assert_problem(StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.problem_type(), problem_type::HANDLER_FAILED);
    assert!(
        answer.body.contains("IdempotencyLayer::in_tx"),
        "{}",
        answer.body
    );
}

/// How often `/broken` ran.
static BROKEN_RUNS: AtomicUsize = AtomicUsize::new(0);

/// Answers `201` with a body that fails half-way.
async fn broken_body() -> Response {
    BROKEN_RUNS.fetch_add(1, Ordering::SeqCst);
    let chunks: Vec<Result<axum::body::Bytes, std::io::Error>> = vec![
        Ok(axum::body::Bytes::from_static(b"{\"half\":")),
        Err(std::io::Error::other("the disk went away")),
    ];
    (
        StatusCode::CREATED,
        Body::from_stream(futures_util::stream::iter(chunks)),
    )
        .into_response()
}

/// A response whose body cannot be read is not recorded, but the handler ran: its key is not
/// released (a retry would repeat the effect at once) but kept in progress until its lease
/// ends, and the answer says the outcome is unknown.
#[tokio::test]
async fn an_unreadable_response_keeps_the_claim() {
    let layer = layer(idem_runtime::MemoryStore::new());
    let router = Router::new().route("/broken", post(broken_body).layer(layer));
    let first = send(
        &router,
        post_to("/broken", Some("k-19"), Some("alice"), "{}"),
    )
    .await;
    first.assert_problem(StatusCode::BAD_GATEWAY);
    assert_eq!(first.problem_type(), problem_type::OUTCOME_UNKNOWN);
    let retry = send(
        &router,
        post_to("/broken", Some("k-19"), Some("alice"), "{}"),
    )
    .await;
    retry.assert_problem(StatusCode::CONFLICT);
    assert_eq!(
        BROKEN_RUNS.load(Ordering::SeqCst),
        1,
        "the retry did not run it again"
    );
}
