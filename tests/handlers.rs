//! The guarantees of `#[idempotent]` handlers, on every store of this crate.
//!
//! Every case is a generic function over the store, run once per store by `on_every_store!`.
//! Lease expiry is driven by a `ManualClock`, so no case sleeps to let a lease run out.

#![deny(unused_qualifications, clippy::all)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use idem_runtime::clock::{Clock, ManualClock, SystemClock};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use idem_runtime::{Claim, Error, Fingerprint, Lease, RecordKey, Store, StoreError, idempotent};
use idem_tests::{AppError, OrderPaid, Receipt, Runs, credit_points};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

const START: i64 = 1_700_000_000_000;

/// Awaits a call that must not block (a duplicate that should be refused or replayed): if the
/// store wrongly lets it run its never-finishing body, the test fails instead of hanging.
async fn within<F: Future>(call: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the call blocked: a duplicate ran a body that was meant never to run")
}

/// 64 deliveries of one message at once: the body runs exactly once, every caller gets the
/// result or `InProgress`, and every later delivery replays the same result.
async fn concurrent_duplicates_run_the_body_once<S: Store + 'static>(
    store: S,
    _clock: ManualClock,
) {
    let store = Arc::new(store);
    let runs = Arc::new(Runs::default());
    let start = Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (store, runs, start) = (store.clone(), runs.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            credit_points(&*store, &runs, OrderPaid::new("A-1", 990)).await
        }));
    }
    let (mut executed, mut in_progress) = (Vec::new(), 0);
    for task in tasks {
        match task.await.expect("handler task panicked") {
            Ok(receipt) => executed.push(receipt),
            Err(AppError::Idem(Error::InProgress { .. })) => in_progress += 1,
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!(runs.count(), 1, "the body must run exactly once");
    assert_eq!(executed.len() + in_progress, 64);
    let first = Receipt {
        order_no: "A-1".into(),
        points: 99,
        run: 1,
    };
    assert!(
        executed.iter().all(|receipt| *receipt == first),
        "{executed:?}"
    );
    for _ in 0..8 {
        let again = credit_points(&*store, &runs, OrderPaid::new("A-1", 990)).await;
        assert_eq!(again.expect("replay"), first);
    }
    assert_eq!(runs.count(), 1, "replays must not run the body");
}

/// A duplicate that arrives after completion gets the stored result without the body running.
async fn completed_key_replays<S: Store>(store: S, _clock: ManualClock) {
    let runs = Runs::default();
    let first = credit_points(&store, &runs, OrderPaid::new("B-1", 100))
        .await
        .expect("first");
    let second = credit_points(&store, &runs, OrderPaid::new("B-1", 100))
        .await
        .expect("second");
    let other = credit_points(&store, &runs, OrderPaid::new("B-2", 100))
        .await
        .expect("other");
    assert_eq!(first, second);
    assert_eq!(other.run, 2);
    assert_eq!(runs.count(), 2);
}

/// The same key with another payload is a reused key, not a duplicate: fingerprint error, body
/// not run, and the original result still replays.
async fn reused_key_with_another_payload_is_rejected<S: Store>(store: S, _clock: ManualClock) {
    let runs = Runs::default();
    let first = credit_points(&store, &runs, OrderPaid::new("C-1", 100))
        .await
        .expect("first");
    let reused = credit_points(&store, &runs, OrderPaid::new("C-1", 999)).await;
    assert!(
        matches!(
            reused,
            Err(AppError::Idem(Error::FingerprintMismatch { .. }))
        ),
        "{reused:?}"
    );
    assert_eq!(runs.count(), 1);
    let again = credit_points(&store, &runs, OrderPaid::new("C-1", 100))
        .await
        .expect("replay");
    assert_eq!(again, first);
}

#[idempotent(key = "order_no", store = store, scope = "tests.flaky")]
async fn flaky<S: Store>(
    store: &S,
    runs: &Runs,
    fail_first: bool,
    msg: OrderPaid,
) -> Result<u64, AppError> {
    let run = runs.record();
    if fail_first && run == 1 {
        return Err(AppError::Business("gateway timeout".into()));
    }
    Ok(msg.amount)
}

/// A body that fails releases its claim: the next delivery runs the body again at once.
async fn failed_body_is_retried<S: Store>(store: S, _clock: ManualClock) {
    let runs = Runs::default();
    let failed = flaky(&store, &runs, true, OrderPaid::new("D-1", 5)).await;
    assert!(matches!(failed, Err(AppError::Business(_))), "{failed:?}");
    let retried = flaky(&store, &runs, true, OrderPaid::new("D-1", 5)).await;
    assert_eq!(retried.expect("retry"), 5);
    assert_eq!(runs.count(), 2);
    let replayed = flaky(&store, &runs, true, OrderPaid::new("D-1", 5)).await;
    assert_eq!(replayed.expect("replay"), 5);
    assert_eq!(runs.count(), 2);
}

/// Holds the key until told to finish (or fails when the sender is dropped).
#[idempotent(key = "order_no", store = store, scope = "tests.slow", lease = "30s")]
async fn slow<S: Store>(
    store: &S,
    runs: &Runs,
    started: &Notify,
    finish: oneshot::Receiver<()>,
    msg: OrderPaid,
) -> Result<Receipt, AppError> {
    let run = runs.record();
    started.notify_one();
    // A dropped sender fails the body.
    finish
        .await
        .map_err(|_| AppError::Business("told to fail".into()))?;
    Ok(Receipt {
        order_no: msg.order_no,
        points: 0,
        run,
    })
}

/// A holder that outlives its lease is taken over; its late completion is refused
/// (`LeaseLost`) and does not overwrite the new holder's result.
async fn expired_lease_is_taken_over_and_stale_holder_fenced<S: Store + 'static>(
    store: S,
    clock: ManualClock,
) {
    let store = Arc::new(store);
    let runs = Arc::new(Runs::default());
    let started = Arc::new(Notify::new());
    let (finish_first, first_finish) = oneshot::channel();
    let first = {
        let (store, runs, started) = (store.clone(), runs.clone(), started.clone());
        tokio::spawn(async move {
            slow(
                &*store,
                &runs,
                &started,
                first_finish,
                OrderPaid::new("E-1", 1),
            )
            .await
        })
    };
    started.notified().await;

    // While the lease runs, a duplicate is told to retry later.
    let (_keep, never) = oneshot::channel();
    let early = within(slow(
        &*store,
        &runs,
        &Notify::new(),
        never,
        OrderPaid::new("E-1", 1),
    ))
    .await;
    match early {
        Err(AppError::Idem(Error::InProgress { retry_after, .. })) => {
            assert!(retry_after <= Duration::from_secs(30) && retry_after > Duration::ZERO);
        }
        other => panic!("expected InProgress, got {other:?}"),
    }

    // After the lease, a duplicate takes over and completes.
    clock.advance(Duration::from_secs(31));
    let (finish_second, second_finish) = oneshot::channel();
    finish_second.send(()).expect("send");
    let second = slow(
        &*store,
        &runs,
        &Notify::new(),
        second_finish,
        OrderPaid::new("E-1", 1),
    )
    .await
    .expect("takeover");
    assert_eq!(second.run, 2);

    // The stale holder finishes late: its result is refused.
    finish_first.send(()).expect("send");
    let stale = within(first).await.expect("task");
    assert!(
        matches!(
            stale,
            Err(AppError::Idem(Error::LeaseLost { fence: 1, .. }))
        ),
        "{stale:?}"
    );
    let (_keep, never) = oneshot::channel();
    let replay = within(slow(
        &*store,
        &runs,
        &Notify::new(),
        never,
        OrderPaid::new("E-1", 1),
    ))
    .await;
    assert_eq!(
        replay.expect("replay"),
        second,
        "the new holder's result stands"
    );
    assert_eq!(runs.count(), 2);
}

