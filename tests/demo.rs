//! The end-to-end demo (`cargo run -p idem-examples --bin demo`), through the library function
//! the binary calls: on the embedded default (a SQLite file in a temporary directory and the
//! in-process stream), twice on one SQLite file (a rerun must not see the first run's users or
//! keys), and on PostgreSQL and MariaDB with a Redis Stream. Every order must reconcile against
//! the databases, and every injected fault must have happened.

use idem_examples::demo::{self, DemoError, Options, Report, Verdict};

/// Points the demo's paid orders earn: 120 + 45 + 999 + 250 + 70 (the fifth order is
/// cancelled).
const EXPECTED_POINTS: i64 = 1484;

/// Runs the demo on `database_url` and `redis_url` and checks that it reconciled.
async fn reconciles(database_url: Option<String>, redis_url: Option<String>) -> Report {
    let options = Options {
        database_url,
        redis_url,
        quiet: false,
    };
    let report = demo::run(&options).await.expect("the demo runs to the end");
    // Printed (and captured): shown if an assertion below fails.
    println!("{report}");
    assert!(report.is_ok(), "the demo found a mismatch:\n{report}");
    assert!(report.problems.is_empty(), "{:?}", report.problems);

    assert_eq!(report.orders.len(), 6);
    for order in &report.orders {
        assert_eq!(order.verdict, Verdict::Ok, "{order:?}");
        assert_eq!(order.orders, 1, "one order row per create key: {order:?}");
        assert_eq!(order.payments, i64::from(order.paid), "{order:?}");
        assert_eq!(order.outbox, (i64::from(order.paid), 0), "{order:?}");
        assert_eq!(order.credited_points, order.expected_points, "{order:?}");
        assert_eq!(order.ledger_rows, i64::from(order.paid), "{order:?}");
        let state = if order.paid { "Paid" } else { "Cancelled" };
        assert_eq!(order.state.as_deref(), Some(state), "{order:?}");
    }
    assert_eq!(report.expected_points(), EXPECTED_POINTS);
    assert_eq!(report.credited_points(), EXPECTED_POINTS);
    assert_eq!(report.users.len(), 3);
    for user in &report.users {
        assert_eq!(user.verdict, Verdict::Ok, "{user:?}");
        assert_eq!(user.orders, (2, 2), "{user:?}");
        assert_eq!(user.balance, user.expected_points, "{user:?}");
        assert_eq!(user.ledger_points, user.expected_points, "{user:?}");
    }
    let balances: i64 = report.users.iter().map(|user| user.balance).sum();
    assert_eq!(balances, EXPECTED_POINTS);

    // The faults were injected, and absorbed.
    let totals = &report.totals;
    assert_eq!(totals.killed, 1, "a consumer was killed mid-handler");
    assert_eq!(totals.lost_replies, 1, "the relay lost a stream reply");
    assert_eq!(totals.lost_acks, 1, "an ack was lost");
    assert!(
        totals.taken_over >= 2,
        "the killed consumer's entry and the unacked one were taken over: {totals:?}"
    );
    assert_eq!(totals.pending_left, 0, "every entry was acknowledged");
    assert!(totals.replayed_responses >= 2, "{totals:?}");
    assert_eq!(totals.key_reused, 1, "{totals:?}");
    let order = |label: &str| {
        report
            .orders
            .iter()
            .find(|order| order.label == label)
            .unwrap_or_else(|| panic!("no order {label}"))
    };
    assert_eq!(order("#1").create_requests, 2, "a create retried");
    assert!(order("#3").create_requests >= 8, "concurrent creates");
    assert_eq!(order("#3").pay_requests, 8, "concurrent pays");
    assert_eq!(
        order("#1").events,
        2,
        "published again after the lost reply"
    );
    assert_eq!(order("#3").events, 2, "resent by the producer");
    assert!(
        order("#4").events >= 3,
        "relay replicas and a producer retry"
    );
    // At least: a credit slower than the idle time is taken over once more, and absorbed.
    assert!(
        order("#2").deliveries >= 2,
        "redelivered after the lost ack"
    );
    assert!(order("#6").deliveries >= 2, "redelivered after the kill");
    let absorbed: u32 = report.orders.iter().map(|order| order.absorbed).sum();
    assert!(absorbed >= 5, "duplicates absorbed: {absorbed}");
    assert!(
        totals.consumers.dead_lettered >= 1,
        "the reused order number"
    );
    assert!(totals.consumers.credited >= 5, "{totals:?}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demo_reconciles_on_the_embedded_default() {
    reconciles(None, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demo_reconciles_when_rerun_on_one_sqlite_file() {
    let file = idem_tests::sqlite_file::TempDb::new("demo");
    let first = reconciles(Some(file.url()), None).await;
    let second = reconciles(Some(file.url()), None).await;
    let users = |report: &Report| {
        report
            .users
            .iter()
            .map(|user| user.user_id)
            .collect::<Vec<_>>()
    };
    assert!(
        users(&first)
            .iter()
            .all(|user| !users(&second).contains(user)),
        "the rerun uses users of its own: {:?} then {:?}",
        users(&first),
        users(&second)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demo_reconciles_on_postgres_and_redis() {
    if idem_tests::sql_servers::postgres_pool().await.is_none()
        || idem_tests::redis_server::client().await.is_none()
    {
        return;
    }
    reconciles(
        Some(idem_tests::sql_servers::postgres_url()),
        Some(idem_tests::redis_server::url()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demo_reconciles_on_mariadb_and_redis() {
    if idem_tests::sql_servers::mysql_pool().await.is_none()
        || idem_tests::redis_server::client().await.is_none()
    {
        return;
    }
    reconciles(
        Some(idem_tests::sql_servers::mysql_url()),
        Some(idem_tests::redis_server::url()),
    )
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn demo_refuses_an_unknown_database_url() {
    let options = Options {
        database_url: Some("oracle://scott@127.0.0.1/orders".to_owned()),
        redis_url: None,
        quiet: true,
    };
    match demo::run(&options).await {
        Err(error @ DemoError::Usage(_)) => {
            assert!(error.to_string().contains("oracle://"), "{error}");
        }
        other => panic!("expected a usage error, got {other:?}"),
    }
}