/// A cancelled (dropped) call leaves its claim to expire: duplicates get `InProgress` until the
/// lease runs out, then the body runs again.
async fn cancelled_call_leaves_claim_to_expire<S: Store + 'static>(store: S, clock: ManualClock) {
    let store = Arc::new(store);
    let runs = Arc::new(Runs::default());
    let started = Arc::new(Notify::new());
    let (_never_finish, finish) = oneshot::channel();
    let call = {
        let (store, runs, started) = (store.clone(), runs.clone(), started.clone());
        tokio::spawn(async move {
            slow(&*store, &runs, &started, finish, OrderPaid::new("F-1", 1)).await
        })
    };
    started.notified().await;
    call.abort();
    assert!(call.await.expect_err("aborted").is_cancelled());

    let (done, finish) = oneshot::channel();
    done.send(()).expect("send");
    let early = slow(
        &*store,
        &runs,
        &Notify::new(),
        finish,
        OrderPaid::new("F-1", 1),
    )
    .await;
    assert!(
        matches!(early, Err(AppError::Idem(Error::InProgress { .. }))),
        "{early:?}"
    );

    clock.advance(Duration::from_secs(30));
    let (done, finish) = oneshot::channel();
    done.send(()).expect("send");
    let after = slow(
        &*store,
        &runs,
        &Notify::new(),
        finish,
        OrderPaid::new("F-1", 1),
    )
    .await;
    assert_eq!(after.expect("runs after the lease").run, 2);
}

#[idempotent(key = "order_no", store = store, scope = "tests.panics")]
async fn panics_once<S: Store>(store: &S, runs: &Runs, msg: OrderPaid) -> Result<u64, AppError> {
    if runs.record() == 1 {
        panic!("handler bug");
    }
    Ok(msg.amount)
}

/// A body that panics leaves its claim to expire, like a crash.
async fn panicking_body_leaves_claim_to_expire<S: Store + 'static>(store: S, clock: ManualClock) {
    let store = Arc::new(store);
    let runs = Arc::new(Runs::default());
    let call = {
        let (store, runs) = (store.clone(), runs.clone());
        tokio::spawn(async move { panics_once(&*store, &runs, OrderPaid::new("G-1", 7)).await })
    };
    assert!(call.await.expect_err("panicked").is_panic());
    let early = panics_once(&*store, &runs, OrderPaid::new("G-1", 7)).await;
    assert!(
        matches!(early, Err(AppError::Idem(Error::InProgress { .. }))),
        "{early:?}"
    );
    clock.advance(idem_runtime::Policy::DEFAULT_LEASE);
    assert_eq!(
        panics_once(&*store, &runs, OrderPaid::new("G-1", 7))
            .await
            .expect("rerun"),
        7
    );
    assert_eq!(runs.count(), 2);
}

/// A handler on `key` that returns `$value`, counting its runs.
macro_rules! handler_returning {
    ($name:ident, $ty:ty, $value:expr) => {
        #[idempotent(key = key, store = store)]
        async fn $name<S: Store>(store: &S, runs: &Runs, key: &str) -> Result<$ty, AppError> {
            runs.record();
            Ok($value)
        }
    };
}

handler_returning!(unit, (), ());
handler_returning!(zero, i64, 0);
handler_returning!(no, bool, false);
handler_returning!(none, Option<u32>, None);
handler_returning!(empty_vec, Vec<String>, Vec::new());
handler_returning!(empty_string, String, String::new());
handler_returning!(empty_map, HashMap<String, u8>, HashMap::new());
handler_returning!(empty_tree, BTreeMap<u8, u8>, BTreeMap::new());

/// Results that look like "nothing" replay exactly and do not make the body run again.
async fn falsy_results_replay_exactly<S: Store>(store: S, _clock: ManualClock) {
    let runs = Runs::default();
    for _ in 0..2 {
        unit(&store, &runs, "k").await.expect("unit");
        assert_eq!(zero(&store, &runs, "k").await.expect("zero"), 0);
        assert!(!no(&store, &runs, "k").await.expect("false"));
        assert_eq!(none(&store, &runs, "k").await.expect("none"), None);
        assert!(empty_vec(&store, &runs, "k").await.expect("vec").is_empty());
        assert_eq!(empty_string(&store, &runs, "k").await.expect("string"), "");
        assert!(empty_map(&store, &runs, "k").await.expect("map").is_empty());
        assert!(
            empty_tree(&store, &runs, "k")
                .await
                .expect("tree")
                .is_empty()
        );
    }
    assert_eq!(
        runs.count(),
        8,
        "each body ran once; the second round replayed"
    );
}

/// A result whose JSON form leaves a field out: it decodes with the field's default.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Annotated {
    total: u64,
    #[serde(skip)]
    note: String,
}

handler_returning!(some_none, Option<Option<u32>>, Some(None));
handler_returning!(some_unit, Option<()>, Some(()));
handler_returning!(
    annotated,
    Annotated,
    Annotated {
        total: 7,
        note: "set by the body".to_owned(),
    }
);

/// What `value` becomes through its JSON form: what a replay decodes.
fn decoded<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
    let json = serde_json::to_vec(value).expect("serializes");
    serde_json::from_slice(&json).expect("deserializes")
}

/// Results whose JSON form decodes to another value (`Some(None)` and `Some(())` become
/// `None`, a `#[serde(skip)]` field its default): the first caller gets the decoded value,
/// the one every replay gets, and each body runs once.
async fn first_caller_gets_what_replays_get<S: Store>(store: S, _clock: ManualClock) {
    let runs = Runs::default();
    let first = some_none(&store, &runs, "k").await.expect("some_none");
    assert_eq!(first, decoded(&Some(None::<u32>)));
    assert_eq!(first, None);
    let first_unit = some_unit(&store, &runs, "k").await.expect("some_unit");
    assert_eq!(first_unit, decoded(&Some(())));
    assert_eq!(first_unit, None);
    let first_annotated = annotated(&store, &runs, "k").await.expect("annotated");
    let body_value = Annotated {
        total: 7,
        note: "set by the body".to_owned(),
    };
    assert_eq!(first_annotated, decoded(&body_value));
    assert_eq!(
        first_annotated,
        Annotated {
            total: 7,
            note: String::new(),
        }
    );
    for _ in 0..2 {
        assert_eq!(some_none(&store, &runs, "k").await.expect("replay"), first);
        assert_eq!(
            some_unit(&store, &runs, "k").await.expect("replay"),
            first_unit
        );
        assert_eq!(
            annotated(&store, &runs, "k").await.expect("replay"),
            first_annotated
        );
    }
    assert_eq!(runs.count(), 3, "each body ran once; the others replayed");
}

/// An empty or blank key is an error before anything runs or is written.
async fn empty_key_is_rejected<S: Store>(store: S, _clock: ManualClock) {
    let runs = Runs::default();
    for key in ["", "   "] {
        let result = credit_points(&store, &runs, OrderPaid::new(key, 1)).await;
        assert!(
            matches!(result, Err(AppError::Idem(Error::EmptyKey { .. }))),
            "{result:?}"
        );
    }
    assert_eq!(runs.count(), 0);
    assert_eq!(store.purge_expired(100).await.expect("purge"), 0);
}

#[idempotent(key = "order_no", store = store, scope = "tests.credit_points")]
async fn credit_points_as_text<S: Store>(store: &S, msg: OrderPaid) -> Result<String, AppError> {
    Ok(msg.order_no)
}

/// A stored result that no longer decodes as the handler's type is a clear error.
async fn stored_result_of_another_type_is_a_decode_error<S: Store>(store: S, _clock: ManualClock) {
    let runs = Runs::default();
    credit_points(&store, &runs, OrderPaid::new("H-1", 10))
        .await
        .expect("first");
    let changed = credit_points_as_text(&store, OrderPaid::new("H-1", 10)).await;
    assert!(
        matches!(changed, Err(AppError::Idem(Error::Decode { .. }))),
        "{changed:?}"
    );
}

/// A message of a multi-tenant system: the business key is the pair.
#[derive(Clone, Debug, serde::Serialize)]
struct Tenanted {
    tenant: String,
    order_no: u64,
}

#[idempotent(key = (msg.tenant.as_str(), msg.order_no), store = store, scope = "tests.tenanted")]
async fn tenanted<S: Store>(store: &S, runs: &Runs, msg: Tenanted) -> Result<usize, AppError> {
    Ok(runs.record())
}

/// A composite key separates tenants: the same order number in two tenants runs twice.
async fn composite_keys_keep_tenants_apart<S: Store>(store: S, _clock: ManualClock) {
    let runs = Runs::default();
    let msg = |tenant: &str| Tenanted {
        tenant: tenant.into(),
        order_no: 7,
    };
    assert_eq!(tenanted(&store, &runs, msg("acme")).await.expect("acme"), 1);
    assert_eq!(
        tenanted(&store, &runs, msg("globex"))
            .await
            .expect("globex"),
        2
    );
    assert_eq!(
        tenanted(&store, &runs, msg("acme")).await.expect("replay"),
        1
    );
    assert_eq!(runs.count(), 2);
}

#[idempotent(key = "order_no", store = store, scope = "tests.slow", wait = "10s")]
async fn slow_or_wait<S: Store>(
    store: &S,
    runs: &Runs,
    started: &Notify,
    finish: oneshot::Receiver<()>,
    msg: OrderPaid,
) -> Result<Receipt, AppError> {
    let run = runs.record();
    started.notify_one();
    let _ = finish.await;
    Ok(Receipt {
        order_no: msg.order_no,
        points: 0,
        run,
    })
}

/// With `wait`, a duplicate that finds the key in progress waits for the first call and
/// returns its result instead of failing.
async fn waiting_duplicate_gets_the_first_result<S: Store + 'static>(
    store: S,
    _clock: ManualClock,
) {
    let store = Arc::new(store);
    let runs = Arc::new(Runs::default());
    let started = Arc::new(Notify::new());
    let (finish_first, first_finish) = oneshot::channel();
    let first = {
        let (store, runs, started) = (store.clone(), runs.clone(), started.clone());
        tokio::spawn(async move {
            slow_or_wait(
                &*store,
                &runs,
                &started,
                first_finish,
                OrderPaid::new("W-1", 1),
            )
            .await
        })
    };
    started.notified().await;
    let waiter = {
        let (store, runs) = (store.clone(), runs.clone());
        let (_keep, never) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _keep = _keep;
            slow_or_wait(
                &*store,
                &runs,
                &Notify::new(),
                never,
                OrderPaid::new("W-1", 1),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !waiter.is_finished(),
        "the duplicate must wait for the first call, not return or run"
    );
    finish_first.send(()).expect("send");
    let first = first.await.expect("task").expect("first");
    let waited = within(waiter).await.expect("task").expect("waited");
    assert_eq!(first, waited);
    assert_eq!(runs.count(), 1);
}

#[idempotent(key = "order_no", store = store, scope = "tests.long", lease = "1s", heartbeat = true)]
async fn long_with_heartbeat<S: Store>(
    store: &S,
    runs: &Runs,
    gate: &CancellationToken,
    msg: OrderPaid,
) -> Result<usize, AppError> {
    let run = runs.record();
    gate.cancelled().await;
    let _ = msg;
    Ok(run)
}

#[idempotent(key = "order_no", store = store, scope = "tests.long", lease = "1s")]
async fn long_without_heartbeat<S: Store>(
    store: &S,
    runs: &Runs,
    gate: &CancellationToken,
    msg: OrderPaid,
) -> Result<usize, AppError> {
    let run = runs.record();
    gate.cancelled().await;
    let _ = msg;
    Ok(run)
}

/// Waits, at most ten seconds, until `ready` holds.
async fn eventually(what: &str, ready: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A gate that is already open: a duplicate that wrongly runs its body does not hang.
fn open_gate() -> CancellationToken {
    let open = CancellationToken::new();
    open.cancel();
    open
}

/// A body that outlives its lease keeps the key with `heartbeat = true`; without it, a
/// duplicate takes over (real clock, 1 s lease; the bodies are held open by a gate until the
/// duplicates have been answered, so a slow machine cannot let them finish first).
async fn heartbeat_keeps_a_long_body_from_being_taken_over<S: Store + 'static>(store: S) {
    let store = Arc::new(store);
    let runs = Arc::new(Runs::default());
    let gate = CancellationToken::new();
    let held = {
        let (store, runs, gate) = (store.clone(), runs.clone(), gate.clone());
        tokio::spawn(async move {
            long_with_heartbeat(&*store, &runs, &gate, OrderPaid::new("L-1", 1)).await
        })
    };
    let dropped = {
        let (store, runs, gate) = (store.clone(), runs.clone(), gate.clone());
        tokio::spawn(async move {
            long_without_heartbeat(&*store, &runs, &gate, OrderPaid::new("L-2", 1)).await
        })
    };
    eventually("both bodies started", || runs.count() == 2).await;
    // Well past the 1 s lease: only the heartbeat can still hold a key.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let open = open_gate();
    let during = within(long_with_heartbeat(
        &*store,
        &runs,
        &open,
        OrderPaid::new("L-1", 1),
    ))
    .await;
    assert!(
        matches!(during, Err(AppError::Idem(Error::InProgress { .. }))),
        "{during:?}"
    );
    let taken_over = within(long_without_heartbeat(
        &*store,
        &runs,
        &open,
        OrderPaid::new("L-2", 1),
    ))
    .await;
    assert!(
        taken_over.is_ok(),
        "without heartbeat the lease ran out: {taken_over:?}"
    );
    gate.cancel();
    assert!(within(held).await.expect("task").is_ok());
    let stale = within(dropped).await.expect("task");
    assert!(
        matches!(stale, Err(AppError::Idem(Error::LeaseLost { .. }))),
        "{stale:?}"
    );
    assert_eq!(runs.count(), 3, "the held body once, the dropped one twice");
}

/// A real store with faults injected: the claim fails while `store_down` is set, and the
/// next `failing_extends` extends fail with a store error.
struct Faulty<S> {
    inner: S,
    store_down: AtomicBool,
    failing_extends: AtomicUsize,
    extends: AtomicUsize,
    claims: AtomicUsize,
}

impl<S> Faulty<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            store_down: AtomicBool::new(false),
            failing_extends: AtomicUsize::new(0),
            extends: AtomicUsize::new(0),
            claims: AtomicUsize::new(0),
        }
    }

    fn outage() -> Error {
        Error::Store(StoreError::new("faulty", "connection refused (injected)"))
    }
}

impl<S: Store> Store for Faulty<S> {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Option<&Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, Error> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        if self.store_down.load(Ordering::SeqCst) {
            return Err(Self::outage());
        }
        self.inner.claim(key, fingerprint, lease).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        lease: &Lease,
        result: &[u8],
        ttl: Duration,
    ) -> Result<(), Error> {
        self.inner.complete(key, lease, result, ttl).await
    }

    async fn release(&self, key: &RecordKey, lease: &Lease) -> Result<(), Error> {
        self.inner.release(key, lease).await
    }

    async fn extend(
        &self,
        key: &RecordKey,
        lease: &Lease,
        duration: Duration,
    ) -> Result<Lease, Error> {
        self.extends.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .failing_extends
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(Self::outage());
        }
        self.inner.extend(key, lease, duration).await
    }

    async fn purge_expired(&self, limit: u32) -> Result<u64, Error> {
        self.inner.purge_expired(limit).await
    }
}

/// A store that cannot be reached: the body does not run and the caller gets the store error
/// (do not ack; redeliver later). When it is back, the body runs once.
async fn unreachable_store_runs_nothing<S: Store>(store: S, _clock: ManualClock) {
    let store = Faulty::new(store);
    let runs = Runs::default();
    store.store_down.store(true, Ordering::SeqCst);
    let down = credit_points(&store, &runs, OrderPaid::new("H-1", 10)).await;
    assert!(
        matches!(down, Err(AppError::Idem(Error::Store(_)))),
        "{down:?}"
    );
    assert_eq!(runs.count(), 0, "the body must not run without a claim");
    store.store_down.store(false, Ordering::SeqCst);
    let back = credit_points(&store, &runs, OrderPaid::new("H-1", 10))
        .await
        .expect("store back");
    assert_eq!(back.run, 1);
}

#[idempotent(key = "order_no", store = store, scope = "tests.fail_open", fail_open = true)]
async fn opens<S: Store>(store: &S, runs: &Runs, msg: OrderPaid) -> Result<usize, AppError> {
    let _ = msg;
    Ok(runs.record())
}

#[idempotent(
    key = "order_no",
    store = store,
    scope = "tests.fail_open",
    fail_open = true,
    wait = "60s"
)]
async fn opens_or_waits<S: Store>(
    store: &S,
    runs: &Runs,
    msg: OrderPaid,
) -> Result<usize, AppError> {
    let _ = msg;
    Ok(runs.record())
}

/// `fail_open = true`: with the store up the handler is like any other (duplicates replay, a
/// reused key is refused); a claim that cannot reach the store runs the body, unrecorded, so
/// every delivery during the outage runs it and the first one after it runs it again; a key
/// in progress is not failed open, nor is a waiting duplicate that saw the key in progress
/// when the store then fails.
async fn fail_open_runs_the_body_only_when_the_claim_cannot_reach_the_store<S: Store + 'static>(
    store: S,
    _clock: ManualClock,
) {
    let store = Arc::new(Faulty::new(store));
    let runs = Arc::new(Runs::default());
    let deliver = |order_no: &str, amount| opens(&*store, &runs, OrderPaid::new(order_no, amount));
    assert_eq!(deliver("FO-1", 1).await.expect("first"), 1);
    assert_eq!(deliver("FO-1", 1).await.expect("replay"), 1);
    let reused = deliver("FO-1", 2).await;
    assert!(
        matches!(
            reused,
            Err(AppError::Idem(Error::FingerprintMismatch { .. }))
        ),
        "{reused:?}"
    );
    assert_eq!(runs.count(), 1);

    store.store_down.store(true, Ordering::SeqCst);
    assert_eq!(deliver("FO-2", 1).await.expect("fails open"), 2);
    assert_eq!(deliver("FO-2", 1).await.expect("fails open again"), 3);
    store.store_down.store(false, Ordering::SeqCst);
    assert_eq!(deliver("FO-2", 1).await.expect("never recorded"), 4);
    assert_eq!(deliver("FO-2", 1).await.expect("replay"), 4);

    let key = RecordKey::new("tests.fail_open", "FO-3").expect("key");
    let Claim::Acquired(lease) = store
        .claim(&key, None, Duration::from_secs(30))
        .await
        .expect("claim")
    else {
        panic!("FO-3 is new");
    };
    let busy = deliver("FO-3", 1).await;
    assert!(
        matches!(busy, Err(AppError::Idem(Error::InProgress { .. }))),
        "{busy:?}"
    );
    let waiting = {
        let (store, runs) = (store.clone(), runs.clone());
        tokio::spawn(async move { opens_or_waits(&*store, &runs, OrderPaid::new("FO-3", 1)).await })
    };
    let claims = store.claims.load(Ordering::SeqCst);
    eventually("the duplicate polls the key in progress", || {
        store.claims.load(Ordering::SeqCst) >= claims + 2
    })
    .await;
    store.store_down.store(true, Ordering::SeqCst);
    let waited = within(waiting).await.expect("task");
    assert!(
        matches!(waited, Err(AppError::Idem(Error::Store(_)))),
        "a duplicate that saw the key in progress must not fail open: {waited:?}"
    );
    store.store_down.store(false, Ordering::SeqCst);
    assert_eq!(runs.count(), 4, "no body ran for a key in progress");
    store.release(&key, &lease).await.expect("release");
    assert_eq!(deliver("FO-3", 1).await.expect("free again"), 5);
}

#[idempotent(key = "order_no", store = store, scope = "tests.beat", lease = "600ms", heartbeat = true)]
async fn beating<S: Store>(
    store: &S,
    runs: &Runs,
    gate: &CancellationToken,
    msg: OrderPaid,
) -> Result<usize, AppError> {
    let run = runs.record();
    gate.cancelled().await;
    let _ = msg;
    Ok(run)
}

/// A heartbeat that hits a store error keeps beating: a hiccup does not hand a live body's
/// key to a duplicate (real clock: 600 ms lease, a beat every 200 ms, the first extend fails;
/// the body is held open by a gate until the duplicate has been answered).
async fn heartbeat_retries_after_store_errors<S: Store + 'static>(store: S) {
    let store = Arc::new(Faulty::new(store));
    store.failing_extends.store(1, Ordering::SeqCst);
    let runs = Arc::new(Runs::default());
    let gate = CancellationToken::new();
    let held = {
        let (store, runs, gate) = (store.clone(), runs.clone(), gate.clone());
        tokio::spawn(async move { beating(&*store, &runs, &gate, OrderPaid::new("HB-1", 1)).await })
    };
    // The failed beat is followed by good ones before the first lease runs out; after five
    // beats the lease has been moved on well past where it started.
    eventually("five beats", || store.extends.load(Ordering::SeqCst) >= 5).await;
    let during = within(beating(
        &*store,
        &runs,
        &open_gate(),
        OrderPaid::new("HB-1", 1),
    ))
    .await;
    assert!(
        matches!(during, Err(AppError::Idem(Error::InProgress { .. }))),
        "the heartbeat stopped after a store error: {during:?}"
    );
    gate.cancel();
    assert_eq!(within(held).await.expect("task").expect("held"), 1);
    assert_eq!(runs.count(), 1);
}

#[idempotent(key = "order_no", store = store, scope = "tests.slow", wait = "150ms")]
async fn slow_or_wait_briefly<S: Store>(
    store: &S,
    runs: &Runs,
    msg: OrderPaid,
) -> Result<Receipt, AppError> {
    Ok(Receipt {
        order_no: msg.order_no,
        points: 0,
        run: runs.record(),
    })
}

/// A duplicate whose `wait` runs out before the first call finishes gets `InProgress`.
async fn waiting_duplicate_times_out_in_progress<S: Store + 'static>(
    store: S,
    _clock: ManualClock,
) {
    let store = Arc::new(store);
    let runs = Arc::new(Runs::default());
    let started = Arc::new(Notify::new());
    let (finish_first, first_finish) = oneshot::channel();
    let first = {
        let (store, runs, started) = (store.clone(), runs.clone(), started.clone());
        tokio::spawn(async move {
            slow(
                &*store,
                &runs,
                &started,
                first_finish,
                OrderPaid::new("WT-1", 1),
            )
            .await
        })
    };
    started.notified().await;
    let waited = within(slow_or_wait_briefly(
        &*store,
        &runs,
        OrderPaid::new("WT-1", 1),
    ))
    .await;
    assert!(
        matches!(waited, Err(AppError::Idem(Error::InProgress { .. }))),
        "{waited:?}"
    );
    finish_first.send(()).expect("send");
    assert_eq!(first.await.expect("task").expect("first").run, 1);
    assert_eq!(runs.count(), 1);
}

#[idempotent(key = "order_no", store = store, scope = "tests.slow", wait = Duration::MAX)]
async fn waits_forever<S: Store>(
    store: &S,
    runs: &Runs,
    msg: OrderPaid,
) -> Result<Receipt, AppError> {
    Ok(Receipt {
        order_no: msg.order_no,
        points: 0,
        run: runs.record(),
    })
}

/// A waiting duplicate whose first call fails takes the key over and runs the body itself;
/// `wait = Duration::MAX` waits without a deadline (and does not overflow).
async fn waiter_runs_the_body_when_the_first_call_fails<S: Store + 'static>(
    store: S,
    _clock: ManualClock,
) {
    let store = Arc::new(store);
    let runs = Arc::new(Runs::default());
    let started = Arc::new(Notify::new());
    let (finish_first, first_finish) = oneshot::channel::<()>();
    let first = {
        let (store, runs, started) = (store.clone(), runs.clone(), started.clone());
        tokio::spawn(async move {
            slow(
                &*store,
                &runs,
                &started,
                first_finish,
                OrderPaid::new("WF-1", 1),
            )
            .await
        })
    };
    started.notified().await;
    let waiter = {
        let (store, runs) = (store.clone(), runs.clone());
        tokio::spawn(async move { waits_forever(&*store, &runs, OrderPaid::new("WF-1", 1)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "the duplicate must wait, not run");
    drop(finish_first); // the first body sees a closed channel…
    let first = first.await.expect("task");
    assert!(
        matches!(first, Err(AppError::Business(_))),
        "…and fails: {first:?}"
    );
    let waited = within(waiter).await.expect("task").expect("waiter ran");
    assert_eq!(waited.run, 2, "the waiter ran the body after the release");
    assert_eq!(runs.count(), 2);
}

#[idempotent(key = "order_no", store = store, scope = "tests.scope_a")]
async fn in_scope_a<S: Store>(store: &S, runs: &Runs, msg: OrderPaid) -> Result<usize, AppError> {
    let _ = msg;
    Ok(runs.record())
}

#[idempotent(key = "order_no", store = store, scope = "tests.scope_b")]
async fn in_scope_b<S: Store>(store: &S, runs: &Runs, msg: OrderPaid) -> Result<usize, AppError> {
    let _ = msg;
    Ok(runs.record())
}

/// Scopes are separate key spaces: one key in two handlers runs each body once.
async fn one_key_in_two_scopes_runs_each_body<S: Store>(store: S, _clock: ManualClock) {
    let runs = Runs::default();
    let msg = || OrderPaid::new("S-1", 1);
    assert_eq!(in_scope_a(&store, &runs, msg()).await.expect("a"), 1);
    assert_eq!(in_scope_b(&store, &runs, msg()).await.expect("b"), 2);
    assert_eq!(in_scope_a(&store, &runs, msg()).await.expect("a again"), 1);
    assert_eq!(in_scope_b(&store, &runs, msg()).await.expect("b again"), 2);
    assert_eq!(runs.count(), 2);
}

#[idempotent(key = key, store = store, scope = "tests.nan")]
async fn not_a_number<S: Store>(store: &S, runs: &Runs, key: &str) -> Result<f64, AppError> {
    runs.record();
    Ok(f64::NAN)
}

/// A result that does not survive its JSON round trip (`NaN` becomes `null`) is an encode
/// error, not a record that fails every replay; the claim is not released (the body's effect
/// happened), so duplicates wait for the lease instead of repeating it at once.
async fn result_that_does_not_round_trip_is_refused<S: Store>(store: S, clock: ManualClock) {
    let runs = Runs::default();
    let first = not_a_number(&store, &runs, "N-1").await;
    assert!(
        matches!(first, Err(AppError::Idem(Error::Encode { .. }))),
        "{first:?}"
    );
    let duplicate = not_a_number(&store, &runs, "N-1").await;
    assert!(
        matches!(duplicate, Err(AppError::Idem(Error::InProgress { .. }))),
        "{duplicate:?}"
    );
    assert_eq!(runs.count(), 1);
    clock.advance(idem_runtime::Policy::DEFAULT_LEASE);
    let later = not_a_number(&store, &runs, "N-1").await;
    assert!(matches!(later, Err(AppError::Idem(Error::Encode { .. }))));
    assert_eq!(runs.count(), 2, "after the lease the key is free again");
}

#[idempotent(key = "order_no", store = store, scope = "tests.zero", lease = Duration::ZERO)]
async fn zero_lease<S: Store>(
    store: &S,
    runs: &Runs,
    started: &Notify,
    finish: oneshot::Receiver<()>,
    msg: OrderPaid,
) -> Result<usize, AppError> {
    let run = runs.record();
    started.notify_one();
    let _ = finish.await;
    let _ = msg;
    Ok(run)
}

/// A lease given as a zero `Duration` still holds the key for a millisecond of store time (the
/// clock here does not move), so a duplicate is refused instead of taking over at once.
async fn zero_lease_still_holds_the_key<S: Store + 'static>(store: S, clock: ManualClock) {
    let store = Arc::new(store);
    let runs = Arc::new(Runs::default());
    let started = Arc::new(Notify::new());
    let (finish_first, first_finish) = oneshot::channel();
    let first = {
        let (store, runs, started) = (store.clone(), runs.clone(), started.clone());
        tokio::spawn(async move {
            zero_lease(
                &*store,
                &runs,
                &started,
                first_finish,
                OrderPaid::new("Z-1", 1),
            )
            .await
        })
    };
    started.notified().await;
    let (_keep, never) = oneshot::channel();
    let duplicate = within(zero_lease(
        &*store,
        &runs,
        &Notify::new(),
        never,
        OrderPaid::new("Z-1", 1),
    ))
    .await;
    assert!(
        matches!(duplicate, Err(AppError::Idem(Error::InProgress { .. }))),
        "{duplicate:?}"
    );
    finish_first.send(()).expect("send");
    assert_eq!(first.await.expect("task").expect("first"), 1);
    clock.advance(Duration::from_millis(1));
    assert_eq!(runs.count(), 1);
}

/// One `#[tokio::test]` per case, on the `store` function of the module it expands in (which
/// gives `None`, having said why, when the store's server is not there).
macro_rules! cases {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $case() {
            let clock = ManualClock::new(START);
            let Some(store) = store(clock.clone()).await else {
                return;
            };
            super::$case(store, clock).await;
        }
    )*};
}

/// A module of every case on the store `$make` builds (an `Option` of it).
macro_rules! store_module {
    ($store:ident, |$clock:ident| $make:expr) => {
        mod $store {
            use super::*;

            async fn store<C: Clock>($clock: C) -> Option<impl Store + 'static> {
                $make
            }

            cases!(
                concurrent_duplicates_run_the_body_once,
                completed_key_replays,
                reused_key_with_another_payload_is_rejected,
                failed_body_is_retried,
                expired_lease_is_taken_over_and_stale_holder_fenced,
                cancelled_call_leaves_claim_to_expire,
                panicking_body_leaves_claim_to_expire,
                falsy_results_replay_exactly,
                first_caller_gets_what_replays_get,
                empty_key_is_rejected,
                stored_result_of_another_type_is_a_decode_error,
                composite_keys_keep_tenants_apart,
                waiting_duplicate_gets_the_first_result,
                unreachable_store_runs_nothing,
                fail_open_runs_the_body_only_when_the_claim_cannot_reach_the_store,
                waiting_duplicate_times_out_in_progress,
                waiter_runs_the_body_when_the_first_call_fails,
                one_key_in_two_scopes_runs_each_body,
                result_that_does_not_round_trip_is_refused,
                zero_lease_still_holds_the_key,
            );

            // These two run on the real clock.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn heartbeat_keeps_a_long_body_from_being_taken_over() {
                if let Some(store) = store(SystemClock).await {
                    super::heartbeat_keeps_a_long_body_from_being_taken_over(store).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn heartbeat_retries_after_store_errors() {
                if let Some(store) = store(SystemClock).await {
                    super::heartbeat_retries_after_store_errors(store).await;
                }
            }
        }
    };
}

store_module!(memory, |clock| Some(idem_runtime::MemoryStore::with_clock(
    clock
)));

store_module!(sqlite, |clock| {
    let store = idem_runtime::sqlite::SqliteStore::in_memory()
        .await
        .expect("open SQLite")
        .with_clock(clock);
    store.migrate().await.expect("migrate");
    Some(store)
});

// A database file shared by a pool of several connections, as processes share it.
store_module!(sqlite_file, |clock| Some(
    idem_tests::sqlite_file::FileStore::open("handlers", clock).await
));

// The servers: skipped when absent, unless IDEM_REQUIRE_SERVERS=1 (scripts/test.sh).
store_module!(postgres, |clock| {
    let pool = idem_tests::sql_servers::postgres_pool().await?;
    Some(idem_tests::sql_servers::postgres_store(pool, clock).await)
});

store_module!(mysql, |clock| {
    let pool = idem_tests::sql_servers::mysql_pool().await?;
    Some(idem_tests::sql_servers::mysql_store(pool, clock).await)
});

store_module!(redis, |clock| {
    let connection = idem_tests::redis_server::manager().await?;
    Some(idem_tests::redis_server::store(connection, clock))
});

/// Every call runs in an `idempotent` span that records scope, key, fence and outcome.
mod tracing_span {
    use std::sync::Mutex;

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
    use tracing_subscriber::registry::LookupSpan;

    use super::*;

    /// The fields of every `idempotent` span, as `name=value` strings, one list per span.
    #[derive(Clone, Default)]
    struct Spans(Arc<Mutex<Vec<SpanFields>>>);

    /// A span and its fields as `name=value` strings.
    type SpanFields = (Id, Vec<String>);

    struct Fields<'a>(&'a mut Vec<String>);

    impl Visit for Fields<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push(format!("{}={value:?}", field.name()));
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.push(format!("{}={value}", field.name()));
        }
    }

    impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
            if attrs.metadata().name() == "idempotent" {
                let mut fields = Vec::new();
                attrs.record(&mut Fields(&mut fields));
                self.0.lock().expect("lock").push((id.clone(), fields));
            }
        }
        fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
            let mut spans = self.0.lock().expect("lock");
            if let Some((_, fields)) = spans.iter_mut().find(|(span, _)| span == id) {
                values.record(&mut Fields(fields));
            }
        }
    }

    #[test]
    fn every_call_records_scope_key_and_outcome() {
        let spans = Spans::default();
        let subscriber = tracing_subscriber::registry().with(spans.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        tracing::subscriber::with_default(subscriber, || {
            runtime.block_on(async {
                let store = idem_runtime::MemoryStore::new();
                let runs = Runs::default();
                let msg = || OrderPaid::new("T-1", 10);
                credit_points(&store, &runs, msg()).await.expect("executed");
                credit_points(&store, &runs, msg()).await.expect("replayed");
                let reused = credit_points(&store, &runs, OrderPaid::new("T-1", 11)).await;
                assert!(reused.is_err());
                let failed = flaky(&store, &Runs::default(), true, OrderPaid::new("T-2", 1)).await;
                assert!(failed.is_err());
            });
        });
        let spans = spans.0.lock().expect("lock");
        let fields: Vec<&Vec<String>> = spans.iter().map(|(_, fields)| fields).collect();
        assert_eq!(fields.len(), 4, "{fields:?}");
        let has = |i: usize, field: &str| fields[i].iter().any(|f| f == field);
        assert!(
            has(0, "scope=tests.credit_points") && has(0, "key=T-1"),
            "{fields:?}"
        );
        assert!(
            has(0, "outcome=executed") && has(0, "fence=1"),
            "{fields:?}"
        );
        assert!(has(1, "outcome=replayed"), "{fields:?}");
        assert!(has(2, "outcome=mismatch"), "{fields:?}");
        assert!(
            has(3, "outcome=failed") && has(3, "scope=tests.flaky"),
            "{fields:?}"
        );
    }

    #[idempotent(key = key, store = store, strategy = "tx", tx = tx, scope = "tests.tx_span")]
    async fn in_tx(
        store: &idem_runtime::sqlite::SqliteStore,
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        key: &str,
    ) -> Result<usize, AppError> {
        let _ = tx;
        Ok(key.len())
    }

    #[test]
    fn tx_calls_record_their_strategy_and_outcome() {
        let spans = Spans::default();
        let subscriber = tracing_subscriber::registry().with(spans.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        tracing::subscriber::with_default(subscriber, || {
            runtime.block_on(async {
                let store = idem_runtime::sqlite::SqliteStore::in_memory()
                    .await
                    .expect("open SQLite");
                store.migrate().await.expect("migrate");
                for _ in 0..2 {
                    let mut tx = store.pool().begin().await.expect("begin");
                    assert_eq!(in_tx(&store, &mut tx, "X-1").await.expect("call"), 3);
                    tx.commit().await.expect("commit");
                }
            });
        });
        let spans = spans.0.lock().expect("lock");
        let fields: Vec<&Vec<String>> = spans.iter().map(|(_, fields)| fields).collect();
        assert_eq!(fields.len(), 2, "{fields:?}");
        let has = |i: usize, field: &str| fields[i].iter().any(|f| f == field);
        for i in 0..2 {
            assert!(
                has(i, "strategy=tx") && has(i, "scope=tests.tx_span") && has(i, "key=X-1"),
                "{fields:?}"
            );
        }
        assert!(
            has(0, "outcome=executed") && has(0, "fence=1"),
            "{fields:?}"
        );
        assert!(has(1, "outcome=replayed"), "{fields:?}");
    }
}
